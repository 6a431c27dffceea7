"""Benchmark: does federating help? local-only vs federated vs pooled, on the same participants.

On the synthetic multi-site corpus (non-IID sites, NOT clinical data), with the same base, epoch
budget, schedule and seed in every arm:
- local-only: each site trains alone on its own data and is evaluated on its own test split;
- federated: the real deployment (SuperLink + SuperNodes on 127.0.0.1, TLS, node auth), stage-1
  and stage-2 rounds, pooled evaluation from sufficient statistics;
- pooled: one site holding every site's training data (the upper reference), evaluated on the
  union of the sites' test splits.
Prints JSON per seed and a summary over seeds (mean and spread); writes a PNG of the learning
curves and of predicted-vs-true per arm.

    .venv/bin/python -m bench.federation --participants 24 --sites 3 --seeds 0,1 --stage2-rounds 3
    .venv/bin/python -m bench.federation --arms federated --uplink int8 ...   # CCC per uplink encoding
    .venv/bin/python -m bench.federation --arms federated --server-lr 3 ...   # the server step (FedOpt)
    .venv/bin/python -m bench.federation --arms federated --proximal-mu 0.01 ... # FedProx at the sites
    .venv/bin/python -m bench.federation --arms federated --local-steps 24 ...  # half-epoch rounds (B = 1, 48 examples)
    .venv/bin/python -m bench.federation --batch-size 1 ...                   # more local steps per epoch, every arm
    .venv/bin/python -m bench.federation --text free --arms pooled ...         # item reading on free text
    .venv/bin/python -m bench.federation --merge a/federation.json b/federation.json c/federation.json --out abc
                                                      # arms measured one run at a time, joined with the targets
Give each run its own --out: a run refuses an --out whose federation.json holds other arms or seeds
(--merge needs it; --overwrite replaces it), and an --out another run is using (a lock file).
The federated arm fails when a site failed or withheld the final evaluation, or a round aggregated
fewer sites than the run has: its figures would cover other participants than the local arms'.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import (check_fresh_output, exclusive_lock, fresh_output, non_negative_int, positive_int, refuse,
                          comma_list)

ARMS = ("local_only", "federated", "pooled")
BENCH = "bench.federation"
LOCK = "federation.lock"           # in --out, held for the whole run: another run there is refused


def seed_list(text: str) -> str:
    """``--seeds``: comma-separated whole numbers >= 0, each once (``--seeds a`` ended in a traceback);
    kept as the text "0,1" the reports have always stored."""
    return ",".join(map(str, comma_list(non_negative_int, "seed", unique=True)(text)))


def arm_list(text: str) -> list[str]:
    """``--arms``: known arm names only (an unknown one used to run nothing and print a null summary)."""
    arms = [a.strip().replace("-", "_") for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown or [text]}: choose from {', '.join(ARMS)}")
    return arms


def _metrics(evaluation) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in evaluation.metrics().items()}


def _train(sm, exs_by_stage, epochs: dict, cfg, curve: list, check, label: str) -> None:
    """Both stages with the shared trainer; after every epoch one point of the learning curve (also on
    stderr as progress: an arm takes up to an hour)."""
    from mllm_dr.training import train_stage

    done = 0
    for stage in (1, 2):
        if not epochs[stage]:
            continue

        def point(epoch, stats, stage=stage):
            nonlocal done
            done += 1
            curve.append({"step": done, "stage": stage, "train_loss": round(stats["loss"], 4), **check()})
            print(json.dumps({"progress": label, "epochs": f"{done}/{epochs[1] + epochs[2]}", **curve[-1]}),
                  file=sys.stderr, flush=True)

        train_stage(sm, exs_by_stage[stage], stage, epochs[stage], cfg, on_epoch=point)


def _check(sites, sm_of) -> dict:
    """The cheap held-out check (regression head, no generation), pooled over the sites."""
    from mllm_dr.evaluation import Evaluation, regression_evaluate

    pooled = Evaluation()
    for ws in sites:
        pooled.merge(regression_evaluate(ws, sm_of(ws), "test"))
    return {"check_ccc": round(pooled.metrics()["ccc"], 4), "check_mae": round(pooled.metrics()["mae"], 4)}


def _evaluate(ws, sm, max_new_tokens: int, unconstrained) -> object:
    """The kit's evaluation of ``ws``'s test split; and, merged into ``unconstrained``, the same model's
    answers decoded without the verbatim-quotes rule (quotes.py): the baseline for the rationale checks."""
    from mllm_dr.evaluation import evaluate_split

    unconstrained.merge(evaluate_split(ws, sm, "test", max_new_tokens, verbatim_quotes=False))
    return evaluate_split(ws, sm, "test", max_new_tokens)


def _rationale_baseline(unconstrained) -> dict:
    return {k: v for k, v in _metrics(unconstrained).items()
            if k.startswith("rationale_") or k in ("ccc", "item_mae", "format_violation_rate")}


def arm_local(wss, base, tok, info, config, cfg, epochs, max_new_tokens) -> dict:
    from mllm_dr.adapters import build_site_model
    from mllm_dr.dataset import examples, labelled_training_instances
    from mllm_dr.evaluation import Evaluation

    t0, pooled, per_site, curves, rows = time.perf_counter(), Evaluation(), {}, {}, []
    unconstrained = Evaluation()
    for ws in wss:
        sm = build_site_model(copy.deepcopy(base), tok, info, _dims(ws), config, seed=cfg.seed)
        insts = labelled_training_instances(ws)
        exs = {s: examples(ws, insts, s) for s in (1, 2)}
        sm.processor.fit_norms(exs[1])
        curves[ws.config.site_id] = []
        _train(sm, exs, epochs, cfg, curves[ws.config.site_id], lambda sm=sm, ws=ws: _check([ws], lambda _: sm),
               f"local_only {ws.config.site_id}")
        result = _evaluate(ws, sm, max_new_tokens, unconstrained)
        per_site[ws.config.site_id] = _metrics(result)
        pooled.merge(result)
        rows += [r | {"site": ws.config.site_id} for r in result.rows]
    return {"pooled_over_sites": _metrics(pooled), "sites": per_site,
            "mean_site_mae": statistics.fmean(m["mae"] for m in per_site.values()),
            "without_verbatim_quotes": _rationale_baseline(unconstrained), "curves": curves, "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def arm_pooled(wss, base, tok, info, config, cfg, epochs, max_new_tokens) -> dict:
    from mllm_dr.adapters import build_site_model
    from mllm_dr.dataset import examples, labelled_training_instances
    from mllm_dr.evaluation import Evaluation

    t0 = time.perf_counter()
    sm = build_site_model(copy.deepcopy(base), tok, info, _dims(wss[0]), config, seed=cfg.seed)
    exs = {s: [e for ws in wss for e in examples(ws, labelled_training_instances(ws), s)] for s in (1, 2)}
    sm.processor.fit_norms(exs[1])
    curve: list = []
    _train(sm, exs, epochs, cfg, curve, lambda: _check(wss, lambda _: sm), "pooled")
    pooled, per_site, rows, unconstrained = Evaluation(), {}, [], Evaluation()
    for ws in wss:
        result = _evaluate(ws, sm, max_new_tokens, unconstrained)
        per_site[ws.config.site_id] = _metrics(result)
        pooled.merge(result)
        rows += [r | {"site": ws.config.site_id} for r in result.rows]
    return {"pooled_over_sites": _metrics(pooled), "sites": per_site,
            "without_verbatim_quotes": _rationale_baseline(unconstrained), "curves": {"pooled": curve}, "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def arm_federated(root: Path, corpora, args) -> dict:
    from bench.deployment import LocalFederation, cli

    t0 = time.perf_counter()
    with LocalFederation(root, corpora, threads=args.site_threads, policies=_policies(corpora)) as fed:
        fed.setup(extract=False)
        for name, corpus in zip(fed.names, corpora):      # the same context budget at every site
            ws_json = fed.workspace(name) / "workspace.json"
            ws_json.write_text(json.dumps(json.loads(ws_json.read_text()) | {"max_context_tokens": args.max_context_tokens}))
            cli("mllmdr-site", "extract", "--workspace", fed.workspace(name), "--corpus", corpus, env=fed.env)
        fed.start(base_model=args.base_model)
        fed.run("bench", "--base-model", args.base_model, "--stage1-rounds", args.stage1_rounds,
                "--stage2-rounds", args.stage2_rounds, "--local-epochs", args.local_epochs,
                "--min-sites", len(corpora), "--eval-max-new-tokens", args.max_new_tokens, "--round-validation",
                "--seed", args.seed_now, "--set", f"lr-lora={args.lr_lora}", "--set",
                f"score-weight={args.score_weight}", "--set", f"server-lr={args.server_lr}",
                "--set", f"proximal-mu={args.proximal_mu}", "--set", f"local-steps={args.local_steps}",
                "--set", f"answer-order={args.answer_order}", "--set", f"prompt-layout={args.prompt_layout}",
                "--set", f"feature-norms={args.feature_norms}",
                "--set", f"batch-size={args.batch_size}", "--aggregation",
                args.aggregation, "--uplink", args.uplink, timeout=args.run_timeout)
        hist = fed.history("bench")
        rows = {}
        for name in fed.names:
            report = fed.workspace(name) / "reports" / "federated-bench-test.json"
            rows[name] = json.loads(report.read_text())["rows"] if report.is_file() else []
    return federated_result(hist, rows, args.local_epochs, args.local_steps, args.batch_size) | {
        "uplink": args.uplink, "seconds": round(time.perf_counter() - t0, 1)}


def federated_result(hist: dict, rows_by_site: dict[str, list[dict]], local_epochs: int, local_steps: int = 0,
                     batch_size: int = 1) -> dict:
    """The federated arm's figures from the run's history and each site's own test report (its rows).

    Refuses (SystemExit, one line) an arm that would silently cover fewer sites or participants than the
    local arms (a benchmark review, session 45: the evaluation's ``failed`` was ignored): a site that
    failed or gave no final evaluation, a site whose evaluation counts other participants than its report
    (a site under ``min_release_participants`` sends an evaluation of no one), or a round that aggregated
    fewer sites than the run has.

    Each curve point carries ``epochs``, the local epochs done by the end of the round (rounds x
    ``local_epochs``), so that it is drawn against the local arms' epochs; with ``local_steps`` a
    round's epochs are steps x batch size / the sites' mean training examples (a short batch counted
    as full: an upper estimate)."""
    from mllm_dr.reports import global_checks

    sites, ev = list(rows_by_site), hist.get("evaluation") or {}
    problems = []
    if not ev:
        problems.append("the run's history has no final evaluation")
    else:
        for site, why in sorted((ev.get("failed") or {}).items()):
            problems.append(f"{site} failed the evaluation ({why})")
        evaluated = ev.get("sites") or {}
        for site in sites:
            if site not in evaluated:
                if site not in (ev.get("failed") or {}):
                    problems.append(f"{site} sent no evaluation")
            elif evaluated[site].get("n") != len(rows_by_site[site]):
                problems.append(f"{site}'s evaluation counts {evaluated[site].get('n')} test participant(s), its "
                                f"report {len(rows_by_site[site])} (a site below min_release_participants "
                                f"withholds its figures)")
        n, held = (ev.get("pooled") or {}).get("n"), sum(len(r) for r in rows_by_site.values())
        if n != held:
            problems.append(f"the pooled evaluation counts {n} test participant(s), the sites' reports {held}")
    for r in hist.get("rounds", []):
        missing = sorted(set(sites) - set(r.get("sites", {})))
        if missing or r.get("rejected"):
            problems.append(f"round {r['round']} aggregated without {', '.join(missing or sorted(r['rejected']))}")
    if problems:
        raise SystemExit("federated arm: " + "; ".join(problems) + ": its figures would not cover every site's "
                         "test participants; not reported")
    checks = global_checks(hist)               # the global after each round, as the local arms check after each epoch
    curve, epochs = [], 0.0
    for r in hist["rounds"]:
        if local_steps:
            examples = [s["examples"] for s in r["sites"].values() if s.get("examples")]
            epochs += local_steps * batch_size / statistics.fmean(examples) if examples else 0.0
        else:
            epochs += local_epochs
        curve.append({"step": r["round"], "epochs": round(epochs, 3), "stage": r["stage"],
                      "train_loss": round(r["train_loss"], 4),
                      "check_ccc": _rounded(checks.get(r["round"], {}).get("ccc")),
                      "check_mae": _rounded(checks.get(r["round"], {}).get("mae")),
                      "round_seconds": round(r["round_seconds"], 1), "round_overhead": r.get("round_overhead")})
    rows = [r | {"site": site} for site in sites for r in rows_by_site[site]]
    return {"pooled_over_sites": ev["pooled"], "sites": ev["sites"], "curves": {"federated": curve}, "rows": rows,
            "epochs_per_round": local_epochs if not local_steps else None,
            "bytes_up_per_site": {r["stage"]: max(s["bytes_up"] for s in r["sites"].values()) for r in hist["rounds"]}}


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _policies(corpora) -> dict:
    """Small synthetic sites: the default policy's minimum of labelled participants, lowered to 2; its
    release floor pinned at 1 (no floor), whatever the default policy becomes: with a floor above a
    site's 2-3 test participants the site would send an evaluation of no one (``federated_result``
    then fails the arm)."""
    from policies.schema import SitePolicy, load_policy

    pol = load_policy().model_dump() | {"min_participants": 2}
    if "min_release_participants" in SitePolicy.model_fields:
        pol["min_release_participants"] = 1
    return {f"site{i + 1}": pol for i in range(len(corpora))}


def _dims(ws) -> dict:
    from mllm_dr.features.store import FeatureStore

    return FeatureStore(ws.features_dir).dims()


def one_seed(args, seed: int) -> dict:
    from mllm_dr.base_model import load_base
    from mllm_dr.config import DEFAULT_MODEL, TrainConfig, model_with
    from mllm_dr.corpus import read_corpus
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.workspace import Workspace

    out = fresh_output(args.out / f"seed{seed}", BENCH)      # never a folder this benchmark did not make
    corpora = seed_corpora(args, seed, out)
    wss = []
    for k, corpus in enumerate(corpora):
        ws = Workspace.init(out / "local" / f"site{k + 1}", f"site{k + 1}")
        ws.config.corpus_path, ws.config.corpus_format = str(corpus), "edaic"
        ws.save()
        extract_corpus(read_corpus(corpus), FeatureStore(ws.features_dir), ws.config.extraction)
        wss.append(ws)
    for ws in wss:
        ws.config.max_context_tokens = args.max_context_tokens
        ws.save()
    base, tok, info = load_base(args.base_model)
    cfg = TrainConfig(seed=seed, lr_lora=args.lr_lora, score_weight=args.score_weight, batch_size=args.batch_size)
    epochs = {1: args.stage1_rounds * args.local_epochs, 2: args.stage2_rounds * args.local_epochs}
    args.seed_now = seed
    res = {"seed": seed, "site_mean_baseline": site_mean_baseline(corpora)}
    if "federated" in args.arms:
        res["federated"] = arm_federated(out / "federation", corpora, args)
    model = model_with(DEFAULT_MODEL.lora.r, answer_order=args.answer_order, prompt_layout=args.prompt_layout,
                       feature_norm="participant" if args.feature_norms == "participant" else "dataset")
    if "pooled" in args.arms:
        res["pooled"] = arm_pooled(wss, base, tok, info, model, cfg, epochs, args.max_new_tokens)
    if "local_only" in args.arms:
        res["local_only"] = arm_local(wss, base, tok, info, model, cfg, epochs, args.max_new_tokens)
    return with_targets(res)


def seed_corpora(args, seed: int, out: Path) -> list[Path]:
    """The seed's synthetic sites under ``out / corpus``: what every arm and the site-mean baseline read."""
    from mllm_dr.synth import SynthConfig, write_synthetic

    return write_synthetic(SynthConfig(out / "corpus", "edaic", args.participants, args.sites, seed, text=args.text))


