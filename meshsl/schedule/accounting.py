"""Privacy budgets in (epsilon, delta), per cut edge and per party, with Opacus's RDP accountant.

Mechanisms meshsl runs:

* activation DP on a cut edge: the Gaussian mechanism on each sample's clipped activation row
  (sensitivity clip_norm, noise std noise_multiplier * clip_norm), once per use of the sample;
  it protects the features of the producing party;
* gradient DP on a cut edge (`privacy[].gradient: {defence: dp}`): the same mechanism on the
  gradient rows the label holder sends back; it protects the labels behind them;
* label DP (`training.label_dp`): randomized response drawn once per sample for the whole run,
  pure epsilon-DP (delta 0); every gradient computed from the noisy labels is post-processing.

How often a sample is released: every party of a meshsl run computes the same batches from a
shared seed, so batch membership is no secret and privacy amplification by subsampling does not
hold by default: a sample is released once per epoch it takes part in (sampling rate 1).
`amplification: true` counts a Poisson sampling rate of batch / rows instead (the DP-SGD
convention; only sound where the other parties cannot tell which samples a batch holds).
Adjacency: add/remove one sample, as Opacus. Held-out rows released in evaluation are not counted.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx

from meshsl.errors import ConfigError, PrivacyBudgetError
from meshsl.schedule.steps import epoch_steps, sample_pools, training_steps

DEFAULT_DELTA = 1e-5


def _accountants():
    try:
        from opacus.accountants import RDPAccountant  # heavy (opacus, scipy): only when DP is declared
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as exc:  # pragma: no cover - opacus is a core dependency
        raise ConfigError(f"privacy accounting needs opacus (pip install opacus): {exc}") from None
    return RDPAccountant, get_noise_multiplier


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Gaussian mechanisms with this noise multiplier and sampling rate (Opacus RDP)."""
    return composed_epsilon([(noise_multiplier, sample_rate, steps)], delta)


def composed_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of several (noise_multiplier, sample_rate, steps) mechanisms on the same samples."""
    history = [(s, q, n) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    RDPAccountant, _ = _accountants()
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta))


def calibrate(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier whose epsilon after `steps` stays within target_epsilon (Opacus)."""
    if steps <= 0:
        return 0.0
    _, get_noise_multiplier = _accountants()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant="rdp"))
    except ValueError as exc:
        raise ConfigError(f"cannot reach epsilon {target_epsilon} with delta {delta}: {exc}") from None


# -- the mechanisms of a topology ------------------------------------------------------------------
@dataclass
class Mechanism:
    edge: str  # "producer->consumer"
    kind: str  # "activation_dp" | "gradient_dp"
    protects: str  # "features" | "labels"
    party: str  # whose data it protects
    clip_norm: float
    noise_multiplier: Optional[float]  # None until calibrated
    target_epsilon: Optional[float]
    delta: float
    amplification: bool
    where: str  # key path in the YAML
    calibrated: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def noise(self) -> float:
        """The noise multiplier, once declared or calibrated (the schema asks for one of the two)."""
        if self.noise_multiplier is None:
            raise ConfigError(f"{self.edge}: no noise multiplier (declare one, or a target epsilon)", self.where)
        return self.noise_multiplier


def releases(topology, steps: int, amplification: bool) -> tuple[float, int]:
    """(sampling rate, number of mechanism runs) for a sample over `steps` training steps."""
    if steps <= 0:
        return 1.0, 0
    if amplification:
        pools = sample_pools(topology).train
        smallest = max(1, min(len(p) for p in pools))
        return min(1.0, topology.spec.training.batch_size / smallest), steps
    per_epoch = max(1, len(epoch_steps(topology)))
    return 1.0, math.ceil(steps / per_epoch)


def planned_steps(topology) -> int:
    return len(training_steps(topology))


def _label_parties(topology, consumer: str, producer: str) -> list[str]:
    below = nx.descendants(topology.graph, consumer) | {consumer}
    parties = {topology.party_of(t.labels) for t in topology.spec.tasks if t.output in below}
    return sorted(parties - {topology.party_of(producer)})


def mechanisms(topology) -> list[Mechanism]:
    """Every Gaussian mechanism the topology declares, with its noise multiplier (calibrated if asked)."""
    cached = _MECHANISMS.get(topology)
    if cached is not None:
        return cached
    found: list[Mechanism] = []
    index = {p.segment: i for i, p in enumerate(topology.spec.privacy)}
    for producer, consumer in topology.cut_edges():
        entry = next((p for p in topology.spec.privacy if p.segment == producer), None)
        if entry is None:
            continue
        where = f"privacy[{index[producer]}]"
        edge = f"{producer}->{consumer}"
        if entry.dp is not None:
            dp = entry.dp
            found.append(Mechanism(edge, "activation_dp", "features", topology.party_of(producer), dp.clip_norm,
                                   dp.noise_multiplier, dp.target_epsilon, dp.delta, dp.amplification, f"{where}.dp"))
        gradient = getattr(entry, "gradient", None)
        if gradient is not None and gradient.defence == "dp":
            for party in _label_parties(topology, consumer, producer):
                found.append(Mechanism(edge, "gradient_dp", "labels", party, gradient.clip_norm,
                                       gradient.noise_multiplier, gradient.target_epsilon, gradient.delta,
                                       gradient.amplification, f"{where}.gradient"))
    steps = planned_steps(topology) if found else 0
    for m in found:
        if m.noise_multiplier is None:
            rate, count = releases(topology, steps, m.amplification)
            if m.target_epsilon is None:
                raise ConfigError(f"{m.edge}: declare a noise multiplier or a target epsilon", m.where)
            m.noise_multiplier = calibrate(m.target_epsilon, rate, count, m.delta)
            m.calibrated = True
    _MECHANISMS[topology] = found
    return found


