"""The node's asyncio shell: frames in -> machine events, machine actions -> sockets, compute off the loop.

`runtime.NodeRuntime` ties together the inbox, the control channel, presence (heartbeats), the compute lane,
peer outboxes, checkpoints, a warm standby and the alignment (PSI) step run before training."""
