"""`meshsl monitoring ...`: helpers for scraping the nodes' metrics."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from meshsl.cli.common import load, out
from meshsl.launch.metrics import scrape_targets

app = typer.Typer(help="Monitoring helpers (Prometheus targets).", no_args_is_help=True)


@app.command("prometheus")
def monitoring_prometheus(topology: Path = typer.Argument(...),
                          output: Optional[Path] = typer.Option(None, "-o", "--output", help="file_sd JSON path")) -> None:
    """Write Prometheus file_sd scrape targets for every node with a metrics port."""
    topo = load(topology, data=False)  # endpoints and ports only: a run directory's topology has no data beside it
    rows = []
    for name, n in topo.nodes.items():
        if n.metrics_port and not n.inbound:  # behind its firewall: only a Prometheus on its own host reaches it
            print(f"note: {name} dials out; its metrics are served on 127.0.0.1:{n.metrics_port} of its own host "
                  f"(not listed)", file=sys.stderr)
            continue
        if n.metrics_port:
            host = n.endpoint[len("tcp://"):].rsplit(":", 1)[0] if (n.endpoint or "").startswith("tcp://") else "127.0.0.1"
            rows.append((name, n.party, "127.0.0.1" if host in ("*", "0.0.0.0") else host, n.metrics_port))
    text = json.dumps(scrape_targets(rows, topo.spec.name), indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
        out.print(f"wrote {len(rows)} targets to {output}")
    else:
        print(text)
