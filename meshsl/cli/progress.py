"""Training progress for people: a bar on a terminal, whole lines otherwise (`meshsl run > file`, CI, a
`meshsl node` under systemd), and the last words of a run (finished, failed, interrupted).

Plain lines never import rich: `meshsl node` prints them too (start-up to the first step counts)."""
from __future__ import annotations

import sys
from typing import Optional, TextIO

LINES_PER_RUN = 20  # without a terminal: about this many progress lines per run, plus evaluations and events


def step_text(row: dict) -> str:
    """'epoch 1 cancer loss 0.312 acc 0.906 512 samples/s' (the rate of the last few steps)."""
    tasks = " ".join(f"{name} loss {t['loss']:.3f}" + (f" acc {t['accuracy']:.3f}" if "accuracy" in t else "")
                     for name, t in row.get("tasks", {}).items())
    return f"epoch {row.get('epoch', 0)} {tasks} {row.get('samples_per_s', 0):.0f} samples/s".replace("  ", " ")


def event_text(row: dict) -> str:
    return f"{row['event']}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("event", "time"))


def eval_text(row: dict) -> str:
    return ", ".join(f"{task} " + " ".join(f"{k} {v:.4f}" for k, v in r.items()
                                          if k in ("loss", "accuracy", "f1", "auroc") and isinstance(v, float))
                     for task, r in (row.get("eval") or {}).items())


class LineProgress:
    """Progress as whole lines on `stream`: every ~1/LINES_PER_RUN of the run, each evaluation and event."""

    def __init__(self, title: str, total: Optional[int], stream: TextIO = sys.stderr) -> None:
        self.title, self.total, self.stream = title, total, stream
        self.every = max(1, (total or 0) // LINES_PER_RUN)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.stream.flush()

    def row(self, row: dict) -> None:
        if row.get("event"):
            self._print(event_text(row))
            return
        step = row["step"] + 1
        if row.get("eval"):
            self._print(f"step {step}{self._of()}: {step_text(row)}; evaluated: {eval_text(row)}")
        elif step % self.every == 0 or step == self.total:
            self._print(f"step {step}{self._of()}: {step_text(row)}")

    def _of(self) -> str:
        return f"/{self.total}" if self.total else ""

    def _print(self, text: str) -> None:
        print(f"{self.title}: {text}", file=self.stream, flush=True)


class BarProgress:
    """A rich progress bar (a terminal); events and evaluations are printed above it."""

    def __init__(self, console, title: str, total: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn  # rich: never in a node
        self.console = console
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=console)
        self.job = self.bar.add_task(title, total=total, info="")

    def __enter__(self) -> "BarProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def row(self, row: dict) -> None:
        if row.get("event"):
            self.console.print(f"[yellow]{row['event']}[/yellow]: " + event_text(row).partition(": ")[2])
            return
        self.bar.update(self.job, completed=row["step"] + 1, info=step_text(row))


class NoProgress:
    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def row(self, row: dict) -> None:
        pass


def progress_display(console, title: str, total: int, enabled: bool):
    """A bar on a terminal, whole lines (never cut at 80 columns) otherwise, nothing with --no-progress."""
    if not enabled:
        return NoProgress()
    if console.is_terminal:
        return BarProgress(console, title, total)
    return LineProgress(title, total, console.file)


def interrupted_text(history: list[dict], run_dir, resume_hint: str, checkpoints: bool) -> str:
    """What Ctrl-C leaves behind: the step reached and how to go on."""
    reached = f"after step {history[-1]['step'] + 1}" if history else "before the first step"
    if checkpoints:
        return (f"interrupted {reached}; every node was stopped. The run directory {run_dir} keeps the logs and "
                f"checkpoints: resume from the last checkpoint with `{resume_hint}`")
    return (f"interrupted {reached}; every node was stopped. No checkpoints were written (--no-checkpoint), so "
            f"the run cannot be resumed; logs are in {run_dir}")
