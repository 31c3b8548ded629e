"""`meshsl simulate --engine ray`: a simulation's logical nodes hosted by Ray actors across a cluster.

Each declared node's logical nodes (one per client lane when replicated) are divided between
`nodes[].ray.actors` actors; every actor reserves `num_cpus`/`num_gpus` as one bundle of a single
Ray placement group (strategy `ray.placement`, default SPREAD). Inside an actor the nodes run as in
`simulate()`: one event loop, the in-process transport, one shared compute thread. Between actors,
messages cross one ZeroMQ link per pair of actors (meshsl.transport.bridge).

Faults: Ray detects a dead actor (its process or its machine) and fails the actor's task; the
driver then stops every other actor and raises PeerFailed naming the logical nodes that were lost.
Nothing here re-creates actors: a simulation is rerun, not resumed.

Results equal the in-process engine's for the same seed (tests/e2e/test_ray_engine.py): the same nodes,
the same state machine and the same deterministic aggregation, only the wire differs.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from meshsl.config.loader import parse_spec
from meshsl.config.schema import RayNodeSpec, RaySpec
from meshsl.errors import ConfigError, MeshslError, PeerFailed
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.entry import run_node
from meshsl.topology.expand import expand_nodes
from meshsl.topology.model import topology_from_spec
from meshsl.transport.bridge import Bridge, node_endpoint
from meshsl.transport.inprocess import InProcessHub, InProcessTransport

_runs = itertools.count()


@dataclass(frozen=True)
class ActorPlan:
    name: str
    nodes: tuple[str, ...]
    num_cpus: float
    num_gpus: float


def plan_actors(topology) -> list[ActorPlan]:
    """Declared node -> `actors` contiguous blocks of its logical nodes (lanes), one actor each."""
    _, _, by_lane = expand_nodes(topology.spec)
    plans = []
    for declared in topology.spec.nodes:
        names = list(dict.fromkeys(by_lane[declared.name]))
        spec = declared.ray or RayNodeSpec()
        count = min(spec.actors, len(names))
        for i in range(count):
            block = tuple(names[len(names) * i // count: len(names) * (i + 1) // count])
            plans.append(ActorPlan(f"{declared.name}.a{i}", block, spec.num_cpus, spec.num_gpus))
    return plans


def _ray():
    try:
        import ray  # optional extra 'ray'
    except ImportError:
        raise ConfigError("the Ray engine needs Ray: pip install 'meshsl[ray]'", "--engine ray") from None
    return ray


def _meshsl_pythonpath() -> str:
    """Ray workers must import this meshsl (an editable or source checkout included)."""
    here = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])


class NodeHost:
    """A Ray actor hosting some logical nodes of one simulation (made a Ray actor class lazily)."""

    def __init__(self, document: dict, source: str, base_dir: str, run: str, actor: str,
                 nodes: tuple[str, ...]) -> None:
        self.topology = topology_from_spec(parse_spec(document, source), source, Path(base_dir))
        self.run_id, self.actor, self.nodes = run, actor, nodes  # not `self.run`: that is the actor method
        self.bridge: Optional[Bridge] = None

    async def open(self) -> str:
        self.bridge = Bridge(self.run_id, self.actor, self.nodes, InProcessHub())
        return self.bridge.address

    async def run(self, actors: dict, options: Optional[RunOptions], return_weights: bool) -> dict:
        bridge = self.bridge
        if bridge is None:
            raise RuntimeError("NodeHost.open comes before run")
        book: dict[str, Optional[str]] = {n: node_endpoint(self.run_id, n) for n in self.nodes}
        book.update(bridge.connect(actors))
        bridge.start()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.actor}-compute")
        results = {}

        async def one(name: str) -> None:
            transport = InProcessTransport(name, node_endpoint(self.run_id, name), book, hub=bridge.hub)
            results[name] = await run_node(self.topology, name, options if name == self.topology.coordinator else None,
                                           transport=transport, metrics=None, serve_metrics=False, executor=executor)

        started = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as group:
                for name in self.nodes:
                    group.create_task(one(name))
        finally:
            executor.shutdown(wait=True)
            await bridge.close()
        import ray  # optional extra 'ray'
        out = {"actor": self.actor, "wall_s": time.perf_counter() - started, "refused": bridge.refused,
               "ray_node": ray.get_runtime_context().get_node_id(), "peak_rss_mib": _peak_rss_mib(),
               "failures": {n: r.failure for n, (r, _) in results.items() if r.failure},
               "summary": results[self.topology.coordinator][1] if self.topology.coordinator in results else None}
        if return_weights:
            out["weights"] = {n: {seg: {k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}
                                  for seg, m in r.worker.modules.items()} for n, (r, _) in results.items()}
        return out


def simulate_on_ray(topology, document: dict, options: Optional[RunOptions] = None, address: Optional[str] = None,
                    timeout: Optional[float] = None, return_weights: bool = False) -> dict:
    """Run `topology` (parsed from `document`) on Ray. Returns {"summary", "weights" (by node, when
    asked), "actors": [{name, nodes, address, ray_node, wall_s, peak_rss_mib, refused}]}. `address`: a
    running cluster ("auto", "host:port"); None starts a local Ray instance for this run."""
    ray = _ray()
    from ray.util.placement_group import placement_group, remove_placement_group  # optional extra 'ray'

    settings = topology.spec.ray or RaySpec()
    plans = plan_actors(topology)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": _meshsl_pythonpath()}},
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    run = f"meshsl-{os.getpid()}-{next(_runs)}"
    bundles = [{k: v for k, v in (("CPU", p.num_cpus), ("GPU", p.num_gpus)) if v > 0} or {"CPU": 0.01}
               for p in plans]
    group = placement_group(bundles, strategy=settings.placement, name=run)
    hosts: list = []  # filled as they start: every one started is killed below
    try:
        _wait_placed(ray, group, plans, bundles, settings)
        _start_hosts(ray, group, topology, document, run, plans, hosts)
        actors = _open_hosts(ray, hosts, plans, settings)
        pending = {h.run.remote(actors, options, return_weights): p for h, p in zip(hosts, plans)}
        results = _collect(ray, pending, timeout)
    finally:
        for host in hosts:
            ray.kill(host)
        remove_placement_group(group)
        if started_ray:
            ray.shutdown()
    return _outcome(plans, actors, results, return_weights)


def _wait_placed(ray, group, plans, bundles: list[dict], settings: RaySpec) -> None:
    ready, _ = ray.wait([group.ready()], timeout=settings.ready_timeout_s)
    if not ready:
        raise MeshslError(
            f"Ray could not place {len(plans)} actors ({', '.join(f'{p.name}: {bundles[i]}' for i, p in enumerate(plans))}) "
            f"with strategy {settings.placement} within {settings.ready_timeout_s:.0f}s; the cluster has "
            f"{ray.cluster_resources()} (nodes[].ray.num_cpus / num_gpus / actors, ray.placement)")


def _start_hosts(ray, group, topology, document: dict, run: str, plans, hosts: list) -> None:
    """One NodeHost actor per plan, each in its own bundle of the placement group; appended to `hosts`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # optional extra 'ray'
    remote_host = ray.remote(NodeHost)
    source, base_dir = topology.source, str(topology.base_dir)
    for i, plan in enumerate(plans):
        hosts.append(remote_host.options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=0, name=f"{run}-{plan.name}",
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group,
                                                                 placement_group_bundle_index=i),
        ).remote(document, source, base_dir, run, plan.name, plan.nodes))


