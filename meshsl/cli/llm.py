"""`meshsl llm prepare`: build the small example models a topology declares (`segments[].llm.create`)."""
from __future__ import annotations

from pathlib import Path

import typer

from meshsl.cli.common import fail, out
from meshsl.errors import MeshslError

app = typer.Typer(help="Language models: build a topology's example model and tokenizer locally (docs/llm.md).",
                  no_args_is_help=True)


@app.command()
def prepare(topology: Path = typer.Argument(..., help="topology YAML")) -> None:
    """Create every `llm.create` model whose directory is missing (tokenizer trained on the recipe's corpus,
    weights seeded); existing directories are left as they are. Offline and deterministic."""
    from meshsl.config.loader import load_spec
    from meshsl.topology.llm_checks import resolve_model_dirs

    try:
        spec = resolve_model_dirs(load_spec(topology), topology.parent)
        done: set[str] = set()
        for segment in spec.segments:
            llm = segment.llm
            if llm is None or llm.create is None or llm.model in done:
                continue
            done.add(llm.model)
            target = Path(llm.model)
            if (target / "config.json").is_file():
                out.print(f"{target}: present")
                continue
            from meshsl.models.llm_recipe import create_model  # transformers, tokenizers: the llm extra

            create_model(llm.create, target, topology.parent)
            out.print(f"{target}: created ({llm.create.arch}, {llm.create.layers} blocks, width {llm.create.width})")
    except MeshslError as exc:
        fail(exc, 2)
