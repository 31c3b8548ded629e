"""Per-node plans (what each node hosts, sends and receives) and their explanation, as plain data."""
