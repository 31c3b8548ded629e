# Two commands on a fresh machine: `make run` trains the default topology, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TOPOLOGY ?= topologies/vanilla.yaml
BIN := $(VENV)/bin

.PHONY: run test test-fast test-containers venv bench bench-quick clean

$(BIN)/meshsl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,llm]"
	touch $@

venv: $(BIN)/meshsl

run: venv
	$(BIN)/meshsl llm prepare $(TOPOLOGY)
	$(BIN)/meshsl validate $(TOPOLOGY)
	$(BIN)/meshsl run $(TOPOLOGY) --summary-json runs/summary.json

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# unit + integration tiers only (no node processes, namespaces or Prometheus)
test-fast: venv
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

# the container tier (root or sudo; podman, no registry): the image built with podman, three sites started
# from their provisioned kits (one behind a drop-inbound firewall) training, resuming and aborting a job,
# and the systemd units run inside a systemd container (docs/sites.md)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
test-containers: venv
	$(SUDO) nodes/podman/setup-host.sh
	$(SUDO) nodes/podman/build-image.sh
	$(SUDO) rm -rf runs/sites-demo
	$(SUDO) $(BIN)/python nodes/podman/sites_demo.py --out runs/sites-demo
	$(SUDO) $(BIN)/python nodes/podman/systemd_check.py

bench: venv
	$(BIN)/python -m benchmarks --out runs/bench.json

bench-quick: venv
	$(BIN)/python -m benchmarks --quick --out runs/bench-quick.json

clean:
	rm -rf $(VENV) runs .pytest_cache
