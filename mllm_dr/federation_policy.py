"""A site's decision on a run, taken on every message of it (handshake, train, evaluate).

The site's policy (policies/) is data; this is where it is enforced for federated runs. A
refusal is audited and binds for the whole run: a later message of a run this site refused
is refused again, whatever changed since.
"""

from __future__ import annotations

from mllm_dr import audit
from mllm_dr.dataset import labelled_training_counts
from mllm_dr.features.store import FeatureStore
from mllm_dr.workspace import Workspace


def check_run(ws: Workspace, run: str, run_policy_json: str, base_sha256: str, message_type: str,
              feature_recipe: str = "", sends_feature_moments: bool = False) -> str | None:
    """None when this site may take part; else the reason (already written to the audit log).

    ``feature_recipe``: the run's (signed run plan / handshake); features extracted otherwise refuse.
    ``sends_feature_moments``: the handshake asks for this site's frame moments (feature-norms federated)."""
    from policies.schema import SitePolicy, join_refusals
    from policies.site import site_policy

    run_policy = SitePolicy.model_validate_json(run_policy_json) if run_policy_json else None
    participants, _ = labelled_training_counts(ws)
    reasons = join_refusals(site_policy(ws), run_policy, base_sha256, participants, sends_feature_moments)
    reasons += [why] if (why := recipe_refusal(ws, feature_recipe)) else []
    if any(e["event"] == "federation_refused" and e.get("run") == run for e in audit.read(ws.audit_path)):
        reasons = reasons or ["this site refused the run earlier; a refusal binds for the whole run"]
    if not reasons:
        return None
    audit.append(ws.audit_path, "federation_refused", run=run, message_type=message_type, reasons=reasons)
    return f"site {ws.config.site_id} refuses run {run}: " + "; ".join(reasons)


def recipe_refusal(ws: Workspace, run_recipe: str) -> str | None:
    """Why this site cannot join a run that names a feature recipe (None: it can)."""
    from mllm_dr.features.extract import store_recipe

    if not run_recipe:
        return None
    have = store_recipe(FeatureStore(ws.features_dir)).name
    if have == run_recipe:
        return None
    return (f"its features were extracted with recipe {have!r}, the run needs {run_recipe!r}; "
            f"run 'mllmdr-site extract --workspace {ws.root} --corpus CORPUS --recipe {run_recipe}' and join again")
