"""Starting a site: verify its kit (pinned to the provisioner it first started with), load its own keys,
policy and catalogue, then run its agent, and the project's broker where this site hosts it."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Optional

from meshsl.config.loader import load_yaml, validate_document
from meshsl.data.catalogue import CATALOGUE_ENV, read_catalogue
from meshsl.errors import AuthError, ConfigError
from meshsl.apps.sites.agent import SiteAgent
from meshsl.apps.sites.broker import Broker
from meshsl.apps.sites.identity import Identity, load_identity
from meshsl.apps.sites.kit import Kit, verify_kit
from meshsl.apps.sites.specs import PolicySpec

PIN_FILE = "provisioner.pin"


def identity_dir(state: Path) -> Path:
    return Path(state) / "identity"


def open_kit(kit_dir: Path, state: Path) -> tuple[Kit, Identity]:
    """The verified kit and this site's identity; the first start pins the kit's provisioner."""
    pin = Path(state) / PIN_FILE
    pinned = pin.read_text().strip() if pin.is_file() else None
    kit = verify_kit(Path(kit_dir), pinned)
    identity = load_identity(identity_dir(state), kit.site.name)
    if identity.public != kit.site.identity:
        raise AuthError(f"kit {kit_dir} was made for site {kit.site.name} with another key "
                        f"({kit.site.identity.fingerprint}) than this site's ({identity.public.fingerprint})")
    if pinned is None:
        pin.write_text(kit.provisioner.fingerprint + "\n")
    return kit, identity


def load_policy(path: Path) -> PolicySpec:
    if not path.is_file():
        raise ConfigError("no policy: copy the kit's policy.example.yaml there and edit it", str(path))
    return validate_document(PolicySpec, load_yaml(path.read_text(), str(path)) or {}, str(path))


def run_site(kit_dir: Path, state: Path, policy_path: Optional[Path], catalogue_path: Optional[Path],
             host_broker: bool) -> None:
    state = Path(state)
    kit, identity = open_kit(kit_dir, state)
    policy = load_policy(policy_path or state / "policy.yaml")
    catalogue = catalogue_path or (state / "catalogue.yaml")
    if catalogue.is_file():
        read_catalogue(catalogue)  # a broken catalogue is found now, not at the first job
        os.environ[CATALOGUE_ENV] = str(catalogue.resolve())
    if host_broker and kit.broker_site != kit.site.name:
        raise ConfigError(f"this kit's broker is hosted by site {kit.broker_site}, not {kit.site.name}", "--host-broker")
    asyncio.run(_serve(kit, identity, state, policy, catalogue if catalogue.is_file() else None, host_broker))


async def _serve(kit: Kit, identity: Identity, state: Path, policy: PolicySpec, catalogue: Optional[Path],
                 host_broker: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    services = [SiteAgent(kit, identity, state, policy, catalogue).run(stop)]
    if host_broker:
        services.insert(0, Broker(kit, identity).serve(stop))
    tasks = [asyncio.ensure_future(s) for s in services]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    stop.set()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()
