"""`meshsl keys ...`: create the CURVE key pairs a topology's nodes authenticate with."""
from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from meshsl.errors import MeshslError
from meshsl.security.keys import generate_keys, load_public_key, load_secret_file, public_key_path, secret_key_path

app = typer.Typer(help="Manage CURVE keys", no_args_is_help=True)

EXIT_USAGE = 2


@app.callback()
def keys() -> None:
    """Manage CURVE keys."""
    # An explicit callback keeps `generate` a subcommand even while it is the only one.


def _fail(message: str) -> NoReturn:
    # User mistakes get one readable line, never a traceback.
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=EXIT_USAGE)


def _nodes_from_list(text: str) -> list[str]:
    nodes = [name.strip() for name in text.split(",") if name.strip()]
    if not nodes:
        _fail("--nodes is empty; give names like --nodes client_a,server")
    return nodes


def _nodes_from_topology(path: Path) -> list[str]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(f"cannot read topology {path}: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        _fail(f"{path} is not valid YAML: {exc}")
    nodes = document.get("nodes") if isinstance(document, dict) else None
    if not isinstance(nodes, list) or not nodes:
        _fail(f"{path}: expected a non-empty `nodes:` list")
    names: list[str] = []
    for index, node in enumerate(nodes):
        name = node.get("name") if isinstance(node, dict) else None
        if not isinstance(name, str) or not name:
            _fail(f"{path}: nodes[{index}] has no `name`")
        names.append(name)
    return names


@app.command()
def generate(
    directory: Path = typer.Argument(..., help="Directory to write <node>.key and <node>.key_secret into"),
    nodes: Optional[str] = typer.Option(None, "--nodes", help="Comma-separated node names, e.g. client_a,server"),
    topology: Optional[Path] = typer.Option(None, "--topology", help="Take node names from this topology YAML"),
    force: bool = typer.Option(False, "--force", help="Replace existing key files"),
) -> None:
    """Generate one CURVE key pair per node."""
    if (nodes is None) == (topology is None):
        _fail("give exactly one of --nodes or --topology")
    names = _nodes_from_list(nodes) if nodes is not None else _nodes_from_topology(topology)  # type: ignore[arg-type]
    try:
        public_keys = generate_keys(directory, names, overwrite=force)
    except MeshslError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write keys into {directory}: {exc.strerror or exc}")

    console = Console()
    table = Table(title=f"CURVE keys in {directory}")
    table.add_column("node")
    table.add_column("public key (z85)", no_wrap=True)
    for node, key in public_keys.items():
        # Text(): z85 keys may contain '[', which rich would otherwise read as markup.
        table.add_row(Text(node), Text(key))
    console.print(table)
    console.print("Reference the directory from the topology YAML:", markup=False)
    console.print(f"  security: {{curve: true, keys_dir: {directory}}}", markup=False, highlight=False, soft_wrap=True)
    console.print(
        "Each node needs its own <node>.key_secret (keep it private, mode 0600; it never leaves this machine). "
        "Peers need only public keys: `meshsl keys public DIR --node NAME` prints the line for the "
        "node's entry in the topology.",
        markup=False,
    )


@app.command()
def public(
    directory: Path = typer.Argument(..., help="Directory holding <node>.key (or <node>.key_secret)"),
    node: str = typer.Option(..., "--node", help="Node whose public key to print"),
) -> None:
    """Print a node's public key as the topology takes it: `public_key: "..."` (only public keys travel)."""
    try:
        if public_key_path(directory, node).is_file():
            key = load_public_key(directory, node)
        else:  # only the secret file kept: its public half
            key = load_secret_file(secret_key_path(directory, node))[0]
    except MeshslError as exc:
        _fail(f"{exc} (create it with `meshsl keys generate {directory} --nodes {node}`)")
    # z85 has no quote or backslash: a double-quoted YAML scalar holds it as is.
    typer.echo(f'public_key: "{key.decode("ascii")}"')
