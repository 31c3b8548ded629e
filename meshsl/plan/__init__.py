"""Per-node plans (what each node hosts, sends and receives) and pipeline schedules, as plain data."""
from meshsl.plan.nodeplan import EdgePlan, NodePlan, build_plans, edge_name

__all__ = ["EdgePlan", "NodePlan", "build_plans", "edge_name"]
