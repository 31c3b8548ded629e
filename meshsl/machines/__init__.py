"""The I/O-free state machines: events in, actions out. Importable without torch or sockets (a test checks).

- `node`: one node's round (what to compute, send, commit); `stale`: rounds in flight under bounded staleness;
- `policies`: the coordinator's pure decisions (who takes part, when a run is lost);
- `coordinator`, `coordinator_plan`, `coordinator_summary`: the coordinator's run state and its books;
- `liveness`, `commit_book`: heartbeats and committed steps."""
