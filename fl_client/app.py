"""ClientApp: what runs at a site for each message from the center.

A thin shell over ``mllm_dr``: decode the message (``mllm_dr.protocol``), check the site's
policy (a refusal binds for the whole run), verify the center's signature, train or evaluate
with ``mllm_dr.federated.SiteSession``, answer with adapter tensors (train) or sufficient
statistics (evaluate). The workspace comes from the SuperNode's ``--node-config``, never from
the run config, so the center cannot point a site at another folder.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.egress import egress_guard
from fl_client.head_mod import head_mod
from fl_client.privacy_mod import charged_dp, dp_mod
from fl_client.secagg_mod import key_store, secagg_mod
from fl_client.uplink_mod import uplink_mod
from fl_client.wire_mod import wire_mod

app = ClientApp()

# Mods, outermost first. wire_mod only unpacks the center's tensors and packs the reply's
# (fl_server/wire.py); head_mod signs the audit head after every entry about the reply is written, the
# egress guard's included (it settles the round's DP accounting: dp_refund, dp_unprotected_round), and puts
# the reply as it leaves, head and all, through the guard's checks again; egress_guard sees the reply by
# tensor name, encoded or masked; site-level DP noise goes in before encoding or masking (a compressed uplink
# and masking never meet: uplink_mod refuses masked rounds)
QUERY_MODS = [head_mod, egress_guard]
TRAIN_MODS = [wire_mod, head_mod, egress_guard, uplink_mod, secagg_mod, dp_mod]
EVALUATE_MODS = [wire_mod, head_mod, egress_guard]
LOADED = time.time()   # Flower imports this module after pulling the message and installing the app


def _site(context: Context):
    import torch

    from mllm_dr.enrollment import federation_settings
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.workspace import Workspace

    torch.set_num_threads(max(int(os.environ.get("OMP_NUM_THREADS", 1)), 1))
    ws = Workspace(node_workspace(context.node_config))
    return ws, federation_settings(ws)


def _reply(msg: Message, ws, metrics: dict, arrays: dict | None = None, config: dict | None = None) -> Message:
    """Every reply names the site; its signed audit head (kept by the center) is added by ``head_mod``,
    after the mods have written their entries about it."""
    from mllm_dr.protocol import SiteId

    site = SiteId(site_id=ws.config.site_id)
    content = {"metrics": MetricRecord(metrics), "config": ConfigRecord(site.to_record() | (config or {}))}
    if arrays is not None:
        content["arrays"] = ArrayRecord.from_torch_state_dict(arrays)
    return Message(RecordDict(content), reply_to=msg)


def _base_refused(msg: Message, ws, context: Context, run: str, center_base: str) -> Message | None:
    """The error reply (for this message only: the handshake is unsigned, and the cure is the site's own
    ``--base-model``, after which the same run is accepted) when this site would read the center's base-model name as a path:
    only the kit's named bases (``EMBEDDED``) come from the center; a local model folder is the site's own
    choice, in its SuperNode's node config (``mllmdr-site train --federated --base-model PATH``). Until session
    45 the handshake's unsigned string was hashed and loaded as a folder of the site's disk. A rehearsal's
    virtual node (no workspace in its node config) runs at the center, with the center's own folder."""
    from mllm_dr import audit
    from mllm_dr.base_model import EMBEDDED
    from mllm_dr.protocol import REFUSED

    if context.node_config.get("base-model") or center_base in EMBEDDED or "workspace" not in context.node_config:
        return None
    why = (f"the run's base model {center_base[:80]!r} is none of the kit's named bases ({', '.join(EMBEDDED)}); a "
           "local model folder is named by the site (mllmdr-site train --federated --base-model PATH)")
    audit.append(ws.audit_path, "federation_base_refused", run=run, message_type=msg.metadata.message_type,
                 reason=why)
    return Message(Error(code=REFUSED, reason=f"site {ws.config.site_id} refuses this message of run {run}: {why}"),
                   reply_to=msg)


def _refused(msg: Message, ws, run: str, policy: str, base_sha256: str, feature_recipe: str = "",
             feature_norms: str | None = None) -> Message | None:
    """The error reply when the site's policy refuses this run (checked on every message), else None."""
    from mllm_dr.federation_policy import check_run
    from mllm_dr.protocol import REFUSED

    reason = check_run(ws, run, policy, base_sha256, msg.metadata.message_type, feature_recipe, feature_norms)
    return Message(Error(code=REFUSED, reason=reason), reply_to=msg) if reason else None


@dataclass
class Accepted:
    """A train/evaluate message this site accepted: the signature verified, the policy allows the run
    (and, for the run's final evaluation step, the global kept on site, as signed, for local scoring)."""

    ws: object
    fed: object
    instruction: object
    state: dict
    ctx: dict


