"""meshsl benchmark suite: `python -m benchmarks [--quick] [--out FILE.json] [--only SECTION ...]`."""
