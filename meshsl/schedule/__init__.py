"""Which rows each training step uses (`steps`) and the privacy budget those steps spend (`accounting`).
Needs the spec and the data only: no torch, no topology graph."""
