"""The deployment files of a site's kit: a compose file, a systemd unit, example policy and catalogue, and a
README. Text only: `kit.provision` writes and signs them."""
from __future__ import annotations

from meshsl.apps.sites.specs import ProjectSite, ProjectSpec

STATE = "/var/lib/meshsl"


def _port(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[-1]


def compose_file(project: ProjectSpec, site: ProjectSite, hosts_broker: bool) -> str:
    command = ["site", "start", "--kit", "/kit", "--state", STATE, "--catalogue", "/data/catalogue.yaml"] + (["--host-broker"] if hosts_broker else [])
    lines = [
        f"# {project.name}: the site {site.name} ({site.party}). Run from this kit's folder:",
        "#   podman-compose up -d      (or docker compose up -d)",
        "# ./state holds the site's keys (make them first: see README.md), jobs, checkpoints and weights;",
        "# ./data holds the files its catalogue names. Nothing in ./state leaves this machine.",
        "services:",
        f"  {site.name}:",
        f"    image: {project.image}",
        f"    command: {command}".replace("'", '"'),
        '    volumes: ["./:/kit:ro", "./state:/var/lib/meshsl", "./data:/data:ro"]',
        "    restart: unless-stopped",
    ]
    if hosts_broker:
        lines.append(f'    ports: ["{_port(project.broker.endpoint)}:{_port(project.broker.endpoint)}"]')
    return "\n".join(lines) + "\n"


def systemd_unit(project: ProjectSpec, site: ProjectSite, hosts_broker: bool) -> str:
    broker = " --host-broker" if hosts_broker else ""
    return f"""# {project.name}: the site agent of {site.name}. Install:
#   cp meshsl-site.service /etc/systemd/system/ && cp -r . /etc/meshsl/kit && systemctl enable --now meshsl-site
[Unit]
Description=meshsl site agent {site.name} (project {project.name})
After=network-online.target
Wants=network-online.target

[Service]
User=meshsl
Group=meshsl
# /var/lib/meshsl: keys, jobs, checkpoints and weights, created for User= by systemd
StateDirectory=meshsl
StateDirectoryMode=0700
WorkingDirectory=/var/lib/meshsl
ExecStart=/opt/meshsl/.venv/bin/meshsl --log-level INFO site start --kit /etc/meshsl/kit --state /var/lib/meshsl{broker}
Restart=on-failure
# exit 2: a tampered kit, a bad policy or catalogue; restarting would fail the same way
RestartPreventExitStatus=2
RestartSec=5
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
ReadWritePaths=/var/lib/meshsl

[Install]
WantedBy=multi-user.target
"""


def example_policy(project: ProjectSpec, site: ProjectSite) -> str:
    others = [s.party for s in project.sites if s.name != site.name]
    return f"""# {site.name}'s policy: copy to {STATE}/policy.yaml and edit. Anything not allowed here is refused.
parties: {others}
sources:
  example_features:                 # a name from catalogue.yaml
    forbid_columns: []              # columns no job may read
labels_may_leave: false             # gradients sent back must carry a defence (or the job label DP)
required_defences: []               # nopeek, dp, gradient: on every cut edge leaving this site
max_runtime_s: 3600
approval: operator                  # auto, or operator: `meshsl site approve JOB`
release: [metrics]                  # what the submitter receives: metrics, logs
""".replace("'", "")


EXAMPLE_CATALOGUE = f"""# The data this site offers, by name: copy to {STATE}/catalogue.yaml. Paths are relative to this file.
# A job names an entry (dataset: {{name: catalogue, options: {{entry: example_features, ...}}}}), never a path.
sources:
  example_features:
    dataset: {{name: csv, options: {{path: /data/features.csv, id_column: id}}}}
"""


def readme(project: ProjectSpec, site: ProjectSite, hosts_broker: bool) -> str:
    role = " It also hosts the project's broker." if hosts_broker else ""
    return f"""# Start-up kit: site {site.name} of project {project.name}

This kit lets {site.name} (party {site.party}) take part in {project.name}'s jobs.{role} Every file is
listed with its SHA-256 in MANIFEST.json, signed by the project's provisioner: the site refuses to start
if any file was changed, added or removed. The kit holds no secret key: your keys were made on your
machine (`meshsl site init`) and never left it.

1. Your data: copy catalogue.example.yaml to {STATE}/catalogue.yaml and name your files there.
2. Your rules: copy policy.example.yaml to {STATE}/policy.yaml. Jobs that break it are refused with the
   reason; with `approval: operator`, jobs wait for `meshsl site approve JOB --state {STATE}`.
3. Start: `podman-compose up -d` (compose.yaml), or the systemd unit meshsl-site.service, or
   `meshsl site start --kit . --state {STATE}`.
   The site dials out to the broker at {project.broker.endpoint}; it opens no port{' but the broker' + chr(39) + 's' if hosts_broker else ''}.
4. See jobs: `meshsl site jobs --state {STATE}`. Trained weights stay in {STATE}/jobs/JOB/weights.
"""


def kit_files(project: ProjectSpec, site: ProjectSite, hosts_broker: bool) -> dict[str, str]:
    return {"compose.yaml": compose_file(project, site, hosts_broker),
            "meshsl-site.service": systemd_unit(project, site, hosts_broker),
            "policy.example.yaml": example_policy(project, site),
            "catalogue.example.yaml": EXAMPLE_CATALOGUE,
            "README.md": readme(project, site, hosts_broker)}
