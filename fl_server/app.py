"""ServerApp: runs at the center for one federated run.

1. Waits (bounded) for the sites, asks each for its feature widths and base-model hash (and, with
   ``feature-norms = federated``, its frame moments, summed into the run's feature norms); only the
   sites that accept the run (their policy decides) take part in it.
2. Builds the round-0 global adapters (or, with ``resume``, loads the last signed checkpoint).
3. Runs the two-stage round schedule with ``AdapterFedAvg`` (masked rounds with a key exchange
   each when the run's policy asks for secure aggregation); a pooled evaluation at the end.
"""

from __future__ import annotations

import os
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import NamedTuple

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_server.plan import RunPlan, refusal_path, start_refusal
from mllm_dr.errors import FederationError

app = ServerApp()


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} site(s) connected after {timeout:.0f} s; the run needs {n}")
        time.sleep(1)


class TooFewSites(FederationError):
    """The handshake left fewer sites than the run needs; ``not_joined``: why each other did not join. Since
    session 44 the run's history records them before the run fails: `simulate` said "0 site(s) joined, 0 did
    not" when every site had refused."""

    def __init__(self, message: str, not_joined: list[str]):
        super().__init__(message)
        self.not_joined = list(not_joined)


class Joined(NamedTuple):
    sites: dict[int, str]                 # node id -> site id of the sites that accepted the run
    dims: dict[str, int]                  # the feature widths every site shares
    not_joined: list[str]                 # why the others did not join
    feature_norms: dict                   # the run's feature norms (feature-norms federated), else {}
    examples: dict[int, int] = {}         # node id -> training examples it declared (bounds its round weight)


def common_widths(widths: list[dict[str, int]]) -> dict[str, int]:
    """The feature widths most sites share (a tie: those of the first in the given order). A site with
    other widths is the one left out, whichever site happened to answer first."""
    keys = [tuple(sorted(w.items())) for w in widths]
    return dict(max(keys, key=lambda k: (keys.count(k), -keys.index(k)))) if keys else {}


def _node_binding(center, site: str, node) -> str | None:
    """Why a reply from ``node`` cannot speak for ``site``, else None: a site id binds only through the
    node the center registered for it (``mllmdr-center serve`` records it)."""
    from mllm_dr.errors import InputError

    from mllm_dr.rehearsal import Rehearsal

    try:
        registered = center.site(site).get("node_id")
    except InputError as err:                        # not approved here, or an id that is no site id
        return str(err)
    if registered is None and Rehearsal.from_env() is not None:
        return None         # `simulate`: virtual nodes, no node authentication, none registered; the rehearsal maps them
    on_record = "registered"
    if registered is None:  # registered by a kit that kept no node id: the node its runs' handshakes recorded
        registered, on_record = center.history_by_site().get(site, {}).get("node_id"), "recorded (earlier runs)"
    if registered is None:
        return f"answered from node {node}, but no registered node is on record for it ('mllmdr-center serve' " \
               f"registers approved sites; one registered by an older kit: revoke it and approve a new request)"
    if str(registered) != str(node):
        return f"answered from node {node}, but its {on_record} node is {registered} (another site's key?)"
    return None


