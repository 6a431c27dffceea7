"""AdapterFedAvg: Flower's FedAvg loop with this project's rules for what travels and how it is combined.

- The paper's two stages as a round schedule: stage-1 rounds federate the LQ-former(s),
  stage-2 rounds LoRA + MAA (the LQ-former frozen); learning rates decay across rounds.
- Only the sites accepted at the handshake take part; a node that refused, or connected
  later, gets no message of the run and its replies are never counted.
- Downlink: the whole global adapter state, signed by the center (sites verify). Uplink: only the
  stage's tensors, as the plan's ``uplink`` encodes them (mllm_dr/uplink.py; decoded in ``validate``).
- ``aggregate_train`` reads as the four steps of a round: validate -> screen -> combine -> record.
- With secure aggregation (the run policy's ``secagg``; a sum-only aggregation) every training round
  starts with a key exchange and the sites answer masked (fl_server/secagg.py): the center cannot
  screen one site's update any more (the sites clip their own, policy ``secagg.clip_norm``), combine
  is the unmasked weighted sum, and a site that drops after the key exchange fails the round, named.
- Federated evaluation pools sufficient statistics: exact CCC/RMSE/MAE/P/R/F1.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_server import secagg
from fl_server.plan import RunPlan
from fl_server.wire import ARRAYS, packed_record, unpacked
from mllm_dr import audit, audit_heads
from mllm_dr.adapters import state_bytes
from mllm_dr.aggregation import (LORA_A, LORA_B, GlobalSVD, exact_lora, lora_pairs, screen_updates, server_step,
                                  weighted_average)
from mllm_dr.center import CenterDir
from mllm_dr.errors import FederationError, InputError
from mllm_dr.federated import (RunSpec, allowed, checks_global, round_lr_factor, stage_of_round,
                               stage_round_index)
from mllm_dr.evaluation import Evaluation
from mllm_dr.metrics import SufficientStats, compute
from mllm_dr.protocol import (EvaluateInstruction, malformed, EvaluateReply, Signed, TrainInstruction, TrainReply,
                              stats_from_record)
from mllm_dr.run_folder import RunFolder
from mllm_dr.secagg import WEIGHT, SecAggError, ring_holds
from mllm_dr.uplink import decode_update
from mllm_dr.signing import sign_state, write_checkpoint


# the dtypes an unmasked site update may come in (``_dtype_problem``): those that promote with float32
AGGREGATABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class SiteUpdate:
    site: str
    tensors: dict[str, torch.Tensor]      # decoded: the site's trained tensors (masked: as sent)
    reply: TrainReply
    bytes_up: int                          # what travelled (encoded)


class AdapterFedAvg(FedAvg):
    def __init__(self, plan: RunPlan, spec: RunSpec, key, folder: RunFolder, state: dict[str, torch.Tensor],
                 done_rounds: int, sites: dict[int, str], base_bytes: int, center: CenterDir | None = None,
                 examples: dict[int, int] | None = None):
        super().__init__(min_train_nodes=plan.min_sites, min_evaluate_nodes=plan.min_sites,
                         min_available_nodes=plan.min_sites)
        self.plan, self.spec, self.key, self.folder = plan, spec, key, folder
        self.state = state
        self.offset = done_rounds                 # rounds finished before this start (resume)
        self.sites = sites                        # node id -> site id, accepted at the handshake
        self.examples = examples or {}            # node id -> training examples declared at the handshake
        self.base_bytes = base_bytes
        self.center = center                      # keeps the sites' audit heads and gives its own (None: off)
        self.signature = self._sign(done_rounds)
        self._sent: list[int] = list(sites)       # nodes asked in the current round
        self._round_started = time.time()
        self.masked = plan.secagg.enabled          # secure aggregation: every training round is masked

    # ----------------------------------------------------------------- signing and messages
    def _context(self, round_: int) -> dict:
        return self.spec.context(round_, stage_of_round(round_, self.plan.stage1_rounds) if round_ else 0)

    def _sign(self, round_: int) -> str:
        return sign_state(self.key, self.state, self._context(round_))

    def _messages(self, instruction: Signed, message_type: str, nodes: list[int] | None = None) -> list[Message]:
        arrays = packed_record(self.state)      # one array on the wire: fl_server/wire.py
        msgs = [Message(RecordDict({ARRAYS: arrays, "config": ConfigRecord(instruction.to_record())}),
                        message_type=message_type, dst_node_id=n) for n in (self.sites if nodes is None else nodes)]
        self._sent = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def _signed(self, round_done: int) -> dict:
        """What every train/evaluate message carries besides the state: the signed context, the run's
        policy and the center's signed audit head (each site keeps it)."""
        head = audit_heads.wire_head(audit.head(self.center.audit_path)) if self.center else {}
        return {"context": json.dumps(self._context(round_done)), "signature": self.signature,
                "policy": self.plan.policy, "audit_head": head}

    def _keep_site_head(self, msg: Message, site: str, round_: int) -> str | None:
        """Record the site's signed audit head from its reply; the reason to reject the reply, if any."""
        if self.center is None:
            return None
        return self.center.keep_reply_head(site, msg.content.config_records.get("config"), run=self.plan.run_name,
                                           round=round_)

    def _site(self, node: int) -> str:
        return self.sites.get(node, f"node-{node}")

    # ----------------------------------------------------------------- the run
    def run_rest(self, grid: Grid) -> None:
        """The rounds after the ``done_rounds`` already checkpointed (all of them on a fresh start). A run
        resumed after its last training round runs the final round's evaluation step alone, unless it ran:
        that step is what sends the sites the final global (and pools the evaluation)."""
        remaining = self.plan.total_rounds - self.offset
        if remaining > 0:
            self.start(grid, initial_arrays=ArrayRecord.from_torch_state_dict(self.state), num_rounds=remaining,
                       timeout=self.plan.round_timeout)
        elif not self.folder.final_step_done(self.plan.total_rounds, self.plan.evaluate):
            log(INFO, "all %d rounds were trained; sending the final global (evaluation step)", self.offset)
            messages = self.configure_evaluate(0, ArrayRecord(), ConfigRecord(), grid)
            self.aggregate_evaluate(0, grid.send_and_receive(messages, timeout=self.plan.round_timeout))

    # ----------------------------------------------------------------- training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        r, p = self.offset + server_round, self.plan
        t = TrainInstruction(**self._signed(r - 1), round=r, stage=stage_of_round(r, p.stage1_rounds),
                             local_epochs=p.local_epochs, batch_size=p.batch_size, lr_lq=p.lr_lq, lr_lora=p.lr_lora,
                             lr_maa=p.lr_maa, lr_factor=round_lr_factor(r, p.stage1_rounds, p.stage2_rounds),
                             round_validation=p.round_validation and checks_global(r, p.stage1_rounds),
                             score_weight=p.score_weight, proximal_mu=p.proximal_mu, uplink=p.uplink,
                             local_steps=p.local_steps,
                             first_step=p.local_steps * stage_round_index(r, p.stage1_rounds))
        self._round_started = time.time()
        nodes = None
        if self.masked:
            # before any site trains (or spends DP budget): the sites' declared examples x the run's clip bound must
            # fit the ring, else the sum could wrap (a second read, session 46: it was found only at the unmasking)
            declared = sum(self.examples.get(n, 0) for n in self.sites)
            if not ring_holds(declared, p.secagg.clip_norm):
                self._fail(f"round {r}: secure aggregation: the sites' {declared} declared examples x the clip bound "
                           f"{p.secagg.clip_norm:g} do not fit the 64-bit ring (the masked sum could wrap around); "
                           f"lower secagg.clip_norm in the run's policy")
            keys, problems = secagg.key_exchange(grid, self.sites, self.spec.run, r, self.spec.base_sha256, p.policy,
                                                 p.node_timeout, self.center, t.local_epochs)
            self._fail_if_too_few(r, len(keys), max(p.min_sites, p.secagg.min_sites), problems)
            t, nodes = t.model_copy(update={"secagg_roster": secagg.roster(self.sites, keys)}), list(keys)
        msgs = self._messages(t, MessageType.TRAIN, nodes)
        log(INFO, "round %d (stage %d): sending global adapters to %d site(s)", r, t.stage, len(msgs))
        return msgs

    def aggregate_train(self, server_round: int, replies):
        self._replies_in = time.time()
        r = self.offset + server_round
        stage = stage_of_round(r, self.plan.stage1_rounds)
        updates, rejected = self.validate(r, stage, list(replies))
        global_svd = GlobalSVD(self.state, self.spec.config.lora.scaling)   # the round's: screened, then combined
        updates = self.screen(updates, rejected, global_svd)
        for site, why in rejected.items():
            log(WARNING, "round %d: update of %s rejected: %s", r, site, why)
        dropped = secagg.missing(self._sent, self.sites, {u.site for u in updates}) if self.masked else []
        if dropped:
            self._fail(f"round {r}: secure aggregation: {', '.join(dropped)} dropped after the key exchange "
                       f"({'; '.join(rejected.get(s, 'no reply') for s in dropped)}); its masks are in the other "
                       f"sites' replies, so the sum cannot be unmasked and nothing of this round was decoded. "
                       f"'mllmdr-center run --resume' re-keys with the sites online")
        self._fail_if_too_few(r, len(updates), self.plan.min_sites, rejected)
        new, residual = self.combine(stage, updates, global_svd)
        return self.record(r, stage, updates, rejected, new, residual)

    def _fail(self, reason: str):
        self.folder.fail(reason)
        raise FederationError(reason)

    def _fail_if_too_few(self, r: int, usable: int, needed: int, rejected: dict[str, str]) -> None:
        if usable < needed:
            self._fail(f"round {r}: only {usable} usable site update(s) (minimum {needed}); rejected: {rejected}")

    def validate(self, r: int, stage: int, replies: list[Message]) -> tuple[list[SiteUpdate], dict[str, str]]:
        """Decode the replies of the nodes asked; name every site whose reply is missing or malformed."""
        expected = sorted([n for n in self.state if allowed(n, stage, self.spec.config)] + [WEIGHT] * self.masked)
        answered = {m.metadata.src_node_id for m in replies}
        # a dead node's error comes from the SuperLink, not from the node: attribute it to the silent ones
        unattributed = [m.error.reason for m in replies if m.has_error() and m.metadata.src_node_id not in self._sent]
        rejected = {self._site(n): (f"no reply: {unattributed[0]}" if unattributed else "no reply within the round "
                                    "timeout") for n in self._sent if n not in answered}
        updates = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in self._sent:
                if not msg.has_error():
                    rejected[f"node-{node}"] = "unsolicited reply (node was not asked)"
                continue
            update = self._update(msg, r, expected)
            if isinstance(update, str):
                rejected[self._site(node)] = update
            else:
                updates.append(update)
        # site order, not arrival order: float sums are not associative, and the same run must give the same global
        return sorted(updates, key=lambda u: u.site), rejected

    def _update(self, msg: Message, r: int, expected: list[str]) -> SiteUpdate | str:
        """One asked site's reply as a decoded update, or why it is not usable."""
        site = self._site(msg.metadata.src_node_id)
        if msg.has_error():
            return f"site error: {msg.error.reason}"
        refused = self._keep_site_head(msg, site, r)
        if refused:
            return refused
        arrays = msg.content.array_records.get(ARRAYS)
        try:
            wire = unpacked(arrays, f"site {site}'s reply") if arrays else {}
            tensors = wire if self.masked else decode_update(wire, self.state, self.plan.uplink)
        except InputError as err:
            return f"undecodable uplink: {err}"
        if sorted(tensors) != expected:
            stray = sorted(set(tensors) - set(expected))[:3]
            return f"unexpected tensor names {stray}" if stray else "missing tensors"
        if self.masked and secagg.not_masked(tensors, self.state):
            return "reply not masked as the round requires (int64, the global's shapes)"
        wrong = None if self.masked else (self._dtype_problem(tensors) or self._shape_problem(tensors))
        if wrong:
            return wrong
        try:
            reply = TrainReply.from_record(msg.content.metric_records["metrics"])
            if reply.validation:          # checked here, not when the round is recorded (it stopped the run)
                stats_from_record(reply.validation)
        except (KeyError, ValueError) as err:
            return malformed("training reply", err)
        return self._declared_problem(msg.metadata.src_node_id, reply, tensors) or \
            SiteUpdate(site, tensors, reply, state_bytes(wire))

    def _declared_problem(self, node: int, reply: TrainReply, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why the numbers a site declares beside its tensors cannot be used as its weights: its example
        count (the round weight: within 1 and what it declared at the handshake, so one site cannot make
        the global its own update) and its LoRA scaling (exact-lora's coefficient: the one its adapters'
        rank gives under the run's scaling, as every site builds them)."""
        declared = self.examples.get(node)
        if not 1 <= reply.num_examples <= (reply.num_examples if declared is None else declared):
            return f"declares {reply.num_examples} training examples" + \
                ("" if declared is None else f", {declared} at the handshake")
        lora = self.spec.config.lora
        a = [t for n, t in sorted(tensors.items()) if f".{LORA_A}." in n and t.dim() == 2]
        rank = a[0].shape[0] if a and not self.masked and self.plan.aggregation == "exact-lora" else lora.r
        want = lora.at_rank(rank).scaling
        if not math.isclose(reply.lora_scaling, want, rel_tol=1e-6):
            return f"declares LoRA scaling {reply.lora_scaling:g}; rank {rank} under the run's gives {want:g}"
        return None

    def _dtype_problem(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why an unmasked update cannot be combined with the global, by dtype: the screen and the average
        take floating-point tensors that promote with the global's float32, or the global's own dtype (an
        honest site sends float32; the fp16/int8 decoding yields it). A bool or float8 tensor of the right
        shape made the screen raise and the whole run fail (a review, session 44); that site is left out,
        named, and the round goes on."""
        for name in sorted(tensors):
            dtype = tensors[name].dtype
            if dtype not in AGGREGATABLE and dtype != self.state[name].dtype:
                return f"tensor {name} is {str(dtype).removeprefix('torch.')}; expected floating point " \
                       f"({', '.join(str(d).removeprefix('torch.') for d in AGGREGATABLE)})"
        return None

    def _shape_problem(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why an update cannot be combined with the global, by shape: each tensor must have the global's
        shape; under exact-lora a LoRA pair may come at the site's own rank (A: r x in, B: out x r)."""
        own_rank = self.plan.aggregation == "exact-lora"
        for name in sorted(tensors):                     # sorted: the same reply names the same tensor
            got, want = tuple(tensors[name].shape), tuple(self.state[name].shape)
            rank_only = own_rank and len(got) == len(want) == 2 and (
                (f".{LORA_A}." in name and got[1] == want[1]) or (f".{LORA_B}." in name and got[0] == want[0]))
            if got != want and not rank_only:
                return f"tensor {name} has shape {list(got)}, the global's is {list(want)}"
        ranks = set()
        for a, b in lora_pairs(tensors).values():
            rank = tensors[a].shape[0]
            if rank != tensors[b].shape[1]:
                return f"LoRA pair {a} / {b}: ranks {rank} and {tensors[b].shape[1]} differ"
            if rank < 1:                           # rank 0 divided the scaling by zero and failed the run
                return f"LoRA pair {a} / {b}: rank {rank} is below 1"
            ranks.add(rank)
        if len(ranks) > 1:
            return f"LoRA pairs at ranks {sorted(ranks)}: one site trains at one rank"
        return None

    def screen(self, updates: list[SiteUpdate], rejected: dict[str, str], global_svd: GlobalSVD | None = None
               ) -> list[SiteUpdate]:
        """Drop non-finite updates and norm outliers (named in ``rejected``). Masked updates cannot be
        screened one by one: each site clipped its own (``secagg.clip_norm``); ``combine`` checks the sum.
        ``global_svd``: the round's global's SVD per layer (sites at their own rank), which ``combine`` reuses."""
        if self.masked:
            return updates
        tensors = [u.tensors for u in updates]
        own_rank = any(t.shape != self.state[n].shape for up in tensors for n, t in up.items())   # exact-lora only
        screening = screen_updates(tensors, self.state, self.plan.outlier_factor,
                                   [u.reply.lora_scaling for u in updates] if own_rank else None,
                                   self.spec.config.lora.scaling, self.plan.max_update_norm,
                                   # epochs: a site's steps grow with its examples; local-steps: every site the same
                                   None if self.plan.local_steps else [float(u.reply.num_examples) for u in updates],
                                   reference_svd=global_svd)
        for i, why in screening.rejected.items():
            rejected[updates[i].site] = why
        finite = sum(1 for n in screening.norms if n == n)     # the median screen reads the finite ones only
        if finite < 3 and not self.plan.max_update_norm:
            log(WARNING, "%d finite site update(s): the median norm screen needs 3; no update was screened for its "
                "norm (set max-update-norm in the run plan for an absolute bound)", finite)
        return [updates[i] for i in screening.accepted]

    def combine(self, stage: int, updates: list[SiteUpdate], global_svd: GlobalSVD | None = None
                ) -> tuple[dict[str, torch.Tensor], float | None]:
        """exact-lora: the LoRA products averaged exactly (stage 2); otherwise (and with ffa-lora, whose
        A is frozen) a weighted sum; masked, the unmasked sum of the sites' n_k * update. Then the
        plan's server learning rate (1: plain averaging; see mllm_dr.aggregation.server_step)."""
        if self.masked:
            try:
                new, norm = secagg.unmask([u.tensors for u in updates], self.state,
                                          sum(u.reply.num_examples for u in updates), self.plan.secagg.clip_norm)
            except SecAggError as err:
                self._fail(f"secure aggregation: {err}")
            # the run's bound, never one a site declares: each site clips to at most it (the stricter of its
            # own policy's and the run's), so a site claiming a larger one did not clip as the run requires
            bound = self.plan.secagg.clip_norm
            loose = sorted(u.site for u in updates if (u.reply.secagg_clip or 0.0) > bound * (1 + 1e-9))
            if loose:
                self._fail(f"secure aggregation: {', '.join(loose)} declare(s) a clip bound above the run's {bound:g}")
            if not norm <= bound * (1 + 1e-6) + 1e-3:     # a weighted mean of clipped updates cannot exceed it
                self._fail(f"secure aggregation: the averaged update's norm {norm:.3g} exceeds the sites' clip "
                           f"bound {bound:g}: a reply was altered or a site did not clip")
            return server_step(self.state, new, self.plan.server_lr), None
        weights, lr = [float(u.reply.num_examples) for u in updates], self.plan.server_lr
        if stage == 2 and self.plan.aggregation == "exact-lora":
            res = exact_lora([u.tensors for u in updates], weights, [u.reply.lora_scaling for u in updates],
                             self.spec.config.lora.r, self.spec.config.lora.scaling, reference=self.state, server_lr=lr,
                             reference_svd=global_svd)
            return res.state, res.residual
        return server_step(self.state, weighted_average([u.tensors for u in updates], weights), lr), None

    def record(self, r: int, stage: int, updates: list[SiteUpdate], rejected: dict[str, str],
               new: dict[str, torch.Tensor], residual: float | None):
        """Apply, sign and checkpoint the new global state; one line in the run's history, written before
        the checkpoint: a crash between the two leaves a round the history names and no checkpoint holds, which
        `--resume` runs again (and its entry is replaced); the other order left a checkpointed round the history
        never named, for good (a review, session 42)."""
        # a stage with nothing to train (stage 1 of a run without audio/visual features) aggregates nothing: the
        # round keeps the global as it is (session 44: max() of no tensors failed the run)
        changed = max((float((new[n].double() - self.state[n].double()).abs().max()) for n in new), default=0.0)
        self.state = self.state | {n: t.to(self.state[n].dtype) for n, t in new.items()}
        self.signature = self._sign(r)
        sites = {}
        for u in updates:
            sites[u.site] = {"bytes_up": u.bytes_up, "examples": u.reply.num_examples,
                             "train_loss": u.reply.train_loss, "mse": u.reply.mse,
                             "train_seconds": u.reply.train_seconds}
            if u.reply.epsilon_total is not None:
                sites[u.site] |= {"epsilon_total": u.reply.epsilon_total, "epsilon_round": u.reply.epsilon}
        weights = [u.reply.num_examples for u in updates]
        now = time.time()
        entry = {"round": r, "stage": stage, "sites": sites, "rejected": dict(sorted(rejected.items())),
                 "bytes_down_per_site": state_bytes(self.state),
                 "bytes_up_ratio_to_base": {s: v["bytes_up"] / self.base_bytes for s, v in sites.items()},
                 "max_abs_change": changed, "exact_lora_residual": residual, "secagg": self.masked,
                 "uplink": self.plan.uplink,
                 "lr_factor": round_lr_factor(r, self.plan.stage1_rounds, self.plan.stage2_rounds),
                 "train_loss": sum(u.reply.train_loss * w for u, w in zip(updates, weights)) / sum(weights),
                 "round_seconds": now - self._round_started, "time": now, "aggregate_seconds": now - self._replies_in}
        checks = [stats_from_record(u.reply.validation) for u in updates if u.reply.validation]
        if checks:     # the pooled regression-head check on held-out data of the global round r started from
            pooled = SufficientStats()
            for c in checks:
                pooled = pooled.merge(c)
            entry["validation"] = {"global_round": r - 1, **compute(pooled)}
        slowest = max(u.reply.train_seconds for u in updates)
        entry["round_overhead"] = entry["round_seconds"] / slowest if slowest > 0 else None
        self.folder.add_round(entry)
        write_checkpoint(self.folder.checkpoint(r), self.key, self.state, self._context(r))
        log(INFO, "round %d: aggregated %d site(s), %d B up per site (%.5f of the base model), checkpoint signed",
            r, len(updates), max(v["bytes_up"] for v in sites.values()), max(entry["bytes_up_ratio_to_base"].values()))
        return ArrayRecord.from_torch_state_dict(self.state), MetricRecord({"train-loss": entry["train_loss"],
                                                                            "sites": len(updates)})

    # ----------------------------------------------------------------- evaluation
    def _final(self, server_round: int) -> bool:
        """Whether Flower's ``server_round`` (counted from this start or resume) is the run's last round: the
        pooled evaluation runs once, on the final adapters (generation is slow)."""
        return self.offset + server_round == self.plan.total_rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        r = self.offset + server_round
        if not self._final(server_round):
            return []
        # the final global always goes out (sites keep it for scoring); evaluated unless turned off
        e = EvaluateInstruction(**self._signed(r), max_new_tokens=self.plan.eval_max_new_tokens,
                                evaluate=self.plan.evaluate)
        return self._messages(e, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies):
        r = self.offset + server_round
        if not self._final(server_round):
            return None     # Flower calls this every round; only the final one asked anything (configure_evaluate)
        replies = list(replies)
        failed = {f"node-{m.metadata.src_node_id}": "unsolicited reply (node was not asked)"
                  for m in replies if m.metadata.src_node_id not in self._sent}
        replies = [m for m in replies if m.metadata.src_node_id in self._sent]   # never count a node not asked
        if not self.plan.evaluate:
            delivered = [m for m in replies if not m.has_error()
                         and not self._keep_site_head(m, self._site(m.metadata.src_node_id), r)]
            self.folder.update(final_global_delivered=sorted(self._site(m.metadata.src_node_id) for m in delivered),
                               final_global_delivered_round=r)
            return None
        pooled, per_site, no_head = Evaluation(), {}, []
        for msg in sorted(replies, key=lambda m: self._site(m.metadata.src_node_id)):   # site order (see validate)
            site = self._site(msg.metadata.src_node_id)
            if msg.has_error():
                failed[site] = msg.error.reason
                continue
            refused = self._keep_site_head(msg, site, r)
            if refused:
                failed[site] = refused
                continue
            try:
                site_eval = EvaluateReply.from_record(msg.content.metric_records["metrics"]).evaluation()
            except (KeyError, ValueError) as err:     # pydantic's ValidationError is a ValueError
                failed[site] = malformed("evaluation reply", err)
                continue
            pooled.merge(site_eval)
            per_site[site] = site_eval.metrics()      # the site's own aggregate: within-site CCC, MAE, ...
            if not site_eval.head_complete():
                no_head.append(site)     # pooled maa_* would cover a subset: null, these sites named (session 45)
        for node in set(self._sent) - {m.metadata.src_node_id for m in replies}:
            failed[self._site(node)] = "no reply"
        metrics = pooled.metrics()
        self.folder.update(evaluation={"round": r, "pooled": metrics, "sites": per_site,
                                       "failed": dict(sorted(failed.items())),
                                       **({"maa_not_pooled": {"reason": "no MAA-head statistics from these sites: "
                                                              "the pooled maa_* figures are left out (null)",
                                                              "sites": no_head}} if no_head else {})})
        log(INFO, "pooled evaluation over %d participant(s) at %d site(s): %s", pooled.stats.n, len(per_site), metrics)
        return MetricRecord({k: float(v) for k, v in metrics.items() if v == v})
