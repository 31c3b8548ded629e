"""A site's review of a job against its policy: pure (the topology, the kit, the policy and the site's own
catalogue in; the reasons to refuse out). An empty list means the policy allows the job."""
from __future__ import annotations

from pathlib import Path

import networkx as nx

from meshsl.config.loader import load_yaml, parse_spec
from meshsl.data import load_source
from meshsl.data.selection import resolve_columns
from meshsl.data.specs import DatasetSpec
from meshsl.errors import MeshslError
from meshsl.apps.sites.kit import Kit
from meshsl.apps.sites.specs import JobDocument, PolicySpec
from meshsl.topology.model import Topology, topology_from_spec


def job_topology(job: JobDocument, folder: Path) -> Topology:
    """The job's topology, checked without shape inference (other parties' data is not here)."""
    source = str(folder / "topology.yaml")
    spec = parse_spec(load_yaml(job.topology, source), source)
    return topology_from_spec(spec, source, folder, infer_shapes=False)


def review(job: JobDocument, topology: Topology, kit: Kit, policy: PolicySpec,
           catalogue: dict[str, DatasetSpec]) -> list[str]:
    party = kit.site.party
    reasons = _people(job, topology, kit, policy)
    ours = {n for n, spec in topology.nodes.items() if spec.party == party}
    if not ours:
        return reasons + [f"the job places no node on party {party!r}"]
    for index, data in enumerate(topology.spec.data):
        if data.node in ours:
            reasons += _data_reasons(index, data, topology, policy, catalogue)
    reasons += _label_reasons(topology, party, policy) + _defence_reasons(topology, party, policy)
    reasons += _budget_reasons(topology, party, policy)
    return reasons


def _people(job: JobDocument, topology: Topology, kit: Kit, policy: PolicySpec) -> list[str]:
    reasons = []
    if policy.submitters is not None and job.submitter not in policy.submitters:
        reasons.append(f"submitter {job.submitter!r} may not run jobs here (policy submitters: {policy.submitters})")
    for party in sorted({n.party for n in topology.nodes.values()} - {kit.site.party}):
        if party not in policy.parties:
            reasons.append(f"party {party!r} is not one this site trains with (policy parties: {policy.parties})")
        elif kit.site_of_party(party) is None:
            reasons.append(f"party {party!r} has no site in project {kit.project}")
    return reasons


def _data_reasons(index: int, data, topology: Topology, policy: PolicySpec,
                  catalogue: dict[str, DatasetSpec]) -> list[str]:
    where = f"data[{index}]({data.name})"
    if data.dataset.name != "catalogue":
        return [f"{where} reads dataset {data.dataset.name!r} directly; this site only serves its catalogue's "
                f"entries (dataset: {{name: catalogue, options: {{entry: NAME}}}})"]
    entry = str(data.dataset.options.get("entry"))
    if entry not in catalogue:
        return [f"{where}: catalogue entry {entry!r} does not exist on this site"]
    rule = policy.sources.get(entry)
    if rule is None:
        return [f"{where}: catalogue entry {entry!r} is not one this site's policy lets jobs use "
                f"(policy sources: {sorted(policy.sources)})"]
    reasons = []
    readers = sorted(s.name for s in topology.spec.segments if data.name in s.inputs)
    if rule.segments is not None and set(readers) - set(rule.segments):
        reasons.append(f"{where} would feed segment(s) {sorted(set(readers) - set(rule.segments))}, but policy "
                       f"sources.{entry}.segments allows only {rule.segments}")
    if data.kind == "features" and rule.forbid_columns:
        try:
            names = load_source(data.model_copy(update={"columns": "all"}), topology.base_dir, head=2).feature_names
            chosen = [names[i] for i in resolve_columns(names, data.columns)]
        except MeshslError as exc:
            return reasons + [f"{where}: {exc}"]
        for column in chosen:
            if column in rule.forbid_columns:
                reasons.append(f"{where} would read column {column!r} of catalogue entry {entry!r}, which this "
                               f"site's policy forbids (sources.{entry}.forbid_columns)")
    return reasons


def _label_reasons(topology: Topology, party: str, policy: PolicySpec) -> list[str]:
    """Labels themselves never cross a party (the topology checks refuse that); what leaves is what the
    gradients this site sends back reveal about them. Without `labels_may_leave`, each such edge needs a
    gradient defence, or the job label DP."""
    if policy.labels_may_leave or topology.spec.training.label_dp is not None:
        return []
    entries = {p.segment: p for p in topology.spec.privacy}
    reasons = []
    for producer, consumer in topology.cut_edges():
        if topology.party_of(consumer) != party or topology.party_of(producer) == party:
            continue
        below = nx.descendants(topology.graph, consumer) | {consumer}
        ours = [t.name for t in topology.spec.tasks if t.output in below and topology.party_of(t.labels) == party]
        entry = entries.get(producer)
        if ours and (entry is None or entry.gradient is None):
            reasons.append(f"the gradients this site sends back over {producer}->{consumer} carry its labels "
                           f"(task(s) {ours}) undefended; policy labels_may_leave is false: declare "
                           f"privacy: [{{segment: {producer}, gradient: {{defence: ...}}}}] or training.label_dp")
    return reasons


def _defence_reasons(topology: Topology, party: str, policy: PolicySpec) -> list[str]:
    reasons = []
    entries = {p.segment: p for p in topology.spec.privacy}
    for producer, consumer in topology.cut_edges():
        if topology.party_of(producer) != party:
            continue
        entry = entries.get(producer)
        present = {"nopeek": bool(entry and entry.nopeek > 0), "dp": bool(entry and entry.dp),
                   "gradient": bool(entry and entry.gradient)}
        missing = [d for d in policy.required_defences if not present[d]]
        if missing:
            reasons.append(f"cut edge {producer}->{consumer} leaves this site without the defence(s) {missing} "
                           f"its policy requires (privacy: [{{segment: {producer}, ...}}])")
    return reasons


def _budget_reasons(topology: Topology, party: str, policy: PolicySpec) -> list[str]:
    if policy.max_epsilon is None and policy.max_steps is None:
        return []
    from meshsl.schedule.accounting import budget, planned_steps  # the accountant: only when a policy caps it
    try:
        steps = planned_steps(topology)
        spent = budget(topology, steps)["parties"].get(party, {})
    except MeshslError as exc:
        return [f"cannot plan the job's steps to check the policy's limits: {exc}"]
    reasons = []
    if policy.max_steps is not None and steps > policy.max_steps:
        reasons.append(f"the job trains {steps} steps, over this site's max_steps {policy.max_steps}")
    if policy.max_epsilon is not None:
        epsilon = max((v["epsilon"] for v in spent.values()), default=None)
        if epsilon is None:
            reasons.append(f"policy caps epsilon at {policy.max_epsilon:g} but the job declares no DP on this "
                           f"site's data")
        elif epsilon > policy.max_epsilon:
            reasons.append(f"the job spends epsilon {epsilon:.3f} on this site's data, over the policy's "
                           f"max_epsilon {policy.max_epsilon:g}")
    return reasons