def handshake(grid: Grid, nodes: list[int], plan: RunPlan, base_sha256: str, center=None,
              widths: dict[str, int] | None = None) -> Joined:
    """Which sites take part (only those that accepted the run), with which feature widths, and the
    run's feature norms summed from their frame moments. The center keeps each site's signed audit
    head from its reply (one that goes backwards keeps the site out).

    ``widths``: the widths the run already has (a resume: its last checkpoint's, ``signed_widths``); the
    sites with others are left out. Without it (a fresh run), the widths most sites share."""
    from mllm_dr.federated import run_feature_norms, screen_moments
    from mllm_dr.protocol import QUERY, HandshakeQuery, HandshakeReply, SiteId, malformed, moments_from_record

    federated_norms = plan.feature_norms == "federated"
    q = HandshakeQuery(run=plan.run_name, base_model=plan.base_model, base_sha256=base_sha256, policy=plan.policy,
                       feature_recipe=plan.feature_recipe, feature_norms=plan.feature_norms)
    msgs = [Message(RecordDict({"config": ConfigRecord(q.to_record())}), message_type=QUERY, dst_node_id=n)
            for n in nodes]
    ready, problems = [], []
    for msg in grid.send_and_receive(msgs, timeout=plan.node_timeout + 120):
        node = msg.metadata.src_node_id
        if msg.has_error():
            problems.append(f"node {node}: {msg.error.reason}")
            continue
        try:       # a reply this kit cannot read (another version, a fault) keeps that site out, named
            site = SiteId.from_record(msg.content.config_records["config"]).site_id
            reply = HandshakeReply.from_record(msg.content.metric_records["metrics"])
        except (KeyError, ValueError) as err:
            problems.append(f"node {node}: {malformed('handshake reply', err)}")
            continue
        why = _node_binding(center, site, node) if center is not None else None   # first: no head kept for
        if center is not None and not why:                                         # an id its node cannot claim
            why = center.keep_reply_head(site, msg.content.config_records["config"], run=plan.run_name, round=0)
        if why:
            problems.append(f"site {site}: {why}")
            continue
        ready.append((site, node, reply))
    claimed = [s for s, _, _ in ready]
    for twice in sorted({s for s in claimed if claimed.count(s) > 1}):   # one site id, two nodes: neither
        problems.append(f"site {twice}: claimed by nodes {sorted(n for s, n, _ in ready if s == twice)}; left out")
    ready = [r for r in ready if claimed.count(r[0]) == 1]
    ready.sort(key=lambda r: r[0])     # site order, not reply order
    dims = dict(widths) if widths is not None else common_widths([reply.dims for _, _, reply in ready])
    whose = "the run's (its last signed checkpoint)" if widths is not None else "which most sites share"
    sites, moments = {}, {}
    for site, node, reply in ready:
        if reply.dims != dims:
            problems.append(f"site {site}: feature widths {reply.dims} differ from {dims}, {whose}"
                            + ("" if plan.feature_recipe else " (sites that record differently need a common feature "
                               "recipe: 'mllmdr-center init --feature-recipe egemaps-openface', or run with "
                               "--set feature-recipe=egemaps-openface, and each site extracts with it)"))
            continue
        if reply.num_examples < 1:               # its round weight: nothing to train on, or a forged count
            problems.append(f"site {site}: declares {reply.num_examples} training examples")
            continue
        if federated_norms:
            try:
                moments[node] = moments_from_record(reply.moments, reply.dims)
            except ValueError as err:
                problems.append(f"site {site}: {err}")
                continue
        sites[node] = site
        log(INFO, "site %s (node %d): %d training examples, feature widths %s", site, node, reply.num_examples,
            reply.dims)
    if federated_norms:                  # one site's moments must not become every site's norms
        nodes = list(sites)
        bounded, outliers = screen_moments([moments[n] for n in nodes], plan.outlier_factor)
        moments = dict(zip(nodes, bounded))
        for i, why in outliers.items():
            problems.append(f"site {sites.pop(nodes[i])}: {why}")
    for p in problems:
        log(WARNING, "not taking part: %s", p)
    if len(sites) < plan.min_sites:
        raise TooFewSites(f"{len(sites)} site(s) ready, {plan.min_sites} needed: "
                          + "; ".join(problems or ["no reply"]), problems)
    # ``sites`` is in site order (``ready`` is sorted): float sums, and the norms are signed into the run spec
    norms = run_feature_norms([moments[n] for n in sites]) if federated_norms else {}
    if federated_norms:
        log(INFO, "feature norms over %d site(s): %s", len(sites),
            ", ".join(f"{m} {int(sum(moments[n][m][0] for n in sites if m in moments[n]))} frames" for m in norms)
            or "no features")
    return Joined(sites, dims, problems, norms, {node: reply.num_examples for _, node, reply in ready if node in sites})


def bounded_examples(examples: dict[int, int], sites: dict[int, str], recorded: dict[str, int]) -> dict[int, int]:
    """Each site's round-weight bound (node -> examples): what it declares at this handshake, and on a
    resumed run no more than it declared when the run started (``recorded``: the history's ``site_examples``;
    a review, session 42: every --resume took the new handshake's count, so a site could raise its weight
    mid-run)."""
    return {node: min(count, int(recorded.get(sites[node], count))) for node, count in examples.items()}


def signed_widths(folder, done: int, public_key, base_sha256: str) -> dict[str, int]:
    """The feature widths the run's checkpoint of round ``done`` is signed for: what a resumed run's sites
    must have. Before session 44 a resume's handshake took the widths most of the sites answering now
    share: where the run's own sites were a minority, they were the ones left out, and ``resumed_state``
    then refused the resume, saying the sites' widths changed (a review, session 44)."""
    from mllm_dr.federated import RunSpec
    from mllm_dr.signing import read_checkpoint

    _, meta = read_checkpoint(folder.checkpoint(done), public_key, base_sha256)
    return dict(RunSpec.from_context(meta).dims)