def _open_hosts(ray, hosts: list, plans, settings: RaySpec) -> dict[str, tuple[str, list[str]]]:
    """Every actor binds its nodes; returns actor name -> (its address, its nodes)."""
    try:
        addresses = ray.get([h.open.remote() for h in hosts], timeout=settings.ready_timeout_s)
    except ray.exceptions.RayActorError as exc:
        raise PeerFailed(", ".join(p.name for p in plans), f"a Ray actor died while starting: "
                                                          f"{str(exc).splitlines()[0]}") from None
    except ray.exceptions.GetTimeoutError:
        raise PeerFailed(", ".join(p.name for p in plans),
                         f"Ray actors did not start within {settings.ready_timeout_s:.0f}s") from None
    return {p.name: (a, p.nodes) for p, a in zip(plans, addresses)}


def _outcome(plans, actors: dict, results: list[dict], return_weights: bool) -> dict:
    """The run's summary, weights and per-actor figures; the first node failure is raised."""
    failures = {n: why for r in results for n, why in r["failures"].items()}
    if failures:
        node, detail = next(iter(failures.items()))
        raise PeerFailed(node, detail)
    summary = next(r["summary"] for r in results if r["summary"] is not None)
    weights = {n: w for r in results for n, w in r.get("weights", {}).items()} if return_weights else None
    return {"summary": summary, "weights": weights,
            "actors": [dict({"name": p.name, "nodes": len(p.nodes), "address": actors[p.name][0]},
                            **{k: r[k] for k in ("wall_s", "ray_node", "refused", "peak_rss_mib")})
                       for p in plans for r in results if r["actor"] == p.name]}


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


def _collect(ray, pending: dict, timeout: Optional[float]) -> list[dict]:
    """Wait for every actor; the first one Ray reports dead or failed stops the whole simulation."""
    deadline = time.monotonic() + timeout if timeout else None
    results = []
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        if not done:
            lost = ", ".join(n for p in pending.values() for n in p.nodes[:3])
            raise PeerFailed(lost, f"the simulation did not finish within {timeout:.0f}s")
        plan = pending.pop(done[0])
        try:
            results.append(ray.get(done[0]))
        except ray.exceptions.RayActorError as exc:
            raise PeerFailed(", ".join(plan.nodes[:5]) + (" ..." if len(plan.nodes) > 5 else ""),
                             f"Ray actor {plan.name} died: {str(exc).splitlines()[0]}") from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(getattr(exc, "cause", None), MeshslError):
                raise exc.cause from None
            raise PeerFailed(plan.name, f"actor failed: {exc.as_instanceof_cause()}") from None
        except ray.exceptions.RayError as exc:  # e.g. OutOfMemoryError: Ray's memory monitor killed it
            raise PeerFailed(", ".join(plan.nodes[:5]) + (" ..." if len(plan.nodes) > 5 else ""),
                             f"Ray stopped actor {plan.name}: {str(exc).splitlines()[0]}") from None
    return results
