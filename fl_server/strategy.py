"""AdapterFedAvg: Flower's FedAvg loop with this project's rules for what travels and how
it is combined.

- The paper's two stages as a round schedule: stage-1 rounds federate the LQ-former(s),
  stage-2 rounds LoRA + MAA (the LQ-former frozen); learning rates decay across rounds.
- Downlink: the whole global adapter state, signed by the center (sites verify). Uplink:
  only the stage's tensors, checked against the allow-list, screened for non-finite
  values and norm outliers (the site is named, the round goes on with the rest).
- ``exact-lora`` averages the LoRA products B @ A exactly and re-factorizes (sites may
  use other ranks); ``fedavg`` averages A and B separately (the common, inexact way).
- Every round ends with a signed checkpoint and a line in ``history.json``: bytes per
  site, the ratio to the base model's bytes, losses, rejected sites.
- Federated evaluation pools sufficient statistics: exact CCC/RMSE/MAE/P/R/F1.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_server.plan import RunPlan
from mllm_dr.aggregation import exact_lora, screen_updates, weighted_average
from mllm_dr.atomic import atomic_write_text
from mllm_dr.federated import RunSpec, allowed, lora_scaling, round_lr_factor, stage_of_round
from mllm_dr.metrics import SufficientStats, compute
from mllm_dr.signing import sign_state, write_checkpoint


def checkpoint_dir(run_dir: Path, round_: int) -> Path:
    return run_dir / "checkpoints" / f"round-{round_:04d}"


class RunHistory:
    """``history.json`` of a run: what ``mllmdr-center status`` shows. Rewritten atomically."""

    def __init__(self, path: Path, plan: RunPlan, spec: RunSpec, base_bytes: int):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.data.pop("error", None)
        self.data.update({"run": plan.run_name, "base_model": spec.base_model, "base_sha256": spec.base_sha256,
                          "base_bytes": base_bytes, "aggregation": plan.aggregation,
                          "stage1_rounds": plan.stage1_rounds, "stage2_rounds": plan.stage2_rounds,
                          "status": "running", "updated": time.time()})
        self.data.setdefault("rounds", [])
        self.save()

    def add_round(self, entry: dict) -> None:
        self.data["rounds"] = [r for r in self.data["rounds"] if r["round"] != entry["round"]] + [entry]
        self.save()

    def set(self, **kw) -> None:
        self.data.update(kw)
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.time()
        atomic_write_text(self.path, json.dumps(self.data, indent=1, default=float))


class AdapterFedAvg(FedAvg):
    def __init__(self, plan: RunPlan, spec: RunSpec, key, run_dir: Path, state: dict[str, torch.Tensor],
                 done_rounds: int, sites: dict[int, str], base_bytes: int):
        super().__init__(min_train_nodes=plan.min_sites, min_evaluate_nodes=plan.min_sites,
                         min_available_nodes=plan.min_sites)
        self.plan, self.spec, self.key, self.run_dir = plan, spec, key, run_dir
        self.state = state
        self.offset = done_rounds                 # rounds finished before this start (resume)
        self.sites = sites                        # node id -> site id (from the handshake)
        self.base_bytes = base_bytes
        self.history = RunHistory(run_dir / "history.json", plan, spec, base_bytes)
        self.signature = self._sign(done_rounds)
        self._sent: list[int] = list(sites)       # nodes asked in the current round

    # ----------------------------------------------------------------- signing
    def _context(self, round_: int) -> dict:
        return self.spec.context(round_, stage_of_round(round_, self.plan.stage1_rounds) if round_ else 0)

    def _sign(self, round_: int) -> str:
        return sign_state(self.key, self.state, self._context(round_))

    def _messages(self, round_done: int, config: dict, grid: Grid, message_type: str) -> list[Message]:
        cfg = ConfigRecord({**config, "context": json.dumps(self._context(round_done)), "signature": self.signature})
        arrays = ArrayRecord.from_torch_state_dict(self.state)
        # only the nodes accepted at the handshake: a node that refused, or connected later, is left out
        return [Message(RecordDict({"arrays": arrays, "config": cfg}), message_type=message_type, dst_node_id=n)
                for n in self.sites]

    # ----------------------------------------------------------------- training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        r = self.offset + server_round
        p = self.plan
        cfg = {"train-round": r, "train-stage": stage_of_round(r, p.stage1_rounds), "local-epochs": p.local_epochs,
               "batch-size": p.batch_size, "lr-lq": p.lr_lq, "lr-lora": p.lr_lora, "lr-maa": p.lr_maa,
               "lr-factor": round_lr_factor(r, p.stage1_rounds, p.stage2_rounds), "policy": p.policy}
        msgs = self._messages(r - 1, cfg, grid, MessageType.TRAIN)
        self._sent = [m.metadata.dst_node_id for m in msgs]
        log(INFO, "round %d (stage %d): sending global adapters to %d site(s)", r, cfg["train-stage"], len(msgs))
        return msgs

    def aggregate_train(self, server_round: int, replies):
        r = self.offset + server_round
        stage = stage_of_round(r, self.plan.stage1_rounds)
        expected = sorted(n for n in self.state if allowed(n, stage))
        updates, weights, scalings, names, per_site, rejected = [], [], [], [], {}, {}
        replies = list(replies)
        answered = {m.metadata.src_node_id for m in replies}
        unattributed = [m.error.reason for m in replies if m.has_error() and m.metadata.src_node_id not in self._sent]
        for node in self._sent:     # a dead node's error comes from the SuperLink, not from the node
            if node not in answered:
                rejected[self.sites.get(node, f"node-{node}")] = (f"no reply: {unattributed[0]}" if unattributed
                                                                  else "no reply within the round timeout")
        for msg in replies:
            if msg.metadata.src_node_id not in self._sent:
                if not msg.has_error():
                    rejected[f"node-{msg.metadata.src_node_id}"] = "unsolicited reply (node was not asked)"
                continue
            site = self.sites.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")
            if msg.has_error():
                rejected[site] = f"site error: {msg.error.reason}"
                continue
            arrays = msg.content.array_records.get("arrays")
            update = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()} if arrays else {}
            if sorted(update) != expected:
                stray = sorted(set(update) - set(expected))[:3]
                rejected[site] = f"unexpected tensor names {stray}" if stray else "missing tensors"
                continue
            m = msg.content.metric_records["metrics"]
            updates.append(update)
            weights.append(float(m["num-examples"]))
            scalings.append(float(m.get("lora-scaling", lora_scaling(self.spec.options))))
            names.append(site)
            per_site[site] = {"bytes_up": sum(t.numel() * t.element_size() for t in update.values()),
                              "examples": int(m["num-examples"]), "train_loss": float(m.get("train-loss", 0.0)),
                              "mse": float(m.get("mse", 0.0))}
            if "epsilon-total" in m:
                per_site[site]["epsilon_total"] = float(m["epsilon-total"])
                per_site[site]["epsilon_round"] = float(m["epsilon"])
        screen = screen_updates(updates, self.state, self.plan.outlier_factor)
        for i, why in screen.rejected.items():
            rejected[names[i]] = why
            per_site.pop(names[i], None)
        keep = screen.accepted
        for site, why in rejected.items():
            log(WARNING, "round %d: update of %s rejected: %s", r, site, why)
        if len(keep) < self.plan.min_sites:
            self.history.set(status="failed", error=f"round {r}: {len(keep)} usable update(s), policy minimum "
                                                    f"{self.plan.min_sites}; rejected: {rejected}")
            raise RuntimeError(f"round {r}: only {len(keep)} usable site update(s) (minimum {self.plan.min_sites}); "
                               f"rejected: {rejected}")
        ups, ws, scs = [updates[i] for i in keep], [weights[i] for i in keep], [scalings[i] for i in keep]
        residual = None
        if stage == 2 and self.plan.aggregation == "exact-lora":
            res = exact_lora(ups, ws, scs, self.spec.options.lora_r, lora_scaling(self.spec.options))
            new, residual = res.state, res.residual
        else:
            new = weighted_average(ups, ws)
        changed = max(float((new[n].double() - self.state[n].double()).abs().max()) for n in new)
        self.state = self.state | {n: t.to(self.state[n].dtype) for n, t in new.items()}
        self.signature = self._sign(r)
        write_checkpoint(checkpoint_dir(self.run_dir, r), self.key, self.state, self._context(r))
        bytes_down = sum(t.numel() * t.element_size() for t in self.state.values())
        entry = {"round": r, "stage": stage, "sites": per_site, "rejected": rejected,
                 "bytes_down_per_site": bytes_down,
                 "bytes_up_ratio_to_base": {s: v["bytes_up"] / self.base_bytes for s, v in per_site.items()},
                 "max_abs_change": changed, "exact_lora_residual": residual,
                 "lr_factor": round_lr_factor(r, self.plan.stage1_rounds, self.plan.stage2_rounds),
                 "train_loss": sum(per_site[names[i]]["train_loss"] * weights[i] for i in keep) / sum(ws),
                 "time": time.time()}
        self.history.add_round(entry)
        log(INFO, "round %d: aggregated %d site(s), %d B up per site (%.5f of the base model), checkpoint signed",
            r, len(keep), max(v["bytes_up"] for v in per_site.values()), max(entry["bytes_up_ratio_to_base"].values()))
        return ArrayRecord.from_torch_state_dict(self.state), MetricRecord({"train-loss": entry["train_loss"],
                                                                            "sites": len(keep)})

    # ----------------------------------------------------------------- evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        r = self.offset + server_round
        if r != self.plan.total_rounds:
            return []       # generation is slow: the pooled evaluation runs once, on the final adapters
        # the final global always goes out (sites keep it for scoring); evaluated unless turned off
        msgs = self._messages(r, {"split": "test", "max-new-tokens": self.plan.eval_max_new_tokens,
                                  "evaluate": self.plan.evaluate, "policy": self.plan.policy}, grid,
                              MessageType.EVALUATE)
        self._sent = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def aggregate_evaluate(self, server_round: int, replies):
        r = self.offset + server_round
        if not self.plan.evaluate:
            self.history.set(final_global_delivered=sorted(self.sites.get(m.metadata.src_node_id, "?")
                                                           for m in replies if not m.has_error()))
            return None
        pooled, violations, items, per_site, failed = SufficientStats(), 0, 0, {}, {}
        for msg in replies:
            if msg.metadata.src_node_id not in self._sent:     # never counted: the node was not asked
                failed[f"node-{msg.metadata.src_node_id}"] = "unsolicited reply (node was not asked)"
                continue
            site = self.sites.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")
            if msg.has_error():
                failed[site] = msg.error.reason
                continue
            m = msg.content.metric_records["metrics"]
            ss = SufficientStats(**{k: type(getattr(SufficientStats(), k))(m[f"ss-{k}"])
                                    for k in SufficientStats().to_dict()})
            pooled = pooled.merge(ss)
            violations += int(m["format-violations"])
            items += int(m["items"])
            per_site[site] = {"n": ss.n}
        metrics = compute(pooled) | {"format_violation_rate": violations / items if items else 0.0}
        self.history.set(evaluation={"round": r, "pooled": metrics, "sites": per_site, "failed": failed})
        log(INFO, "pooled evaluation over %d participant(s) at %d site(s): %s", pooled.n, len(per_site), metrics)
        return MetricRecord({k: float(v) for k, v in metrics.items() if v == v})
