"""What a finished run hands back to Python: the summary, the per-step history, where the weights are."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class RunResult:
    """The outcome of ``meshsl.run`` or ``meshsl.simulate``.

    Attributes:
        summary: the run summary (what ``meshsl run --summary-json`` writes): ``tasks`` (train and held-out
            ``eval`` metrics per task), ``samples_per_s``, ``edges`` (bytes per cut edge), ``leakage``,
            ``failover_events``, ``privacy_budget``, ...
        history: one dict per committed step: ``step``, ``epoch``, ``tasks`` (loss, accuracy),
            ``samples_per_s`` (the last few steps), and ``eval`` on the steps that evaluated.
        run_dir: logs, the resolved topology, checkpoints and summary.json (None for a simulation).
        weights_dir: each segment's final weights as ``<segment>.safetensors`` (None if not saved).
        leakage_warnings: near-total leakage found during the run, with what to do (also logged).
    """

    summary: dict
    history: list = field(default_factory=list)
    run_dir: Optional[Path] = None
    weights_dir: Optional[Path] = None
    leakage_warnings: list = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, dict]:
        """Held-out metrics per task: ``{"cancer": {"loss": ..., "accuracy": ..., "f1": ...}}``."""
        return {name: dict(task.get("eval", {})) for name, task in self.summary.get("tasks", {}).items()}

    @property
    def weight_files(self) -> dict[str, Path]:
        """``{"encoder_a": Path(".../encoder_a.safetensors"), ...}`` (replicated segments: ``seg@node``)."""
        if self.weights_dir is None or not Path(self.weights_dir).is_dir():
            return {}
        return {p.stem: p for p in sorted(Path(self.weights_dir).glob("*.safetensors"))}

    def state_dict(self, segment: str) -> dict[str, Any]:
        """The final weights of one segment as a torch state dict (``module.load_state_dict`` takes it)."""
        from safetensors.torch import load_file  # torch: only when weights are read
        files = self.weight_files
        if segment not in files:
            raise KeyError(f"no saved weights for segment {segment!r} (saved: {', '.join(files) or 'none'})")
        return load_file(str(files[segment]))
