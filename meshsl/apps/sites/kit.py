"""Start-up kits: `meshsl provision` writes one per site, signed by the project's provisioner; a site refuses
to start from a kit whose files differ from the signed manifest, or that another provisioner signed."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from meshsl.config.loader import load_yaml, validate_document
from meshsl.errors import ConfigError, KitTampered, SignatureInvalid
from meshsl.apps.sites.deploy_files import kit_files
from meshsl.apps.sites.identity import Identity, PublicIdentity, load_public, verify
from meshsl.apps.sites.specs import ProjectSpec

MANIFEST = "MANIFEST.json"
SITE_FILE = "site.json"


@dataclass(frozen=True)
class SiteEntry:
    name: str
    party: str
    inbound: bool
    identity: PublicIdentity


@dataclass(frozen=True)
class Kit:
    """A verified kit: who this site is, whom it trusts, where the broker is."""
    directory: Path
    project: str
    site: SiteEntry
    sites: dict[str, SiteEntry]
    submitters: dict[str, PublicIdentity]
    broker_site: str
    broker_endpoint: str
    broker_bind: str
    provisioner: PublicIdentity

    @property
    def broker_identity(self) -> PublicIdentity:
        return self.sites[self.broker_site].identity

    def site_of_party(self, party: str) -> SiteEntry | None:
        return next((s for s in self.sites.values() if s.party == party), None)


def load_project(path: Path) -> tuple[ProjectSpec, dict[str, PublicIdentity], dict[str, PublicIdentity]]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the project file: {exc}", str(path)) from None
    project = validate_document(ProjectSpec, load_yaml(text, str(path)), str(path))
    names = [s.name for s in project.sites]
    if len(set(names)) != len(names) or len({s.party for s in project.sites}) != len(names):
        raise ConfigError("site names and parties must be unique (one site per party)", f"{path}: sites")
    if project.broker.site not in names:
        raise ConfigError(f"unknown site {project.broker.site!r} (sites: {', '.join(names)})", f"{path}: broker.site")
    sites = {s.name: _identity(path, s.identity, s.name, f"sites[{i}]") for i, s in enumerate(project.sites)}
    submitters = {s.name: _identity(path, s.identity, s.name, f"submitters[{i}]")
                  for i, s in enumerate(project.submitters)}
    return project, sites, submitters


def _identity(project_path: Path, file: str, name: str, key: str) -> PublicIdentity:
    identity = load_public(project_path.parent / file)
    if identity.name != name:
        raise ConfigError(f"identity file {file} is {identity.name!r}'s, not {name!r}'s", f"{project_path}: {key}.identity")
    return identity


def provision(project_path: Path, provisioner: Identity, out: Path) -> dict[str, Path]:
    """Write one signed kit per site under `out/<site>`; returns site -> kit folder."""
    project, sites, submitters = load_project(project_path)
    document = {
        "project": project.name,
        # by default the broker binds every interface at its port: the endpoint's host is how others reach it
        # (a service name, a NAT address), rarely an address it can bind
        "broker": {**project.broker.model_dump(),
                   "bind": project.broker.bind or f"tcp://0.0.0.0:{project.broker.endpoint.rsplit(':', 1)[-1]}"},
        "sites": [{"name": s.name, "party": s.party, "inbound": s.inbound, "identity": sites[s.name].as_data()}
                  for s in project.sites],
        "submitters": [submitters[s.name].as_data() for s in project.submitters],
    }
    kits = {}
    for site in project.sites:
        folder = Path(out) / site.name
        folder.mkdir(parents=True, exist_ok=True)
        files = {SITE_FILE: json.dumps({**document, "site": site.name}, indent=2) + "\n",
                 **kit_files(project, site, site.name == project.broker.site)}
        for name, text in files.items():
            (folder / name).write_text(text)
        manifest = {"project": project.name, "site": site.name, "provisioner": provisioner.public.as_data(),
                    "files": {name: _sha256(text.encode()) for name, text in sorted(files.items())}}
        manifest["signature"] = provisioner.sign(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        kits[site.name] = folder
    return kits


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_kit(folder: Path, pinned_provisioner: str | None = None) -> Kit:
    """The kit in `folder`, or KitTampered naming the file that differs from the signed manifest."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        provisioner = PublicIdentity.from_data(manifest.get("provisioner"), f"{folder / MANIFEST}: provisioner")
    except (OSError, ValueError, ConfigError, AttributeError) as exc:
        raise KitTampered(f"kit {folder}: {MANIFEST} is missing or unreadable ({exc})") from None
    signature = manifest.pop("signature", None)
    try:
        verify(manifest, signature, provisioner, f"kit {folder}: {MANIFEST}")
    except SignatureInvalid as exc:
        raise KitTampered(str(exc)) from None
    if pinned_provisioner is not None and provisioner.fingerprint != pinned_provisioner:
        raise KitTampered(f"kit {folder} is signed by {provisioner.name} ({provisioner.fingerprint}), not by the "
                          f"provisioner this site first started with ({pinned_provisioner})")
    listed = manifest.get("files") or {}
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    for extra in sorted(present - set(listed)):
        raise KitTampered(f"kit {folder}: file {extra} was added after provisioning (not in the signed manifest)")
    for name, digest in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise KitTampered(f"kit {folder}: file {name} listed in the signed manifest is missing")
        if _sha256(path.read_bytes()) != digest:
            raise KitTampered(f"kit {folder}: file {name} was changed after provisioning "
                              f"(its SHA-256 differs from the signed manifest)")
    return _parse_site_file(folder, provisioner)


def _parse_site_file(folder: Path, provisioner: PublicIdentity) -> Kit:
    data = json.loads((folder / SITE_FILE).read_text())
    where = str(folder / SITE_FILE)
    sites = {s["name"]: SiteEntry(s["name"], s["party"], bool(s["inbound"]),
                                  PublicIdentity.from_data(s["identity"], where)) for s in data["sites"]}
    submitters = {s["name"]: PublicIdentity.from_data(s, where) for s in data["submitters"]}
    broker = data["broker"]
    return Kit(folder, data["project"], sites[data["site"]], sites, submitters, broker["site"],
               broker["endpoint"], broker["bind"], provisioner)