def site_mean_baseline(corpora) -> dict:
    """What between-site differences alone give: every test participant predicted as their site's mean
    training (train + dev) total, no per-participant information; pooled over the sites' test
    participants. A benchmark review (session 41) found it at pooled CCC ~0.7-0.8 on the template
    corpus: the level any arm's pooled-over-sites CCC must be read against."""
    from mllm_dr.corpus import read_corpus
    from mllm_dr.dataset import TRAINING_SPLITS
    from mllm_dr.metrics import evaluate_totals
    from mllm_dr.corpus.labels import effective_split

    true, pred = [], []
    for root in corpora:
        people = [p for p in read_corpus(root).participants if p.total is not None]
        train = [p.total for p in people if effective_split(p.id, p.split) in TRAINING_SPLITS]
        mean = statistics.fmean(train) if train else 0.0
        for p in people:
            if effective_split(p.id, p.split) == "test":
                true.append(float(p.total))
                pred.append(mean)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in evaluate_totals(true, pred).items()}


def within_site_ccc(arm: dict, sites: set | None = None) -> float:
    """Mean over sites (``sites``: only these) of the CCC on the site's own test participants (sites with a
    defined CCC; NaN if no site has one)."""
    cccs = [s["ccc"] for name, s in arm["sites"].items() if s["ccc"] == s["ccc"] and (sites is None or name in sites)]
    return statistics.fmean(cccs) if cccs else float("nan")


