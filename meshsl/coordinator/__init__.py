"""The coordinator's asyncio shell: drives a run (training, client rounds, recovery, prediction) through the
I/O-free `meshsl.machines.coordinator` and sends what it decides."""
