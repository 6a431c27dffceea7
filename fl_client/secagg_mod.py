"""Secure aggregation as a client mod on training replies (the math is in ``mllm_dr/secagg.py``).

It sits inside the egress guard (the guard inspects the masked reply: the same tensor names
plus ``secagg.weight``) and outside the DP mod (site-level DP noise is added before masking).
A training message with a key roster is answered masked, with the key this site made for the
round at the key exchange; a message without one is refused when the site's or the run's
policy requires secure aggregation: a site that requires it never sends an update in the clear.

Each masked release is recorded in the workspace (``federation/secagg-released/<run>.json``: the signed
round of the global it was trained from, that global's digest, the roster's sites), atomically and before
the reply leaves. A second masked release from the same signed global for other sites is refused, binding
for the run (``refuse_run``): without DP a site's training from one global is deterministic (seeded by the
signed round), so two sums over rosters that differ by one site give the center that site's update (a
masked round failing after one reply was rejected, then ``--resume`` re-keying it with the others, did
exactly that until session 45). The same sites again (a re-keyed retry of the round after a crash) may be
answered: that sum is the one the center could already decode. A message whose unsigned round is not the
one after its signed global's is refused too (binding): the key, the masks and the record follow it.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord

from mllm_dr.protocol import REFUSED, SECAGG_FAILED, TrainInstruction, TrainReply


def secagg_settings(site_policy, run) -> tuple[bool, float, int]:
    """(required, clip bound, fewest sites) from the site's and the run's policies (``run``: None for the
    default): the stricter of both."""
    on = [p.secagg for p in (site_policy, run) if p is not None and p.secagg.enabled]
    clip = min((s.clip_norm for s in on), default=site_policy.secagg.clip_norm)
    return bool(on), clip, max((s.min_sites for s in on), default=site_policy.secagg.min_sites)


def key_store(ws):
    from mllm_dr.secagg import KeyStore

    return KeyStore(ws.root / "federation" / "secagg")


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    from mllm_dr import audit
    from mllm_dr.federation_policy import read_run_policy, refuse_run
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.secagg import SecAggError, mask_update, parse_roster
    from mllm_dr.signing import state_digest
    from mllm_dr.workspace import Workspace
    from policies.site import site_policy

    ws = Workspace(node_workspace(context.node_config))
    t = TrainInstruction.from_record(msg.content["config"])
    ctx = json.loads(t.context)
    me, run = ws.config.site_id, ctx["run"]
    run_policy, unreadable = read_run_policy(t.policy)
    if unreadable:      # refused here, before the handler (whose mods cannot read it either), binding for the run as
        # the handler's check_run would (session 43), but only when the center signed the message: an unsigned one
        # could make a site quit any run (a second read, session 45)
        if signed_by_center(msg, ws, t, ctx):
            return Message(Error(code=REFUSED, reason=refuse_run(ws, run, msg.metadata.message_type, [unreadable])),
                           reply_to=msg)
        audit.append(ws.audit_path, "secagg_refused", run=run, round=t.round, reason=unreadable)
        return Message(Error(code=REFUSED, reason=f"site {me}: {unreadable}"), reply_to=msg)
    required, clip, min_sites = secagg_settings(site_policy(ws), run_policy)
    if not t.secagg_roster:
        if not required:
            return call_next(msg, context)
        reason = f"site {me} requires secure aggregation; this training message of run {run} carries no key roster"
        audit.append(ws.audit_path, "secagg_refused", run=run, round=t.round, reason=reason)
        return Message(Error(code=REFUSED, reason=reason), reply_to=msg)
    try:
        roster = parse_roster(t.secagg_roster)
        if len(roster) < min_sites:
            raise SecAggError(f"a masked sum over {len(roster)} site(s); this site's policy requires {min_sites}")
        refusal = release_refusal(ws, run, t, roster)     # before training: nothing trained or charged
        if refusal:        # this message only: it is not verified yet (anyone reaching the center's port can send
            # one; binding here let an unsigned message make a site quit any run: a second read, session 45). The
            # release record itself refuses every later try of the same signed global for other sites.
            audit.append(ws.audit_path, "secagg_refused", run=run, round=t.round, reason=refusal)
            return Message(Error(code=REFUSED, reason=f"site {me}: {refusal}"), reply_to=msg)
        key = key_store(ws).take(run, t.round)
    except SecAggError as err:
        audit.append(ws.audit_path, "secagg_refused", run=run, round=t.round, reason=str(err))
        return Message(Error(code=SECAGG_FAILED, reason=f"site {me}: {err}"), reply_to=msg)
    reply = call_next(msg, context)        # the handler verified the signed global (or raised)
    if reply.has_error():
        return reply
    sent = msg.content["arrays"].to_torch_state_dict()
    update = reply.content["arrays"].to_torch_state_dict()
    metrics = TrainReply.from_record(reply.content["metrics"])
    try:
        if set(update) - set(sent):
            raise SecAggError(f"the reply carries tensors the global state lacks: {sorted(set(update) - set(sent))[:3]}")
        masked, norm = mask_update(update, {n: sent[n] for n in update}, metrics.num_examples, me, key, roster, run,
                                   t.round, clip)
        release = {"sites": sorted(roster), "round": t.round, "global_sha256": state_digest(sent, ctx).hex()}
        refusal = record_release(ws, run, ctx["round"], release)    # before the reply leaves
    except SecAggError as err:
        return Message(Error(code=SECAGG_FAILED, reason=f"site {me}: {err}"), reply_to=msg)
    if refusal:            # another message of the run released one meanwhile
        return Message(Error(code=REFUSED, reason=refuse_run(ws, run, msg.metadata.message_type, [refusal])),
                       reply_to=msg)
    reply.content["arrays"] = ArrayRecord.from_torch_state_dict(masked)
    reply.content["metrics"] = MetricRecord(metrics.model_copy(update={"secagg_clip": clip}).to_record())
    audit.append(ws.audit_path, "secagg_masked", run=run, round=t.round, sites=sorted(roster), clip_norm=clip,
                 update_norm_before_clip=norm, clipped=norm > clip, signed_round=ctx["round"],
                 global_sha256=release["global_sha256"])
    return reply


def signed_by_center(msg: Message, ws, t: TrainInstruction, ctx: dict) -> bool:
    """Does the message's global verify with the center's key (the check the handler makes first)? A refusal
    made before the handler binds the run only then."""
    from mllm_dr.enrollment import federation_settings
    from mllm_dr.errors import MllmDrError
    from mllm_dr.signing import load_public, verify_state

    try:
        state = msg.content["arrays"].to_torch_state_dict()
        verify_state(load_public(federation_settings(ws).center_public_key), state, ctx, t.signature)
    except (MllmDrError, KeyError, ValueError, TypeError):     # SignatureError, not enrolled, no global
        return False
    return True


# ----------------------------------------------------------------------------- one masked release per signed global
def release_path(ws, run: str) -> Path:
    """The record of this site's masked releases in ``run``: signed round -> the release (one file per run)."""
    from mllm_dr.protocol import run_name
    from mllm_dr.secagg import SecAggError

    try:
        return ws.root / "federation" / "secagg-released" / f"{run_name(run)}.json"
    except ValueError as err:
        raise SecAggError(str(err)) from None