def defined_sites(*arms: dict) -> set:
    """The sites whose own CCC every one of ``arms`` defines: a difference of within-site means is taken over
    these, never over different site sets (a benchmark review, session 43)."""
    return set.intersection(*({n for n, s in a["sites"].items() if s["ccc"] == s["ccc"]} for a in arms))


def with_targets(res: dict) -> dict:
    """A seed's result with the issue's target differences, once it holds all three arms."""
    if all(a in res for a in ARMS):
        fed, pool, local = (res[a]["pooled_over_sites"]["ccc"] for a in ("federated", "pooled", "local_only"))
        res["targets"] = {"federated_minus_pooled": round(fed - pool, 4),
                          "federated_minus_mean_local": round(fed - within_site_ccc(res["local_only"]), 4),
                          "federated_minus_local_pooled": round(fed - local, 4),
                          # like with like: each site's own test participants, federated model vs the site's own
                          "federated_minus_local_within_sites": round(
                              within_site_ccc(res["federated"], common := defined_sites(res["federated"], res["local_only"]))
                              - within_site_ccc(res["local_only"], common), 4)}
    if "federated" in res and all(res[a].get("rows") for a in ARMS if a in res):
        res["bootstrap"] = paired_bootstrap(res)
    return res


# the targets, as (other arm, margin): federated - other >= margin
TARGET_MARGINS = {"pooled": -0.05, "local_only": 0.10}


