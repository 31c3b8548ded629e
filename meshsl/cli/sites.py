"""`meshsl identity`, `meshsl provision`, `meshsl site ...`, `meshsl submit` and `meshsl job ...`: wiring only
(meshsl.apps.sites holds the logic)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from meshsl.cli.common import fail
from meshsl.errors import MeshslError

site_app = typer.Typer(help="Run this party's long-running site agent and review its jobs", no_args_is_help=True)
job_app = typer.Typer(help="Follow and abort submitted jobs", no_args_is_help=True)

STATE = typer.Option(Path("/var/lib/meshsl"), "--state", help="the site's state folder (keys, jobs, weights)")
KIT = typer.Option(..., "--kit", help="a kit folder of the project (public: which broker, whose keys)")
IDENTITY = typer.Option(..., "--identity", help="the submitter's identity folder (`meshsl identity create`)")
NAME = typer.Option(..., "--name", help="the submitter's name")
BROKER = typer.Option(None, "--broker", help="reach the broker here instead of the kit's endpoint")


def _guard(action):
    try:
        return action()
    except MeshslError as exc:
        fail(exc)


def identity(folder: Path = typer.Argument(..., help="where the keys go (the secret halves stay there)"),
             name: str = typer.Argument(..., help="site, submitter or provisioner name")) -> None:
    """Create an identity (signing and CURVE keys) on this machine; print the public file to send."""
    from meshsl.apps.sites.identity import create_identity, identity_file
    public = _guard(lambda: create_identity(folder, name))
    print(f"{identity_file(folder, name)}  fingerprint {public.fingerprint}  (send this file; keep the rest)")


def provision(project: Path = typer.Argument(..., help="the project file (sites, submitters, broker)"),
              identity_dir: Path = typer.Option(..., "--identity", help="the provisioner's identity folder"),
              name: str = typer.Option(..., "--name", help="the provisioner's name"),
              out: Path = typer.Option(Path("kits"), "--out", "-o")) -> None:
    """Write a signed start-up kit per site: site configuration, compose file, systemd unit, README."""
    from meshsl.apps.sites.identity import load_identity
    from meshsl.apps.sites.kit import provision as make_kits
    kits = _guard(lambda: make_kits(project, load_identity(identity_dir, name), out))
    for site, folder in kits.items():
        print(f"{site}: {folder}")


@site_app.command("init")
def site_init(name: str = typer.Argument(..., help="this site's name in the project"), state: Path = STATE) -> None:
    """Create this site's keys in STATE/identity; send STATE/identity/NAME.identity.json to the provisioner."""
    from meshsl.apps.sites.service import identity_dir
    identity(identity_dir(state), name)


@site_app.command("start")
def site_start(kit: Path = KIT, state: Path = STATE,
               policy: Optional[Path] = typer.Option(None, "--policy", help="default: STATE/policy.yaml"),
               catalogue: Optional[Path] = typer.Option(None, "--catalogue", help="default: STATE/catalogue.yaml"),
               host_broker: bool = typer.Option(False, "--host-broker", help="also run the project's broker")) -> None:
    """Run the site agent: verify the kit, dial out to the broker, review and run jobs."""
    from meshsl.apps.sites.service import run_site
    _guard(lambda: run_site(kit, state, policy, catalogue, host_broker))


def _operator(state: Path, request: dict) -> dict:
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"ipc://{state / 'control.sock'}")
    sock.send(json.dumps(request).encode())
    try:
        if not sock.poll(10_000):
            fail(MeshslError(f"no site agent answers at {state / 'control.sock'} (is `meshsl site start` running?)"))
        return json.loads(sock.recv())
    finally:
        sock.close(0)
        ctx.term()


@site_app.command("approve")
def site_approve(job: str = typer.Argument(...), state: Path = STATE) -> None:
    """Approve a job waiting for this site's operator."""
    print(_operator(state, {"command": "approve", "job": job})["message"])


@site_app.command("refuse")
def site_refuse(job: str = typer.Argument(...), state: Path = STATE,
                reason: str = typer.Option("refused by the operator", "--reason")) -> None:
    """Refuse a job waiting for this site's operator (the submitter sees the reason)."""
    print(_operator(state, {"command": "refuse", "job": job, "reason": reason})["message"])


@site_app.command("jobs")
def site_jobs(state: Path = STATE) -> None:
    """The jobs this site was offered, and their state here."""
    print(json.dumps(_operator(state, {"command": "jobs"}), indent=2))


def _client(kit: Path, identity_dir: Path, name: str, broker: Optional[str] = None):
    from meshsl.apps.sites.client import JobClient
    return _guard(lambda: JobClient(kit, identity_dir, name, broker=broker))


def submit(topology: Path = typer.Argument(...), kit: Path = KIT, identity_dir: Path = IDENTITY, name: str = NAME,
           job_name: Optional[str] = typer.Option(None, "--job-name"),
           wait: bool = typer.Option(False, "--wait", help="wait until it finishes (exit 2 if it does not)"),
           broker: Optional[str] = BROKER) -> None:
    """Sign and submit a job (a topology) to the project's broker; print its id."""
    with _client(kit, identity_dir, name, broker) as client:
        job = _guard(lambda: client.submit(topology, job_name))
        print(job)
        if wait:
            print(json.dumps(_guard(lambda: client.wait(job)), indent=2))


@job_app.command("status")
def job_status(job: str = typer.Argument(...), kit: Path = KIT, identity_dir: Path = IDENTITY, name: str = NAME,
               broker: Optional[str] = BROKER) -> None:
    """The job's state on the broker and on each site (with what each site's policy releases)."""
    with _client(kit, identity_dir, name, broker) as client:
        print(json.dumps(_guard(lambda: client.status(job)), indent=2))


@job_app.command("abort")
def job_abort(job: str = typer.Argument(...), kit: Path = KIT, identity_dir: Path = IDENTITY, name: str = NAME,
              broker: Optional[str] = BROKER) -> None:
    """Stop the job on every site (signed: only its submitter may)."""
    with _client(kit, identity_dir, name, broker) as client:
        print(_guard(lambda: client.abort(job))["state"])


@job_app.command("wait")
def job_wait(job: str = typer.Argument(...), kit: Path = KIT, identity_dir: Path = IDENTITY, name: str = NAME,
             timeout: float = typer.Option(3600.0, "--timeout"), broker: Optional[str] = BROKER) -> None:
    """Wait until the job finishes (exit 2 when it is refused, fails or is aborted)."""
    with _client(kit, identity_dir, name, broker) as client:
        print(json.dumps(_guard(lambda: client.wait(job, timeout)), indent=2))


def mount(app: typer.Typer) -> None:
    app.command("identity")(identity)
    app.command()(provision)
    app.command()(submit)
    app.add_typer(site_app, name="site")
    app.add_typer(job_app, name="job")
