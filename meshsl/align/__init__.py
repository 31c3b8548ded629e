"""Vertical data as it arrives: private set intersection (PSI) on sample ids before training and prediction.

- `ids`: the ids of each data source (csv column or id file), checked; a node's own id set;
- `psi`: openmined-psi's ECDH primitives (blind, reblind);
- `session`: the protocol between the leader, the other data nodes and the nodes without data;
- `runner`: running it inside a node (before training) or for every node in one process;
- `report`: `meshsl align` (overlap per pair of parties) and the plan's alignment step.
"""
