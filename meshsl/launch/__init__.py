"""Starting things: node processes on this machine (`launcher`), one node's process (`entry`), whole runs in
one process (`simulate`, `ray_engine`), checks before start (`preflight`) and the Prometheus metrics."""
