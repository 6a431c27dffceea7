"""ClientApp: what runs at a site for each message from the center.

A thin shell over ``mllm_dr.federated``: verify the center's signature and the base model,
train or evaluate locally, answer with adapter tensors (train) or sufficient statistics
(evaluate). The workspace comes from the SuperNode's ``--node-config``, never from the
run config, so the center cannot point a site at another folder.
"""

from __future__ import annotations

import json
import os

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.egress import egress_guard
from fl_client.privacy_mod import dp_mod

app = ClientApp()


REFUSED = 4033   # error code: the site's policy forbids taking part in this run (reason in the error)


def _refusal(ws, cfg, run: str, base_sha256: str, message_type: str) -> str | None:
    """The site's policy decides for every message of a run (handshake, train, evaluate), not only
    at the handshake, and a refusal binds for the whole run (a later message of a run this site
    refused is refused again, whatever changed since). None = may go on; else the reason."""
    from mllm_dr import audit
    from mllm_dr.dataset import labelled_training_instances
    from policies.schema import SitePolicy, join_refusals
    from policies.site import site_policy

    raw = str(cfg.get("policy", "") or "")
    run_policy = SitePolicy.model_validate_json(raw) if raw else None
    participants = len({i.participant for i in labelled_training_instances(ws)})
    reasons = join_refusals(site_policy(ws), run_policy, base_sha256, participants)
    if any(e["event"] == "federation_refused" and e.get("run") == run for e in audit.read(ws.audit_path)):
        reasons = reasons or ["this site refused the run earlier; a refusal binds for the whole run"]
    if not reasons:
        return None
    audit.append(ws.audit_path, "federation_refused", run=run, message_type=message_type, reasons=reasons)
    return f"site {ws.config.site_id} refuses run {run}: " + "; ".join(reasons)


def _site(context: Context):
    import torch

    from mllm_dr.enrollment import federation_settings
    from mllm_dr.workspace import Workspace

    torch.set_num_threads(max(int(os.environ.get("OMP_NUM_THREADS", 1)), 1))
    ws = Workspace(str(context.node_config["workspace"]))
    return ws, federation_settings(ws)


