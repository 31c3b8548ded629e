"""Per-node plans (what each node hosts, sends and receives) and the step schedule, as plain data.

Import the modules themselves (meshsl.plan.nodeplan, meshsl.plan.steps): the step schedule needs no torch,
the per-node plans do."""
