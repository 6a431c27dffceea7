"""Which policy applies to a site: ``policy.json`` in its workspace, else the default here."""

from __future__ import annotations

from pathlib import Path

from policies.schema import SitePolicy, load_policy

POLICY_FILE = "policy.json"


def site_policy_path(ws) -> Path | None:
    """The workspace's policy file; None when there is none (the default applies). A ``policy.json`` that
    is there but no file (a link to a mount that is down, a folder) is an error, not the default policy."""
    p = Path(ws.root) / POLICY_FILE
    if p.is_file():
        return p
    if p.is_symlink() or p.exists():
        from mllm_dr.errors import InputError

        raise InputError("the site's policy is not a readable file (a dangling link or a folder); the default "
                         "policy does not stand in for it", p)
    return None


def site_policy(ws) -> SitePolicy:
    return load_policy(site_policy_path(ws))
