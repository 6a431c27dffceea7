"""A site's decision on a run, taken on every message of it (handshake, train, evaluate).

The site's policy (policies/) is data; this is where it is enforced for federated runs. A
refusal is audited and binds for the whole run: a later message of a run this site refused
is refused again, whatever changed since. The run's own policy is pinned at the first message
of it the site accepts (``federation/run_policies.json``): a later message carrying another is
refused (and that refusal binds too).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mllm_dr import audit
from mllm_dr.atomic import atomic_write_text, file_lock
from mllm_dr.dataset import labelled_training_counts
from mllm_dr.errors import InputError
from mllm_dr.features.store import FeatureStore
from mllm_dr.workspace import Workspace


def check_run(ws: Workspace, run: str, run_policy_json: str, base_sha256: str, message_type: str,
              feature_recipe: str = "", feature_norms: str | None = None) -> str | None:
    """None when this site may take part; else the reason (already written to the audit log).

    ``feature_recipe``: the run's (signed run plan / handshake); features extracted otherwise refuse.
    ``feature_norms``: the run's feature normalisation (handshake, signed run spec; None: not said here):
    ``federated`` asks for this site's frame moments, ``site`` scales each patient by all of them."""
    from policies.schema import join_refusals
    from policies.site import site_policy

    run_policy, unreadable = read_run_policy(run_policy_json)
    participants, _ = labelled_training_counts(ws)
    mine = site_policy(ws)
    reasons = [unreadable] if unreadable else join_refusals(mine, run_policy, base_sha256, participants,
                                                            feature_norms)
    reasons += [why] if (why := moments_refusal(ws, mine, feature_norms)) else []
    reasons += [why] if (why := recipe_refusal(ws, feature_recipe)) else []
    digest = hashlib.sha256(run_policy_json.encode("utf-8")).hexdigest()
    with file_lock(_pins_path(ws)):       # two runs' first messages at once: neither pin may drop the other
        pinned = run_policy_pins(ws)
        if pinned.get(run, digest) != digest:
            reasons.append(f"the run's policy differs from the one it announced at its first message here "
                           f"(sha256 {pinned[run][:12]}..., now {digest[:12]}...): what this site sent was decided "
                           f"under that one")
        if any(e["event"] == "federation_refused" and e.get("run") == run for e in audit.read(ws.audit_path)):
            reasons = reasons or ["this site refused the run earlier; a refusal binds for the whole run"]
        if not reasons:
            if run not in pinned:     # the first message of the run this site accepts pins its policy
                atomic_write_text(_pins_path(ws), json.dumps(pinned | {run: digest}, indent=1, sort_keys=True))
            return None
    return refuse_run(ws, run, message_type, reasons)


def refuse_run(ws: Workspace, run: str, message_type: str, reasons: list[str]) -> str:
    """Record that this site refuses ``run`` (``federation_refused``: ``check_run`` holds to it on every later
    message of the run) and return the reason the center reads."""
    audit.append(ws.audit_path, "federation_refused", run=run, message_type=message_type, reasons=reasons)
    return f"site {ws.config.site_id} refuses run {run}: " + "; ".join(reasons)


def read_run_policy(run_policy_json: str):
    """(the run's policy or None for the default, None) when this site can read it; else (None, why not):
    a key this kit does not know (a newer center's), a bad value."""
    from pydantic import ValidationError

    from policies.schema import SitePolicy, invalid_because

    try:
        return (SitePolicy.model_validate_json(run_policy_json) if run_policy_json else None), None
    except ValidationError as err:
        return None, f"this site cannot read the run's policy ({invalid_because(err)})"


def moments_refusal(ws: Workspace, policy, feature_norms: str | None) -> str | None:
    """Why this site (``policy``: its own) cannot send the frame moments a ``feature-norms = federated`` run
    asks for: its egress allow-list lacks their names (``fm-*``; None: it can). Decided here, with the other
    refusals: the egress guard used to block the handshake reply after the run was accepted and pinned,
    so the run's training messages were taken (a site-path review, session 43)."""
    import torch

    from mllm_dr.federated import site_dims
    from mllm_dr.protocol import HandshakeReply, moments_record

    if feature_norms != "federated":
        return None
    # the wire names of every moment this site could send (``site_moments`` may still withhold a modality)
    sendable = moments_record({m: (0, torch.zeros(d), torch.zeros(d)) for m, d in site_dims(ws).items()})
    prefix = HandshakeReply.prefixed["moments"]
    blocked = [prefix + k for k in sendable if not policy.egress.metric_allowed(prefix + k)]
    if not blocked:
        return None
    return (f"feature-norms=federated asks for the site's frame moments, and its policy's egress metric_names do not "
            f"allow {len(blocked)} of their names ({', '.join(blocked[:3])}{', ...' if len(blocked) > 3 else ''}); "
            f"allow 'fm-*', or join runs with feature-norms site or participant")


def release_floor(ws: Workspace, run_policy_json: str) -> int:
    """Fewest participants behind statistics this site may release in a run: its own policy's floor, or
    the run's when that is higher (``SitePolicy.min_release_participants``)."""
    from policies.schema import SitePolicy
    from policies.site import site_policy

    return site_policy(ws).release_floor(SitePolicy.model_validate_json(run_policy_json) if run_policy_json else None)


def _pins_path(ws: Workspace) -> Path:
    return ws.root / "federation" / "run_policies.json"


def run_policy_pins(ws: Workspace) -> dict[str, str]:
    """run -> sha256 of the run policy this site accepted at the run's first message (a run's policy
    may not change under a site mid-run: the center keeps its plan too, fl_server/plan.py::RESUMABLE)."""
    path = _pins_path(ws)
    if not path.is_file():
        return {}
    try:
        pins = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"not readable ({err})", path) from None
    if not isinstance(pins, dict):
        raise InputError("not a run -> policy digest map", path)
    return pins


def recipe_refusal(ws: Workspace, run_recipe: str) -> str | None:
    """Why this site cannot join a run that names a feature recipe (None: it can)."""
    from mllm_dr.features.extract import store_recipe

    if not run_recipe:
        return None
    have = store_recipe(FeatureStore(ws.features_dir)).name
    if have == run_recipe:
        return None
    return (f"its features were extracted with recipe {have!r}, the run needs {run_recipe!r}; "
            f"run 'mllmdr-site extract --workspace WORKSPACE --corpus CORPUS --recipe {run_recipe}', then join the "
            f"center's next run (a refusal binds for the whole run)")