def releases(ws, run: str) -> dict[str, dict]:
    """Signed round (as text) -> {"sites", "round", "global_sha256"} of each masked release in ``run``: the record,
    and the signed audit log's ``secagg_masked`` entries of the run, its anchor (session 46: a deleted or
    rolled-back record let the site mask the same signed global for another roster, the differencing the record
    exists to stop). The record is written before the reply leaves and the entry after, so the record may hold
    a release the log lacks (a crash between), never the reverse; a release only the log holds is taken from it.
    A record that cannot be read masks nothing (SecAggError): this site could not tell a second release from a
    first."""
    from mllm_dr import audit
    from mllm_dr.secagg import SecAggError

    path = release_path(ws, run)
    record: dict[str, dict] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not all(isinstance(r.get("sites"), list) for r in record.values()):
                raise ValueError("not a signed round -> release map")
        except (OSError, ValueError, AttributeError) as err:
            raise SecAggError(f"the record of this site's masked releases (federation/secagg-released/{path.name}) "
                              f"cannot be read ({type(err).__name__}); nothing is masked until it is restored") from None
    for entry in audit.event_entries(ws.audit_path, ("secagg_masked",)):
        signed, sites = entry.get("signed_round"), entry.get("sites")
        if entry.get("run") != run or type(signed) is not int or not isinstance(sites, list):  # older: no signed round
            continue
        held = record.setdefault(str(signed), {"sites": sorted(sites), "round": entry.get("round"),
                                               "global_sha256": entry.get("global_sha256")})
        if held["sites"] != sorted(sites):    # a rewritten record (a second read, session 46: the record won)
            raise SecAggError(f"the record of this site's masked releases (federation/secagg-released/{path.name}) "
                              f"names other sites for the global signed as round {signed} than the audit log's "
                              f"secagg_masked entry; nothing is masked until the record is restored")
    return record


def release_refusal(ws, run: str, t: TrainInstruction, sites) -> str | None:
    """Why this site may not mask an update for ``sites`` trained from the global ``t`` carries (None: it may):
    ``t``'s unsigned round is not the one after its signed global's, or this site already released a masked
    update trained from that signed global for other sites. SecAggError when the record cannot be read."""
    signed = json.loads(t.context).get("round")
    if type(signed) is not int or t.round != signed + 1:
        return (f"the training message is for round {t.round} and carries the global signed as round {signed}: a "
                f"round trains from the global of the round before, and the key, masks and record follow the round")
    earlier = releases(ws, run).get(str(signed))
    if earlier is not None and earlier["sites"] != sorted(sites):
        return (f"this site already released a masked update trained from the global signed as round {signed} of "
                f"run {run}, for sites {', '.join(earlier['sites'])}; masking it again for {', '.join(sorted(sites))} "
                f"would let the center subtract the two sums and read one site's update")
    return None


def record_release(ws, run: str, signed_round: int, release: dict) -> str | None:
    """Record a masked release trained from the global signed as ``signed_round`` (atomically, under the record's
    lock, checked again there: two messages of the run at once). The refusal when another release took the signed
    global for other sites first, else None. The first release of a signed global stays the record."""
    from mllm_dr.atomic import atomic_write_text, file_lock

    path = release_path(ws, run)
    with file_lock(path):
        record = releases(ws, run)
        earlier = record.get(str(signed_round))
        if earlier is not None and earlier["sites"] != release["sites"]:
            return (f"this site already released a masked update trained from the global signed as round "
                    f"{signed_round} of run {run}, for sites {', '.join(earlier['sites'])}")
        if earlier is None:
            atomic_write_text(path, json.dumps(record | {str(signed_round): release}, indent=1, sort_keys=True))
    return None
