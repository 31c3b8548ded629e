"""Start-up: the optimizer path that does not import torch._dynamo trains bit-identically to torch's own,
and a node process imports neither torch._dynamo nor rich before its first step."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Fresh interpreter: torch._dynamo must not be loaded before the eager path runs.
SCRIPT = r"""
import json, sys, torch
from meshsl.compute.eager_optim import eager

def train(make, use_eager):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = make(model.parameters())
    if use_eager:
        opt = eager(opt)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 2:  # a checkpoint round trip in the middle (what failover does)
            opt.load_state_dict(opt.state_dict())
    state = opt.state_dict()["state"]
    return [p.detach().clone() for p in model.parameters()], [t for s in state.values() for t in s.values()
                                                             if isinstance(t, torch.Tensor)]

makers = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-2),
}
fast = {name: train(make, True) for name, make in makers.items()}
dynamo_after_eager = "torch._dynamo" in sys.modules
plain = {name: train(make, False) for name, make in makers.items()}
assert "torch._dynamo" in sys.modules  # torch's own path did import it: the comparison is meaningful
equal = {name: all(torch.equal(a, b) for a, b in zip(fast[name][0] + fast[name][1], plain[name][0] + plain[name][1]))
         and len(fast[name][1]) == len(plain[name][1]) for name in makers}
print(json.dumps({"dynamo_after_eager": dynamo_after_eager, "equal": equal}))
"""


def _python(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_eager_optimizer_is_bit_identical_and_skips_dynamo():
    result = json.loads(_python(SCRIPT))
    assert result["dynamo_after_eager"] is False
    assert result["equal"] == {"sgd": True, "adam": True, "adamw": True}


def test_node_start_imports_neither_dynamo_nor_rich():
    """What `meshsl node` does before its first step: the CLI (as `python -m meshsl ... node`), topology,
    worker and an optimizer step."""
    code = r"""
import json, sys, torch
sys.argv = ["meshsl", "--log-level", "INFO", "node", "server"]
import meshsl.cli
from meshsl.topology.model import load_topology
from meshsl.compute.worker import SegmentWorker
worker = SegmentWorker(load_topology("topologies/vanilla.yaml"), "server")
for module in worker.modules.values():
    for p in module.parameters():
        p.grad = torch.ones_like(p)
before = [p.detach().clone() for m in worker.modules.values() for p in m.parameters()]
worker.apply_optimizer()
after = [p.detach() for m in worker.modules.values() for p in m.parameters()]
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "rich": "rich" in sys.modules,
                  "stepped": all(not torch.equal(a, b) for a, b in zip(before, after)),
                  "commands": sorted(c.name or c.callback.__name__ for c in meshsl.cli.app.registered_commands)}))
"""
    result = json.loads(_python(code))
    assert result == {"dynamo": False, "rich": False, "stepped": True, "commands": result["commands"]}
    assert "node" in result["commands"]


def test_other_commands_still_mount_everything():
    from meshsl.cli import _starting_a_node
    assert _starting_a_node(["/x/meshsl", "--log-level", "DEBUG", "node", "client", "-t", "t.yaml"])
    assert _starting_a_node(["/x/meshsl/__main__.py", "node", "client"])
    assert not _starting_a_node(["/x/meshsl", "run", "node.yaml"])
    assert not _starting_a_node(["/x/meshsl", "--log-level", "node", "audit"])  # "node" is the option's value
    assert not _starting_a_node(["pytest", "node"])
    assert not _starting_a_node(["/x/benchmarks/__main__.py", "node"])
