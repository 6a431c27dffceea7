"""Which policy applies to a site: ``policy.json`` in its workspace, else the default here."""

from __future__ import annotations

from pathlib import Path

from policies.schema import SitePolicy, load_policy

POLICY_FILE = "policy.json"


def site_policy_path(ws) -> Path | None:
    p = Path(ws.root) / POLICY_FILE
    return p if p.is_file() else None


def site_policy(ws) -> SitePolicy:
    return load_policy(site_policy_path(ws))
