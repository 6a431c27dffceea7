"""What a site's operator asks first: which center, which round last, how much privacy
spent, which adapters scoring uses, whether teacher rationales are stale. Read from the files
their owners write; no process started (counting stale rationales runs the quote selector)."""

from __future__ import annotations

import json

from mllm_dr import audit
from mllm_dr.errors import InputError, MllmDrError
from mllm_dr.workspace import Workspace, stale_note


def site_status(ws: Workspace) -> dict:
    from mllm_dr.audit_heads import center_heads_path, latest
    from mllm_dr.enrollment import FEDERATION_FILE, federation_settings

    center = None
    if (ws.root / FEDERATION_FILE).is_file():
        fed = federation_settings(ws)
        head = latest(center_heads_path(ws)) if center_heads_path(ws).is_file() else None
        center = {"address": fed.superlink_address, "fingerprint": fed.center_fingerprint,
                  "audit_key": fed.center_audit_key or None, "supernode_port": fed.supernode_port,
                  "last_center_head": f"{head['entries']}:{head['last_hash']}" if head else None}
    stale, not_checked = stale_rationales_or_why_not(ws)
    checked = audit.read_checked(ws.audit_path)
    adapters = adapters_in_use(ws)
    return {"site_id": ws.config.site_id, "center": center, "last_round": last_round(ws, checked),
            "audit_intact": checked[1], "privacy": privacy_spent(ws), "adapters": adapters,
            "stale_teacher_rationales": stale, "stale_teacher_rationales_not_checked": not_checked,
            "warnings": status_warnings(checked, adapters)}


def status_warnings(checked: tuple[list[dict], bool, str], adapters: dict) -> list[str]:
    """Lines the operator must not miss (session 44): an audit log that does not verify (its entries from the
    first bad one are not read: the last round came from a tampered entry), and federated adapters marked
    stale (extract --replace-corpus) that scoring would still take."""
    out = []
    if not checked[1]:
        out.append(f"the audit log does not verify ({checked[2]}); its entries from there on are not used "
                   "('mllmdr-site audit verify')")
    fed = adapters.get("federated") or {}
    if fed.get("stale"):
        out.append(f"the federated adapters in use are stale: {fed['stale']}")
    return out


def stale_rationales_or_why_not(ws: Workspace) -> tuple[int | None, str | None]:
    """(stale teacher rationales, None) by ``dataset.stale_teacher_rationales``, or (None, why they
    could not be counted: a moved corpus, an unreadable record or cache). Counting reads the corpus
    and runs the quote selector (its encoder loads when the workspace's embedding cache is cold);
    the vectors it encodes are saved at once, so a long-lived caller never writes an old cache back."""
    from mllm_dr import evidence
    from mllm_dr.dataset import stale_teacher_rationales

    try:
        stale = stale_teacher_rationales(ws)
        evidence.default_encoder().save_cache()
        return stale, None
    except (MllmDrError, OSError, KeyError, ValueError) as err:
        return None, f"not checked: {err}"


def last_round(ws: Workspace, checked: tuple | None = None) -> dict | None:
    """The last ``federated_round`` this site's audit log records, among its entries that verify (``checked``:
    ``audit.read_checked``'s answer, if read): a tampered entry was reported as the last round (session 44)."""
    for e in reversed((checked or audit.read_checked(ws.audit_path))[0]):
        if e.get("event") == "federated_round" and not e.get("tampered"):
            return {k: e.get(k) for k in ("run", "round", "stage", "time")}
    return None


def privacy_spent(ws: Workspace) -> dict | None:
    """Epsilon spent so far in each DP ledger of the workspace, each at the delta of its charges (``ledgers``:
    ``privacy.ledger_reports``, as `policy show` counts them), whichever policy charged them (a run's DP may
    impose another unit than the site's); the top-level fields are the first ledger's (the site policy's unit
    when it has one), with ``error`` when any ledger's DP rounds are refused. None: no DP round yet."""
    from mllm_dr.privacy import ledger_reports
    from policies.site import site_policy

    dp = site_policy(ws).dp
    reports = ledger_reports(ws.root, dp.delta, dp.unit)
    if not reports:
        return None
    errors = list(dict.fromkeys(r["error"] for r in reports if "error" in r))
    return reports[0] | ({"error": "; ".join(errors)} if errors else {}) | {"ledgers": reports}


def adapter_folders(ws: Workspace):
    """(federated, local): the latest adapters' folders as readers take them (``atomic.settled``: during or after a
    swap cut short, the version set aside in ``latest.old``). Either may not exist."""
    from mllm_dr.atomic import settled
    from mllm_dr.federated import federated_dir
    from mllm_dr.local_run import run_dir

    return settled(federated_dir(ws) / "latest"), settled(run_dir(ws) / "latest")


def auto_adapters(ws: Workspace):
    """What ``--adapters auto`` takes: ("federated", its folder) when a federated version exists, else ("local",
    its folder, which may not exist). The one rule ``status`` and ``cli/site_model.py::adapter_choice`` share:
    status checked ``latest/`` only and said "none" while scoring took ``latest.old`` (a review, session 46)."""
    fed, local = adapter_folders(ws)
    return ("federated", fed) if fed.is_dir() else ("local", local)


def adapters_in_use(ws: Workspace) -> dict:
    """The latest federated and local adapters and which one ``score --adapters auto`` takes (``auto_adapters``)."""
    from mllm_dr.adapters import read_meta
    from mllm_dr.signing import META

    fed_dir, local_dir = adapter_folders(ws)
    fed = None
    if fed_dir.is_dir():
        ck = fed_dir / META
        try:
            meta = json.loads(ck.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            fed = {"version": f"{meta.get('run')}/round-{meta.get('round')}", "run": meta.get("run"),
                   "round": meta.get("round"), "signer": meta.get("signer"), "path": str(fed_dir),
                   "stale": stale_note(fed_dir)}
        except (OSError, ValueError) as err:     # said, as the local adapters' damage is; score refuses it anyway
            why = "missing" if isinstance(err, FileNotFoundError) else f"unreadable ({type(err).__name__})"
            fed = {"version": None, "error": f"{ck}: {why}", "path": str(fed_dir)}
    local = None
    if local_dir.is_dir():
        try:
            meta = read_meta(local_dir)
            local = {"version": meta.get("version"), "base_model": meta.get("base_model"), "path": str(local_dir)}
        except (InputError, OSError, ValueError) as err:
            local = {"version": None, "error": str(err) if isinstance(err, InputError) else
                     f"{local_dir}: adapter_meta.json unreadable ({type(err).__name__})", "path": str(local_dir)}
    kind = auto_adapters(ws)[0]
    in_use = kind if (fed if kind == "federated" else local) else None
    return {"in_use": in_use, "federated": fed, "local": local}