def _verified_global(msg: Message, fed):
    """The global tensors and signed context, only if the center's signature verifies."""
    from mllm_dr.signing import load_public, verify_state

    cfg = msg.content["config"]
    ctx = json.loads(str(cfg["context"]))
    state = {k: v.clone() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    verify_state(load_public(fed.center_public_key), state, ctx, str(cfg["signature"]),
                 f"round {ctx.get('round')} global adapters")
    return state, ctx, cfg


def _session(ws, context: Context, ctx: dict):
    from mllm_dr.federated import RunSpec, SiteSession

    base = context.node_config.get("base-model")
    rank = context.node_config.get("lora-rank")
    return SiteSession(ws, RunSpec.from_context(ctx), str(base) if base else None, int(rank) if rank else None)


def _keep_global(ws, state: dict, ctx: dict, signature: str) -> None:
    """Keep the verified global adapters on site, as signed by the center, for local scoring."""
    from mllm_dr.federated import federated_dir
    from mllm_dr.signing import store_signed

    store_signed(federated_dir(ws) / "latest", state, ctx | {"signature": signature})


@app.query(mods=[egress_guard])
def handshake(msg: Message, context: Context) -> Message:
    """Before round 1: does this site have the run's base model, which feature widths, how many examples."""
    from mllm_dr import audit
    from mllm_dr.base_model import base_info
    from mllm_dr.dataset import labelled_training_instances
    from mllm_dr.errors import ModelMismatchError
    from mllm_dr.federated import site_dims

    ws, fed = _site(context)
    cfg = msg.content["config"]
    spec = str(context.node_config.get("base-model") or cfg["base-model"])
    info = base_info(spec)
    if info.sha256 != str(cfg["base-sha256"]):
        raise ModelMismatchError(f"site {ws.config.site_id}: base model {spec!r} has sha256 {info.sha256[:12]}..., "
                                 f"the run expects {str(cfg['base-sha256'])[:12]}...")
    refused = _refusal(ws, cfg, str(cfg["run"]), info.sha256, "query")
    if refused:
        return Message(Error(code=REFUSED, reason=refused), reply_to=msg)
    n = len(labelled_training_instances(ws))
    audit.append(ws.audit_path, "federation_join", run=str(cfg["run"]), base_sha256=info.sha256,
                 center=fed.center_fingerprint)
    metrics = MetricRecord({"num-examples": n, **{f"dim-{m}": d for m, d in site_dims(ws).items()}})
    return Message(RecordDict({"metrics": metrics, "config": ConfigRecord({"site-id": ws.config.site_id})}),
                   reply_to=msg)


@app.train(mods=[egress_guard, dp_mod])     # egress_guard is outermost: it sees the reply last
def train(msg: Message, context: Context) -> Message:
    from mllm_dr import audit
    from mllm_dr.training import TrainConfig

    ws, fed = _site(context)
    state, ctx, cfg = _verified_global(msg, fed)
    refused = _refusal(ws, cfg, ctx["run"], ctx["base_sha256"], "train")
    if refused:
        return Message(Error(code=REFUSED, reason=refused), reply_to=msg)
    _keep_global(ws, state, ctx, str(cfg["signature"]))
    session = _session(ws, context, ctx)
    session.load_global(state)
    f = float(cfg["lr-factor"])
    tc = TrainConfig(batch_size=int(cfg["batch-size"]), lr_lq=float(cfg["lr-lq"]) * f, lr_lora=float(cfg["lr-lora"]) * f,
                     lr_maa=float(cfg["lr-maa"]) * f, seed=int(ctx["round"]))
    stage = int(cfg["train-stage"])
    update, n, stats = session.train_round(stage, int(cfg["local-epochs"]), tc)
    out = ArrayRecord.from_torch_state_dict(update)
    bytes_out = sum(t.numel() * t.element_size() for t in update.values())
    audit.append(ws.audit_path, "federated_round", run=ctx["run"], round=int(cfg["train-round"]), stage=stage,
                 verified_global_round=ctx["round"], center=fed.center_fingerprint, tensors=len(update),
                 tensor_names=sorted(update),
                 bytes_out=bytes_out, examples=n)
    metrics = MetricRecord({"num-examples": n, "train-loss": stats.get("loss", 0.0), "lm-loss": stats.get("lm_loss", 0.0),
                            "mse": stats.get("mse", 0.0), "lora-scaling": session.opts.lora_alpha / session.opts.lora_r,
                            "bytes-out": bytes_out})
    return Message(RecordDict({"arrays": out, "metrics": metrics,
                               "config": ConfigRecord({"site-id": ws.config.site_id})}), reply_to=msg)


@app.evaluate(mods=[egress_guard])
def evaluate(msg: Message, context: Context) -> Message:
    """Sufficient statistics of the site's held-out totals: never a per-patient value."""
    from mllm_dr import audit

    ws, fed = _site(context)
    state, ctx, cfg = _verified_global(msg, fed)
    refused = _refusal(ws, cfg, ctx["run"], ctx["base_sha256"], "evaluate")
    if refused:
        return Message(Error(code=REFUSED, reason=refused), reply_to=msg)
    _keep_global(ws, state, ctx, str(cfg["signature"]))
    if not bool(cfg.get("evaluate", True)):   # the final global, delivered for local scoring only
        audit.append(ws.audit_path, "federated_final", run=ctx["run"], round=ctx["round"], center=fed.center_fingerprint)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0}),
                                   "config": ConfigRecord({"site-id": ws.config.site_id})}), reply_to=msg)
    session = _session(ws, context, ctx)
    session.load_global(state)
    from mllm_dr.reports import write_report
    from mllm_dr.metrics import compute

    split = str(cfg.get("split", "test"))
    stats, violations, items, rows = session.evaluate(split, int(cfg.get("max-new-tokens", 60)))
    report = write_report(ws.root / "reports" / f"federated-{ctx['run']}-{split}.md",
                          compute(stats) | {"format_violation_rate": violations / items if items else 0.0}, rows,
                          f"{ws.config.site_id}: {split} split, federated run {ctx['run']} round {ctx['round']}")
    audit.append(ws.audit_path, "federated_evaluation", run=ctx["run"], round=ctx["round"], participants=stats.n,
                 center=fed.center_fingerprint, report=str(report))
    metrics = MetricRecord({"num-examples": stats.n, **{f"ss-{k}": float(v) for k, v in stats.to_dict().items()},
                            "format-violations": violations, "items": items})
    return Message(RecordDict({"metrics": metrics, "config": ConfigRecord({"site-id": ws.config.site_id})}),
                   reply_to=msg)