def resumed_state(folder, done: int, public_key, spec) -> dict:
    """The global state of round ``done`` to resume ``spec``'s run from. Signed is not enough: it must be
    this run's checkpoint of that round, of this model and these feature widths (a round-0003 copied in
    as round-0004, or another run's checkpoint, would be re-signed under this run's context and sent).
    Sets ``spec.feature_norms`` to the norms the run was trained with."""
    from mllm_dr.federated import RunSpec
    from mllm_dr.signing import read_checkpoint

    state, meta = read_checkpoint(folder.checkpoint(done), public_key, spec.base_sha256)
    was = RunSpec.from_context(meta)
    same_model = was.config.to_dict() == spec.config.to_dict()
    if meta.get("run") != spec.run or meta.get("round") != done or not same_model:
        raise FederationError(f"cannot resume {spec.run}: {folder.checkpoint(done)} is signed for run "
                              f"{meta.get('run')!r} round {meta.get('round')}"
                              + ("" if same_model else " with another model") + f", not this run's round {done}")
    if was.dims != spec.dims:
        raise FederationError(f"cannot resume {spec.run}: the sites' feature widths changed")
    spec.feature_norms = was.feature_norms
    return state


class RunRefused(FederationError):
    """A start that ``start_refusal`` refuses (a name already used here; a resume of a completed, unknown or
    differently planned run): that run's own record is left as it is. Since session 44 for every refusal,
    not only a taken name: a refused resume of a completed run marked it failed, and a resume under a
    mistyped name left a failed run of that name behind."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    from mllm_dr.run_folder import RunFolder

    plan = RunPlan.model_validate(dict(context.run_config))
    try:
        run(grid, plan)
    except RunRefused:
        raise
    except Exception as err:   # leave the reason where `mllmdr-center run/status` read it, then fail the run
        RunFolder(Path(plan.center_dir) / "runs", plan.run_name).fail(f"{type(err).__name__}: {err}")
        raise


def run(grid: Grid, plan: RunPlan) -> None:
    import torch

    from fl_server.strategy import AdapterFedAvg
    from mllm_dr.base_model import base_info
    from mllm_dr.center import CenterDir
    from mllm_dr.federated import RunSpec, initial_state
    from mllm_dr.run_folder import RunFolder
    from mllm_dr.signing import load_private, write_checkpoint
    from fl_server.secagg import SUM_ONLY

    torch.set_num_threads(max(int(os.environ.get("OMP_NUM_THREADS", 1)), 1))
    if plan.secagg.enabled and plan.aggregation not in SUM_ONLY:
        raise FederationError(f"the run's policy requires secure aggregation, which needs a sum-only aggregation "
                              f"({' or '.join(SUM_ONLY)}); {plan.aggregation} combines per-site LoRA factors "
                              f"(README: 'Trust'); refusing to start")
    center = CenterDir(Path(plan.center_dir))
    key = load_private(center.signing_key)
    info = base_info(plan.base_model)
    folder = RunFolder(center.runs_dir, plan.run_name)
    base_bytes = sum(f.stat().st_size for f in info.path.glob("*.safetensors"))
    # a resumed run keeps the plan it started with (its policy above all): checked before any site is asked
    refused = start_refusal(plan, folder)
    if refused:
        raise RunRefused(f"{refused[1]} ({refusal_path(refused[0], folder)})")
    if not plan.resume or folder.plan() is None:
        folder.record_plan(plan.to_run_config())
    else:
        plan = plan.with_recorded_policy(folder.plan())    # the policy text the sites pinned

    done = folder.last_checkpoint() if plan.resume else None
    widths = None if done is None else signed_widths(folder, done, key.public_key(), info.sha256)
    nodes = wait_for_nodes(grid, plan.min_sites, plan.node_timeout)
    try:
        sites, dims, not_joined, norms, examples = handshake(grid, nodes, plan, info.sha256, center, widths)
    except TooFewSites as err:      # who refused, where `status` and `simulate` read it (main() fails the run)
        folder.update(not_joined=err.not_joined)
        raise
    spec = RunSpec(plan.run_name, plan.base_model, info.sha256, dims, plan.architecture(), plan.feature_recipe, norms)

    recorded = ((folder.history() or {}).get("site_examples") or {}) if done is not None else {}
    examples = bounded_examples(examples, sites, recorded)
    if done is not None:
        state = resumed_state(folder, done, key.public_key(), spec)
        log(INFO, "resuming %s after round %d (signed checkpoint verified)", plan.run_name, done)
    else:
        done = 0
        state = initial_state(spec, plan.seed)
        write_checkpoint(folder.checkpoint(0), key, state, spec.context(0, 0))
    folder.start(base_model=spec.base_model, base_sha256=spec.base_sha256, base_bytes=base_bytes,
                 aggregation=plan.aggregation, secagg=plan.secagg.enabled, uplink=plan.uplink, stage1_rounds=plan.stage1_rounds,
                 stage2_rounds=plan.stage2_rounds,
                 sites=sorted(sites.values()), site_nodes={str(k): v for k, v in sites.items()},
                 site_examples=dict(sorted((recorded | {sites[n]: c for n, c in examples.items()}).items())),
                 not_joined=not_joined)
    strategy = AdapterFedAvg(plan, spec, key, folder, state, done, sites, base_bytes, center, examples)
    strategy.run_rest(grid)
    folder.update(status="completed", final_round=plan.total_rounds)