def paired_bootstrap(res: dict, draws: int = 2000, seed: int = 0) -> dict:
    """How firm a seed's difference between arms is at its few test participants: the participants are
    drawn with replacement within each site (each site keeps its size, so the sites' mix is the test
    split's), every arm is read on the same draw, and the pooled CCC of federated minus each other arm
    is taken. Reports the observed difference, the 5th-95th percentile of the draws and the share of
    draws in which the issue's target holds; draws where a CCC is undefined (no spread) are left out."""
    import random

    from mllm_dr.metrics import evaluate_totals

    # keyed by (site, participant): two sites may use the same ids (a review found rows overwriting each other)
    rows = {a: {(r["site"], r["participant"]): r for r in res[a]["rows"]} for a in ARMS if a in res}
    ids = sorted(rows["federated"])
    if any(sorted(by_id) != ids for by_id in rows.values()):
        raise SystemExit("the arms were read on different test participants: no paired comparison")
    by_site: dict[str, list[str]] = {}
    for key in ids:
        by_site.setdefault(key[0], []).append(key)

    def ccc(arm, drawn):
        return evaluate_totals([rows[arm][p]["true"] for p in drawn], [rows[arm][p]["pred"] for p in drawn])["ccc"]

    rng, diffs = random.Random(seed), {a: [] for a in rows if a != "federated"}
    for _ in range(draws):
        drawn = [rng.choice(site) for site in by_site.values() for _ in site]
        fed = ccc("federated", drawn)
        for other in diffs:
            d = fed - ccc(other, drawn)
            if d == d:
                diffs[other].append(d)
    out = {"draws": draws, "n": len(ids), "sites": {k: len(v) for k, v in by_site.items()}}
    for other, ds in diffs.items():
        ds.sort()
        margin = TARGET_MARGINS[other]
        observed = ccc("federated", ids) - ccc(other, ids)
        out[f"federated_minus_{other}"] = {
            "observed": round(observed, 4), "defined_draws": len(ds),
            "p05": round(ds[int(0.05 * (len(ds) - 1))], 4) if ds else None,
            "p95": round(ds[int(0.95 * (len(ds) - 1))], 4) if ds else None,
            "target": f">= {margin:+.2f}",
            "share_meeting_target": round(sum(d >= margin for d in ds) / len(ds), 4) if ds else None}
    return out


