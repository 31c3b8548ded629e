"""Node runtime: an I/O-free state machine, the asyncio node that executes its actions, the coordinator."""