# Memoised beside the (frozen) topology, not on it (calibration runs the accountant); gone with the topology.
_MECHANISMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def noise_multiplier(topology, edge: str, kind: str) -> Optional[float]:
    """The noise multiplier a node uses for this edge's mechanism (calibrated when declared by epsilon)."""
    for m in mechanisms(topology):
        if m.edge == edge and m.kind == kind:
            return m.noise_multiplier
    return None


def activation_noise(topology, segment: str) -> Optional[float]:
    for m in mechanisms(topology):
        if m.kind == "activation_dp" and m.edge.split("->")[0] == segment:
            return m.noise_multiplier
    return None


def budget(topology, steps: Optional[int] = None) -> dict:
    """(epsilon, delta) per edge mechanism and per party (features and labels), for a run of `steps`."""
    if steps is None:
        steps = planned_steps(topology)
    edges = []
    by_party: dict[tuple[str, str], list[tuple]] = {}
    for m in mechanisms(topology):
        rate, count = releases(topology, steps, m.amplification)
        eps = epsilon(m.noise, rate, count, m.delta)
        edges.append({"edge": m.edge, "mechanism": m.kind, "protects": f"{m.protects} of {m.party}",
                      "party": m.party, "clip_norm": m.clip_norm, "noise_multiplier": m.noise_multiplier,
                      "calibrated": m.calibrated, "sample_rate": rate, "releases": count, "epsilon": eps,
                      "delta": m.delta, "target_epsilon": m.target_epsilon})
        by_party.setdefault((m.party, m.protects), []).append((m.noise_multiplier, rate, count, m.delta))
    parties: dict[str, dict] = {}
    for (party, what), history in by_party.items():
        delta = min(h[3] for h in history)
        parties.setdefault(party, {})[what] = {"epsilon": composed_epsilon([h[:3] for h in history], delta),
                                               "delta": delta, "mechanisms": len(history)}
    label_dp = topology.spec.training.label_dp
    if label_dp is not None:
        for task in topology.spec.tasks:
            if task.loss == "mse":
                continue
            party = topology.party_of(task.labels)
            current = parties.setdefault(party, {}).get("labels")
            # Everything computed from the randomized labels is post-processing: the smaller bound holds.
            if current is None or label_dp.epsilon < current["epsilon"]:
                parties[party]["labels"] = {"epsilon": label_dp.epsilon, "delta": 0.0, "mechanisms": 1,
                                            "via": "label_dp (randomized response, once per sample)"}
    return {"steps": steps, "edges": edges, "parties": parties,
            "label_dp": {"epsilon": label_dp.epsilon, "delta": 0.0} if label_dp else None}


def check_budget(topology, steps: Optional[int] = None) -> dict:
    """Raise PrivacyBudgetError when a run of `steps` would spend more than a declared target epsilon."""
    report = budget(topology, steps)
    for entry, m in zip(report["edges"], mechanisms(topology)):
        if m.target_epsilon is not None and entry["epsilon"] > m.target_epsilon * (1 + 1e-6):
            raise PrivacyBudgetError(
                f"{entry['mechanism']} on edge {entry['edge']} would reach epsilon {entry['epsilon']:.3f} "
                f"(delta {entry['delta']:g}) after {report['steps']} steps ({entry['releases']} releases per "
                f"sample), over the declared target_epsilon {m.target_epsilon:g}: train fewer steps or raise "
                f"the noise", f"{topology.source}: {m.where}.target_epsilon")
    return report


def effective_dp(topology, segment: str):
    """The activation-DP spec of a cut segment with its noise multiplier filled in (calibrated if declared
    by target_epsilon); None when the segment has no activation DP."""
    entry = next((p for p in topology.spec.privacy if p.segment == segment), None)
    if entry is None or entry.dp is None:
        return None
    if entry.dp.noise_multiplier is not None:
        return entry.dp
    sigma = activation_noise(topology, segment)
    if sigma is None:  # the segment sends nothing across a party boundary: nothing to calibrate against
        raise ConfigError(f"segment {segment!r} crosses no party boundary; its target_epsilon cannot be calibrated")
    return entry.dp.model_copy(update={"noise_multiplier": sigma})


def gradient_noise(topology, edge: str) -> Optional[float]:
    return noise_multiplier(topology, edge, "gradient_dp")