# what may differ between runs whose arms are merged (how and where it ran, not what was measured)
# (the code's commit is listed per input, not required equal: an arm takes up to an hour, so runs span sessions)
MERGE_MAY_DIFFER = {"arms", "out", "threads", "site_threads", "run_timeout", "seeds", "merge", "seed_now", "commit",
                    "merged_from", "overwrite"}
# options added after some reports were written: a report without one ran at this value
MERGE_DEFAULTS = {"proximal_mu": 0.0, "local_steps": 0}


def merged(reports: list[tuple[Path, dict]]) -> tuple[dict, list[dict]]:
    """Arms measured by separate runs (one arm at a time: an arm takes up to an hour here) joined per seed.
    The runs must agree on everything that defines the measurement (corpus, schedule, model, ...);
    how each ran (arms, threads, commit) is kept per input under ``merged_from``."""
    (first_path, first), results = reports[0], {}
    def measured(config):
        return {k: v for k, v in (MERGE_DEFAULTS | config).items() if k not in MERGE_MAY_DIFFER}

    same = measured(first["config"])
    for path, rep in reports:
        other = measured(rep["config"])
        diff = sorted(k for k in same.keys() | other.keys() if same.get(k) != other.get(k))
        if diff:
            raise SystemExit(f"{path}: not the same measurement as {first_path} ({', '.join(diff)} differ)")
        for r in rep["per_seed"]:
            into = results.setdefault(r["seed"], {"seed": r["seed"]})
            if "site_mean_baseline" in r:          # the corpus's, the same in every run of that seed
                into["site_mean_baseline"] = r["site_mean_baseline"]
            for arm in ARMS:
                if arm in r:
                    if arm in into:
                        raise SystemExit(f"{path}: seed {r['seed']}'s {arm} arm is also in another file")
                    into[arm] = r[arm]
    arms = [a for a in ARMS if any(a in r for r in results.values())]
    gaps = [f"seed {k} has no {a} arm" for k, r in sorted(results.items()) for a in arms if a not in r]
    if gaps:
        print(json.dumps({"warning": "incomplete seeds: the summary and table leave those arms out", "gaps": gaps}),
              file=sys.stderr)
    # an input that is itself a merge passes on where its arms came from (their commits), not itself
    config = same | {"arms": arms, "seeds": ",".join(str(k) for k in sorted(results)),
                     "merged_from": [m for p, r in reports for m in (r["config"].get("merged_from") or [
                         {"file": str(p), **{k: r["config"].get(k) for k in
                                             ("arms", "seeds", "threads", "site_threads", "commit")}}])]}
    return config, [with_targets(results[k]) for k in sorted(results)]