def _accept(msg: Message, context: Context, kind) -> Accepted | Message:
    """Decode, verify the center's signature, check the policy; else the error reply. The global of the
    run's final step (the evaluation message, which every run sends once, last) becomes what this site
    scores with (``federated/latest``); a training round's global never does (a site-path review, session
    41: round 1 of the next run, a random LQ-former and a zero B, replaced the last run's final adapters
    for every `score --adapters auto`)."""
    from mllm_dr.federated import RunSpec, federated_dir, final_site_files
    from mllm_dr.protocol import EvaluateInstruction, run_name
    from mllm_dr.signing import load_public, store_signed, verify_state

    ws, fed = _site(context)
    instruction = kind.from_record(msg.content["config"])
    ctx = json.loads(instruction.context)
    state = {k: v.clone() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    verify_state(load_public(fed.center_public_key), state, ctx, instruction.signature,
                 f"round {ctx.get('round')} global adapters")
    run_name(ctx.get("run"))          # it names this site's files (reports, keys): never a path of the center's
    refused = _base_refused(msg, ws, context, ctx["run"], str(ctx.get("base_model", "")))
    if refused:
        return refused
    refused = _refused(msg, ws, ctx["run"], instruction.policy, ctx["base_sha256"], ctx.get("feature_recipe", ""),
                       RunSpec.from_context(ctx).feature_norms_kind())
    if refused:
        return refused
    refused = _keep_center_head(msg, ws, instruction, ctx)
    if refused:
        return refused
    if kind is EvaluateInstruction:     # signer: the center key it verified with (status showed null, session 44)
        store_signed(federated_dir(ws) / "latest", state, ctx | {"signature": instruction.signature,
                                                                 "signer": fed.center_fingerprint},
                     final_site_files(ws, RunSpec.from_context(ctx)))
        _end_of_run(ws, ctx["run"])
    return Accepted(ws, fed, instruction, state, ctx)


def _end_of_run(ws, run: str) -> None:
    """The run's final step: what this site kept for its next rounds goes (the uplink's error-feedback
    residual, unused secure-aggregation keys). They outlived the run, and a later run of the same name (a
    new center's) added the old residual to its first update (a site-path review, session 43)."""
    from fl_client.secagg_mod import key_store
    from mllm_dr.uplink import pending_path, residual_path

    residual_path(ws.root, run).unlink(missing_ok=True)
    pending_path(residual_path(ws.root, run)).unlink(missing_ok=True)
    key_store(ws).drop(run)


def _keep_center_head(msg: Message, ws, instruction, ctx: dict) -> Message | None:
    """Keep the center's signed audit head; one that does not verify or goes backwards is refused for the whole
    run. A message without one is audited; under a policy with ``require_center_audit_head`` it is refused for
    the whole run. Both refusals write ``federation_refused``, which ``check_run`` holds to on every later
    message of the run."""
    from mllm_dr import audit, audit_heads
    from mllm_dr.federation_policy import refuse_run
    from mllm_dr.protocol import HEAD_REFUSED, REFUSED
    from policies.site import site_policy

    head = None
    try:
        head = audit_heads.from_wire(instruction.audit_head)
        if head is None:
            audit.append(ws.audit_path, "center_audit_head_missing", run=ctx["run"], round=ctx.get("round"))
            if not site_policy(ws).require_center_audit_head:
                return None
            why = "the center's message carries no signed audit head and this site's policy requires one"
            return Message(Error(code=REFUSED, reason=refuse_run(ws, ctx["run"], msg.metadata.message_type, [why])),
                           reply_to=msg)
        audit_heads.record_center_head(ws, head, run=ctx["run"], round=ctx.get("round"))
    except audit.HeadError as err:
        audit.append(ws.audit_path, "center_audit_head_refused", run=ctx["run"], round=ctx.get("round"),
                     reason=str(err))
        why = f"the center's audit head was refused: {err}"
        if head is not None and audit_heads.behind_own_run(ws, head, ctx["run"]):
            # binding: a later, larger head of the run was accepted as if the cut had never been seen (a site-path
            # review, session 45); only for the run's own heads: an older head than another run's is no cut
            why = refuse_run(ws, ctx["run"], msg.metadata.message_type, [why])
        return Message(Error(code=HEAD_REFUSED, reason=why), reply_to=msg)
    return None


def _session(ws, context: Context, ctx: dict, state: dict, own_rank: bool = True):
    """This site's model for the run, with the global adapters loaded: at the node's own LoRA rank to train
    (``own_rank``), else at the run's. The final evaluation scores the run's model as every site deploys it
    (scoring loads the full-rank global): at its own rank a site evaluated a truncation of it, up to ~70% of
    the product's norm away (an aggregation review, session 45)."""
    from mllm_dr.federated import RunSpec, SiteSession

    base, rank = context.node_config.get("base-model"), context.node_config.get("lora-rank")
    rank = int(rank) if rank and own_rank else None
    session = SiteSession(ws, RunSpec.from_context(ctx), str(base) if base else None, rank)
    session.load_global(state)
    return session


@app.query(mods=QUERY_MODS)
def handshake(msg: Message, context: Context) -> Message:
    """Before round 1: does this site have the run's base model, which feature widths, how many examples
    (and, when the run normalises features over every site, this site's frame moments: sums, no frame)."""
    from mllm_dr import audit
    from mllm_dr.base_model import base_info
    from mllm_dr.dataset import labelled_training_counts
    from mllm_dr.errors import ModelMismatchError
    from mllm_dr.federated import site_dims, site_moments
    from mllm_dr.federation_policy import release_floor
    from mllm_dr.protocol import HandshakeQuery, HandshakeReply, moments_record

    ws, fed = _site(context)
    q = HandshakeQuery.from_record(msg.content["config"])
    refused = _base_refused(msg, ws, context, q.run, q.base_model)    # before anything reads the name
    if refused:
        return refused
    spec = str(context.node_config.get("base-model") or q.base_model)
    info = base_info(spec)
    if info.sha256 != q.base_sha256:
        # what the center reads: the hashes, never the site's own path to its copy (a node-config base-model)
        raise ModelMismatchError(f"site {ws.config.site_id}: its copy of base model {q.base_model!r} has sha256 "
                                 f"{info.sha256[:12]}..., the run expects {q.base_sha256[:12]}...")
    refused = _refused(msg, ws, q.run, q.policy, info.sha256, q.feature_recipe, q.feature_norms)
    if refused:
        return refused
    # a modality fewer participants have than the release floor is withheld (site_moments)
    moments = moments_record(site_moments(ws, floor=release_floor(ws, q.policy), run=q.run)) if q.send_moments else {}
    audit.append(ws.audit_path, "federation_join", run=q.run, base_sha256=info.sha256, center=fed.center_fingerprint,
                 feature_moments_sent=bool(moments))
    reply = HandshakeReply(num_examples=labelled_training_counts(ws)[1], dims=site_dims(ws), moments=moments)
    return _reply(msg, ws, reply.to_record())


@app.query("secagg", mods=QUERY_MODS)
def secagg_keys(msg: Message, context: Context) -> Message:
    """Before a masked round: a fresh X25519 key pair for (run, round); the private key stays on site."""
    from mllm_dr import audit
    from fl_client.privacy_mod import budget_refusal
    from mllm_dr.protocol import BUDGET_SPENT, SecAggKeysQuery, SecAggKeysReply

    ws, fed = _site(context)
    q = SecAggKeysQuery.from_record(msg.content["config"])
    refused = _refused(msg, ws, q.run, q.policy, q.base_sha256)
    if refused:
        return refused
    spent = budget_refusal(ws, q.policy, q.local_epochs or 1)
    if spent:               # out of this round's roster, not in it and then failing the round for every site
        audit.append(ws.audit_path, "privacy_budget_spent", run=q.run, round=q.round, at="secagg key exchange")
        return Message(Error(code=BUDGET_SPENT, reason=spent), reply_to=msg)
    public = key_store(ws).new(q.run, q.round)
    audit.append(ws.audit_path, "secagg_keys", run=q.run, round=q.round, public_key=public,
                 center=fed.center_fingerprint)
    return _reply(msg, ws, {}, config=SecAggKeysReply(public_key=public).to_record())


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    from mllm_dr import audit
    from mllm_dr.adapters import state_bytes
    from mllm_dr.config import TrainConfig
    from mllm_dr.federation_policy import release_floor
    from mllm_dr.protocol import TrainInstruction, TrainReply, stats_record
    from mllm_dr.rehearsal import rehearse_dropout
    import psutil

    entered = time.time()
    a = _accept(msg, context, TrainInstruction)
    if isinstance(a, Message):
        return a
    ws, fed, t, ctx = a.ws, a.fed, a.instruction, a.ctx
    rehearse_dropout(context.node_config, ws.config.site_id, t.round)   # only under `mllmdr-center simulate`
    accepted = time.time()
    session = _session(ws, context, ctx, a.state)
    built = time.time()
    cfg = TrainConfig(batch_size=t.batch_size, lr_lq=t.lr_lq * t.lr_factor, lr_lora=t.lr_lora * t.lr_factor,
                      lr_maa=t.lr_maa * t.lr_factor, lr_schedule="constant",  # the round sets the schedule
                      score_weight=t.score_weight, proximal_mu=t.proximal_mu, local_steps=t.local_steps,
                      # local steps continue the stage's one stream of epochs (training.step_window): one seed
                      seed=0 if t.local_steps else int(ctx["round"]))
    # evaluate, then fit: the check is of the global this round starts from (the last round's aggregate),
    # never of this site's own model after local training (that would show each site's fit, not the global's)
    check = session.validate().stats if t.round_validation else None
    validation = stats_record(check) if check is not None and check.n >= release_floor(ws, t.policy) else {}
    started = time.time()
    dp, charged_steps = charged_dp(context)        # the mechanism dp_mod charged the ledger for, as it was
    update, n, stats = session.train_round(t.stage, t.local_epochs, cfg, dp=dp, first_step=t.first_step)
    if dp is not None and stats.get("steps") != charged_steps:   # the epsilon reported is of the charged steps
        raise RuntimeError(f"patient-level DP: the round took {stats.get('steps')} steps, {charged_steps} were "
                           f"charged to the privacy ledger; nothing of it is sent")
    seconds = time.time() - started
    # where this message's time went (stays in the site's log: the round overhead's parts)
    started_process = psutil.Process().create_time()
    # the center built the message -> Flower started this process (the center's push, the SuperNode's pull;
    # on one machine's clock: across machines it also holds their clock difference)
    phases = {"delivery": started_process - msg.metadata.created_at,
              "process": LOADED - started_process,   # Flower starts a process per message
              "mods": entered - LOADED,          # this app's import, then the mods up to this handler
              "accept": accepted - entered, "model": built - accepted, "validation": started - built,
              "train": seconds}
    audit.append(ws.audit_path, "federated_round", run=ctx["run"], round=t.round, stage=t.stage,
                 verified_global_round=ctx["round"], center=fed.center_fingerprint, tensors=len(update),
                 tensor_names=sorted(update), bytes_out=state_bytes(update), examples=n, steps=stats.get("steps"),
                 seconds={k: round(v, 2) for k, v in phases.items()},
                 # what stage 2 trained on (teacher / extractive / over-long replaced): a site training on the
                 # extractive rationales alone is told so in its own log (session 46; never sent)
                 **({"rationale_sources": session.rationale_sources()} if t.stage == 2 else {}))
    reply = TrainReply(num_examples=n, train_loss=stats.get("loss", 0.0), lm_loss=stats.get("lm_loss", 0.0),
                       mse=stats.get("mse", 0.0), lora_scaling=session.config.lora.scaling,
                       bytes_out=state_bytes(update), train_seconds=seconds, validation=validation)
    return _reply(msg, ws, reply.to_record(), update)


@app.evaluate(mods=EVALUATE_MODS)
def evaluate(msg: Message, context: Context) -> Message:
    """Sufficient statistics of the site's held-out totals: never a per-patient value."""
    from mllm_dr import audit
    from mllm_dr import phq
    from mllm_dr.dataset import load_corpus
    from mllm_dr.evaluation import Evaluation, save_evaluation
    from mllm_dr.federation_policy import release_floor
    from mllm_dr.protocol import EvaluateInstruction, EvaluateReply

    a = _accept(msg, context, EvaluateInstruction)
    if isinstance(a, Message):
        return a
    ws, fed, e, ctx = a.ws, a.fed, a.instruction, a.ctx
    if not e.evaluate:   # the final global, delivered for local scoring only
        audit.append(ws.audit_path, "federated_final", run=ctx["run"], round=ctx["round"], center=fed.center_fingerprint)
        return _reply(msg, ws, EvaluateReply.of(Evaluation()).to_record())
    session = _session(ws, context, ctx, a.state, own_rank=False)
    result = session.evaluate(e.split, e.max_new_tokens)
    floor = release_floor(ws, e.policy)
    withheld = 0 < result.stats.n < floor       # the report stays on site; the center gets an evaluation of no one
    save_evaluation(       # audited before the report and rows are written (session 44)
        ws.audit_path, "evaluation_withheld" if withheld else "federated_evaluation",
        ws.root / "reports" / f"federated-{ctx['run']}-{e.split}.md", result,
        f"{ws.config.site_id}: {e.split} split, federated run {ctx['run']} round {ctx['round']}",
        {"run": ctx["run"], "round": ctx["round"]},
        dict(max_total=phq.max_total(len(load_corpus(ws).item_names)), model=ctx["base_model"],
             adapters=f"{ctx['run']}/round-{ctx['round']}", test_model=session.sm.info.is_test_model),
        run=ctx["run"], round=ctx["round"], participants=result.stats.n,
        **({"min_release_participants": floor} if withheld else {"center": fed.center_fingerprint}))
    return _reply(msg, ws, EvaluateReply.of(Evaluation() if withheld else result).to_record())