def commit() -> str | None:
    """The code this benchmark ran (``+dirty`` with uncommitted changes), for the report."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def summary(results: list[dict]) -> dict:
    def spread(values):
        kept = [v for v in values if v == v]          # a NaN (no spread in truth) is left out, and counted
        if not kept:
            return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "seeds": 0}
        return {"mean": round(statistics.fmean(kept), 4), "min": round(min(kept), 4), "max": round(max(kept), 4)} | (
            {"seeds": len(kept), "of": len(values)} if len(kept) < len(values) else {})

    out = {}
    for arm in ARMS:
        out[arm] = {k: spread([r[arm]["pooled_over_sites"].get(k, float("nan")) for r in results])
                    for k in ("ccc", "rmse", "mae", "f1", "item_mae", "item_exact", "flat_pred_share",
                              "format_violation_rate", "rationale_item_grounded", "rationale_item_grounded_truth",
                              "rationale_no_evidence", "rationale_repeated", "maa_ccc", "maa_item_mae")}
        out[arm]["within_site_ccc"] = spread([within_site_ccc(r[arm]) for r in results])
        out[arm]["seconds"] = spread([r[arm]["seconds"] for r in results])
    out["targets"] = {k: spread([r["targets"][k] for r in results]) for k in results[0]["targets"]}
    # on the mean over seeds and on the worst seed; the literal "mean local-only" compares federated's
    # CCC pooled over sites with the mean of the sites' own CCCs, two different measures (README says so)
    t = out["targets"]
    out["targets"]["met"] = {
        "federated >= pooled - 0.05 (mean over seeds)": t["federated_minus_pooled"]["mean"] >= -0.05,
        "federated >= pooled - 0.05 (worst seed)": t["federated_minus_pooled"]["min"] >= -0.05,
        "federated (pooled over sites) >= mean local-only (each site's own CCC) + 0.10: literal, not like with like":
            t["federated_minus_mean_local"]["mean"] >= 0.10,
        "federated >= local-only + 0.10, both pooled over sites (mean over seeds)":
            t["federated_minus_local_pooled"]["mean"] >= 0.10,
        "federated >= local + 0.10, each site's own participants (2-point CCCs: read loosely)":
            t["federated_minus_local_within_sites"]["mean"] >= 0.10}
    baselines = [r["site_mean_baseline"]["ccc"] for r in results if "site_mean_baseline" in r]
    if baselines:
        out["site_mean_baseline_ccc"] = spread(baselines)
    return out


def markdown(report: dict) -> str:
    """The README's table: per arm, mean [min, max] over seeds of the figures of the final evaluation."""
    results = report["per_seed"]
    arms = [a for a in ARMS if all(a in r for r in results)]

    def cell(values, digits=2):
        kept = [v for v in values if v == v]                          # NaN (no spread in truth) left out, said
        if not kept:
            return "n/a"
        mean = sum(kept) / len(kept)
        return (f"{mean:.{digits}f}" + (f" [{min(kept):.{digits}f}, {max(kept):.{digits}f}]" if len(kept) > 1 else "")
                + (f" ({len(kept)} of {len(values)} seeds)" if len(kept) < len(values) else ""))

    rows = [("CCC (pooled over the sites' test splits)", lambda r, a: r[a]["pooled_over_sites"]["ccc"], 2),
            ("CCC within a site (mean of sites)", lambda r, a: within_site_ccc(r[a]), 2),
            ("RMSE", lambda r, a: r[a]["pooled_over_sites"]["rmse"], 2),
            ("MAE", lambda r, a: r[a]["pooled_over_sites"]["mae"], 2),
            ("F1 (total >= 10)", lambda r, a: r[a]["pooled_over_sites"]["f1"], 2),
            ("item MAE", lambda r, a: r[a]["pooled_over_sites"]["item_mae"], 2),
            ("format violations", lambda r, a: r[a]["pooled_over_sites"]["format_violation_rate"], 2),
            ("rationale item-grounded", lambda r, a: r[a]["pooled_over_sites"]["rationale_item_grounded"], 2),
            ("rationale item-grounded on the true answer turns (synthetic: asked items)",
             lambda r, a: r[a]["pooled_over_sites"].get("rationale_item_grounded_truth", float("nan")), 2),
            ("items with no evidence turn (nobody spoke to them)",
             lambda r, a: r[a]["pooled_over_sites"].get("rationale_no_evidence", float("nan")), 2),
            ("rationale repeated", lambda r, a: r[a]["pooled_over_sites"]["rationale_repeated"], 2),
            ("same answers without the verbatim-quotes rule: item-grounded",
             lambda r, a: r[a].get("without_verbatim_quotes", {}).get("rationale_item_grounded", float("nan")), 2),
            ("same answers without the verbatim-quotes rule: repeated",
             lambda r, a: r[a].get("without_verbatim_quotes", {}).get("rationale_repeated", float("nan")), 2),
            ("MAA head alone: CCC (same participants)", lambda r, a: r[a]["pooled_over_sites"].get("maa_ccc", float("nan")), 2),
            ("MAA head alone: item MAE", lambda r, a: r[a]["pooled_over_sites"].get("maa_item_mae", float("nan")), 2),
            ("n test participants", lambda r, a: r[a]["pooled_over_sites"]["n"], 0),
            ("wall time (s; not comparable across arms: federated trains its sites in parallel and counts "
             "enrollment, extraction and process start-up, the local arms run sites one after another and "
             "decode twice)", lambda r, a: r[a]["seconds"], 0)]
    seeds = ", ".join(str(r["seed"]) for r in results)
    out = [f"| seeds {seeds}: mean [min, max] | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for label, get, digits in rows:
        out.append(f"| {label} | " + " | ".join(cell([get(r, a) for r in results], digits) for a in arms) + " |")
    base = [r["site_mean_baseline"]["ccc"] for r in results if "site_mean_baseline" in r]
    if base:
        out.append(f"\nSite-mean baseline (each test participant predicted as their site's mean training total; "
                   f"between-site differences alone): pooled CCC {cell(base)}. Read every pooled-over-sites CCC "
                   f"against it.")
    out.append("\nWithin-site CCCs are of 2-3 test participants a site: read them loosely. The bootstrap below redraws "
               "participants within sites with the models fixed; the spread across seeds is the larger uncertainty.")
    for r in results:
        boot = r.get("bootstrap")
        for other in [a for a in ARMS if boot and f"federated_minus_{a}" in boot]:
            b = boot[f"federated_minus_{other}"]
            out.append(f"\nSeed {r['seed']}, federated - {other}, CCC pooled over the sites: {b['observed']:+.2f}; "
                       f"participants redrawn within sites ({boot['draws']} draws, n = {boot['n']}): 90% of draws in "
                       f"[{b['p05']:+.2f}, {b['p95']:+.2f}], target {b['target']} held in "
                       f"{100 * b['share_meeting_target']:.0f}% of them.")
    return "\n".join(out) + "\n"


def main() -> None:
    from cli.common import quiet_libraries
    from mllm_dr.config import (ANSWER_ORDERS, DEFAULT_FEATURE_NORMS, DEFAULT_MODEL, DEFAULT_TRAIN, FEATURE_NORMS,
                                PROMPT_LAYOUTS)
    from mllm_dr.protocol import UPLINK_ENCODINGS
    from mllm_dr.synth import TEXT_MODES

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--participants", type=positive_int, default=24)
    ap.add_argument("--sites", type=positive_int, default=3)
    ap.add_argument("--text", default="template", choices=TEXT_MODES,
                    help="interview text: one sentence per item score, or free paraphrases (data synth --text)")
    ap.add_argument("--seeds", default="0,1", type=seed_list, help="comma-separated seeds (whole numbers)")
    ap.add_argument("--stage1-rounds", type=non_negative_int, default=1)
    ap.add_argument("--stage2-rounds", type=non_negative_int, default=3)
    ap.add_argument("--local-epochs", type=positive_int, default=1)
    ap.add_argument("--max-new-tokens", type=positive_int, default=48)
    ap.add_argument("--site-threads", type=positive_int, default=1, help="threads per site process in the federated arm")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads of this process (the local-only and pooled arms)")
    ap.add_argument("--arms", default=",".join(ARMS), type=arm_list,
                    help=f"comma-separated, any of {', '.join(ARMS)} ('local-only' is read as local_only)")
    ap.add_argument("--max-context-tokens", type=positive_int, default=384, help="dialogue budget per item instance")
    ap.add_argument("--lr-lora", type=float, default=5e-4)
    ap.add_argument("--run-timeout", type=float, default=3 * 3600,
                    help="seconds the federated arm's run may take (9 rounds of SmolLM2 plus the evaluation take ~1 h here)")
    ap.add_argument("--score-weight", type=float, default=0.0)
    ap.add_argument("--answer-order", default=DEFAULT_MODEL.answer_order, choices=ANSWER_ORDERS,
                    help="the answer's order (ModelConfig.answer_order): reason-first puts the quote before the score")
    ap.add_argument("--prompt-layout", default=DEFAULT_MODEL.prompt_layout, choices=PROMPT_LAYOUTS,
                    help="ModelConfig.prompt_layout: dialogue-first batches a participant's items and computes "
                         "their shared media and dialogue once")
    ap.add_argument("--feature-norms", default=DEFAULT_FEATURE_NORMS, choices=FEATURE_NORMS,
                    help="federated arm: normalise features over every site (the pooled arm's norms) or per site")
    ap.add_argument("--aggregation", default="exact-lora", help="federated arm: exact-lora | ffa-lora | fedavg")
    ap.add_argument("--server-lr", type=float, default=1.0,
                    help="federated arm: the center's step along the sites' average (FedOpt; 1 = plain averaging)")
    ap.add_argument("--proximal-mu", type=float, default=0.0,
                    help="federated arm: FedProx's mu at the sites (0 = plain local training)")
    ap.add_argument("--local-steps", type=non_negative_int, default=0,
                    help="federated arm: each site's optimizer steps per round instead of --local-epochs whole "
                         "epochs (e.g. half an epoch: twice the rounds average the sites twice per epoch)")
    ap.add_argument("--batch-size", "--site-batch-size", dest="batch_size", type=positive_int,
                    default=DEFAULT_TRAIN.batch_size,
                    help="every arm's local batch size (the federated sites' FedAvg B; the local arms' TrainConfig)")
    ap.add_argument("--uplink", default="fp32", choices=UPLINK_ENCODINGS,
                    help="federated arm: how sites encode their replies (int8: delta + error feedback)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-federation"))
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out's federation.json even when it holds other arms or seeds than this run "
                         "(refused without: arms run one at a time need their own --out for --merge)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="join the arms of earlier runs' federation.json (same corpus and schedule, one arm each) "
                         "into one report with the targets; trains nothing")
    ap.add_argument("--site-mean-only", action="store_true",
                    help="write each seed's corpus and print only the site-mean baseline (what between-site "
                         "differences alone give); trains nothing")
    args = ap.parse_args()
    local_arms = sorted(set(args.arms) - {"federated"})
    if local_arms and (args.local_steps or args.aggregation == "ffa-lora"):
        # the local arms train whole epochs of full LoRA: with steps per round or a frozen A they would not
        # train what the federated arm trains (a benchmark review, session 43), and --merge could not tell
        ap.error(f"--local-steps and --aggregation ffa-lora apply to the federated arm only; the {', '.join(local_arms)} "
                 f"arm(s) would train another budget or model: run them with --arms federated")
    if args.site_mean_only:
        for seed in [int(s) for s in args.seeds.split(",")]:
            corpora = seed_corpora(args, seed, args.out / f"seed{seed}")
            print(json.dumps({"seed": seed, "participants": args.participants, "sites": args.sites,
                              "text": args.text, "site_mean_baseline": site_mean_baseline(corpora)}), flush=True)
        return
    if args.merge:
        if (args.out / "federation.json").resolve() in {p.resolve() for p in args.merge}:
            ap.error(f"--out {args.out} holds one of the inputs: the merged report would replace it")
        config, results = merged([(p, json.loads(p.read_text())) for p in args.merge])
        with exclusive_lock(args.out, LOCK, f" ({BENCH})"):  # not into the folder of a run still going
            return write_report(config, results, args.out)
    with exclusive_lock(args.out, LOCK, f" ({BENCH})"):      # held until the report is written
        if not args.overwrite:
            refuse_other_report(args.out, args.arms, args.seeds)
        for seed in [int(s) for s in args.seeds.split(",")]:   # before minutes of work: refused, not half done
            check_fresh_output(args.out / f"seed{seed}", BENCH)
        args.commit = commit()
        from mllm_dr.evidence import selector_fingerprint

        args.evidence_selector = selector_fingerprint()   # a merge refuses runs whose quotes came from another
        torch.set_num_threads(args.threads)
        results = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            results.append(one_seed(args, seed))
            print(json.dumps({k: v for k, v in results[-1].items()}, default=float), flush=True)
        write_report({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, results, args.out)


def refuse_other_report(out: Path, arms: list[str], seeds: str) -> None:
    """Exit 2 when ``out/federation.json`` holds another run's report (other arms or seeds): arms measured
    one run at a time with the same --out deleted each other's seed folders and replaced the report that
    --merge needs (a benchmark review, session 45). The same arms and seeds again may replace it."""
    path = out / "federation.json"
    if not path.exists():
        return
    try:
        config = json.loads(path.read_text())["config"]
        theirs = (sorted(config["arms"]), sorted(int(s) for s in str(config["seeds"]).split(",")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        refuse(f"{path} exists and is not a report this benchmark can read ({type(err).__name__}): give this run "
               f"its own --out, or --overwrite")
    mine = (sorted(arms), sorted(int(s) for s in seeds.split(",")))
    if theirs != mine:
        refuse(f"{path} holds another run's report (arms {','.join(theirs[0])}, seeds "
               f"{','.join(map(str, theirs[1]))}); this run (arms {','.join(mine[0])}, seeds "
               f"{','.join(map(str, mine[1]))}) would replace it and its seed folders: give each run its own --out "
               f"and join them with --merge, or --overwrite")


def write_report(config: dict, results: list[dict], out: Path) -> None:
    from bench.plots import federation_figure

    report = {"config": config, "summary": summary(results) if all("targets" in r for r in results) else None,
              "per_seed": results}
    out.mkdir(parents=True, exist_ok=True)
    # reports from before the federated curve carried its epochs: the run's epochs per round, unless it ran
    # steps per round (then the round it was)
    per_round = None if config.get("local_steps") else config.get("local_epochs")
    report["figure"] = str(federation_figure(results, out / "federation.png", per_round))
    (out / "federation.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "federation.md").write_text(markdown(report))
    print(json.dumps({"summary": report["summary"], "figure": report["figure"], "json": str(out / "federation.json"),
                      "table": str(out / "federation.md")}, indent=1, default=float))


if __name__ == "__main__":
    main()
