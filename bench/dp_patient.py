"""Benchmark: what patient-level DP-SGD costs in utility, and how many patients a site needs.

One site (synthetic corpus, NOT clinical data), the same base, seed, epochs and held-out split in
every arm; the metric is the regression head's held-out CCC/MAE (``regression_evaluate``: the
cheap check, no generation).
- ``no_dp``: the kit's plain trainer (batches of ``--batch-size`` instances);
- ``eps=inf``: DP-SGD with clipping but no noise (what clipping and Poisson batches alone cost);
- ``eps=E``: DP-SGD whose noise multiplier Opacus' RDP accountant calibrates so that both stages
  together spend exactly E per patient (delta ``--delta``).
``--step item`` (``dp.step = "item"``, the kit's default): a DP-SGD step trains one PHQ item and each
sampled patient gives that item's instance, so ``--patients-per-step 8`` makes steps like the plain
trainer's batches of 8 (one item, 8 patients expected); ``--step patient``: each sampled patient gives all 8
of its instances (one step per 1 / rate). An epoch is NOT the same number of steps in both trainers: DP-SGD
runs round(1 / rate) passes over the items (the accountant's count), the plain trainer ceil(patients / batch)
batches per item, and DP-SGD sees round(1 / rate) x rate of the examples in expectation. At 19 patients, 8
per step and batches of 8: 16 DP-SGD steps an epoch against the plain trainer's 24, 0.84 of the examples.
The JSON gives both (``steps``, ``plain_steps``, ``epoch``) and each arm's steps as trained.
``--clip 0.5,1``: one set of DP arms per clip norm (``--as-if-patients`` arms too), named ``...,clip=C``.
``--as-if-patients P2,...``: arms ``eps=E@P2`` train here with the noise on each step's mean
gradient that a site of P2 patients would have at epsilon E (same sampling rate and steps, so the
same z; its mean averages P2 / P times as many patients: z x P / P2 here). That is the "total amount
of noise" equivalence (Sander et al., ICML 2023, "TAN without a burn"): utility follows the noise on
the mean, so a small site can measure what a big one would get. It assumes a bigger site's patients
give gradients like these; it is a utility estimate, not a privacy guarantee for this site.
``--lora-rank``, ``--frozen-a``, ``--maa-hidden``: the model of every arm (fewer trained numbers under DP).
``--feature-norm``: how every arm scales features (``participant``, each participant by their own
frames, is what the kit's patient-level DP requires; ``dataset``, the site's training frames, is what
sessions 9-22 measured); ``--baseline-feature-norms dataset`` adds plain-trainer arms
``no_dp,feature-norm=dataset`` in the same process, the baseline the chosen norms are compared with.
``--dp-stages 2``: a diagnosis of where the noise costs: stage 1 trains plainly, stage 2 with the same z
(not a privacy guarantee; such arms are named ``...,dp-stage2``).
Then, from the accountant alone: for sites of P patients (same epochs, same expected patients per
step), the noise multiplier each target epsilon needs; a site reaches the utility measured here
at epsilon E once its multiplier is no larger than the one used here for E.

    .venv/bin/python -m bench.dp_patient --base-model smollm2 --participants 24 --seeds 0 --patients-per-step 8 \
        --stage1-epochs 1 --stage2-epochs 6 --clip 1 --epsilons inf,8 --as-if-patients 500
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import get_args

import torch

from bench.common import (as_text, comma_list, fresh_output, non_negative_int, positive_int, positive_number,
                          positive_number_list)
from policies.schema import DPPolicy

BENCH = "bench.dp_patient"


def noise_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    if math.isinf(epsilon):
        return 0.0
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.005))


def steps_for(args, rate: float) -> int:
    """DP-SGD steps of both stages at this sampling rate (the trainer's own count, ``PatientDP``)."""
    from mllm_dr.training import PatientDP

    return (args.stage1_epochs + args.stage2_epochs) * PatientDP(1.0, 0.0, rate, step_items(args)).steps_per_epoch


def step_items(args) -> tuple[str, ...] | None:
    from mllm_dr.phq import PHQ8_ITEMS

    return PHQ8_ITEMS if args.step == "item" else None


def model_config(args, seed: int, feature_norm: str | None = None):
    """The model every arm of this process trains: the kit's default, or fewer trained numbers
    (``--lora-rank``, ``--frozen-a``: FFA-LoRA's A drawn from the seed and frozen, as the run plan's
    ``aggregation = "ffa-lora"`` does; ``--maa-hidden``: the regression head's hidden width)."""
    from mllm_dr.config import DEFAULT_MODEL, model_with

    maa = {"n_heads": DEFAULT_MODEL.maa.n_heads, "fc_hidden": args.maa_hidden or DEFAULT_MODEL.maa.fc_hidden}
    return model_with(args.lora_rank or DEFAULT_MODEL.lora.r, seed if args.frozen_a else None, maa=maa,
                      feature_norm=feature_norm or args.feature_norm)


def epoch_budget(args, exs: dict[int, list], rate: float, cfg, model_cfg) -> dict:
    """Steps and examples an epoch of each trainer takes, from the trainers' own counts: DP-SGD's
    (``PatientDP.steps_per_epoch``: round(1 / rate) passes over the items) and the plain trainer's batches
    (``training.epoch_batches``; how many there are depends on the examples' items/participants and the batch
    size, not on their lengths, so the model is not needed to count them). A review (session 45): this
    docstring's claim of "the same number of steps per epoch" was wrong (16 against 24 at 19 patients)."""
    from types import SimpleNamespace

    from mllm_dr.training import PatientDP, epoch_batches

    counting = SimpleNamespace(processor=SimpleNamespace(config=model_cfg, encode=lambda ex: {"ids": ()}))
    epochs = {1: args.stage1_epochs, 2: args.stage2_epochs}
    dp_per_epoch = PatientDP(1.0, 0.0, rate, step_items(args)).steps_per_epoch
    plain = {s: len(epoch_batches(counting, exs[s], s, cfg, 0)) for s in (1, 2)}
    passes = max(1, round(1 / rate))     # each pass: every patient drawn with probability rate for each item
    return {"steps": steps_for(args, rate), "plain_steps": sum(epochs[s] * plain[s] for s in (1, 2)),
            "epoch": {f"stage{s}": {"dp_steps": dp_per_epoch, "plain_steps": plain[s],
                                    "plain_examples": len(exs[s]),
                                    "dp_expected_examples": round(passes * rate * len(exs[s]), 1)}
                      for s in (1, 2)}}


def trained_numbers(sm, stage: int) -> int:
    return sum(p.numel() for ps in sm.model.stage_parameters(stage).values() for p in ps)


def one_arm(ws, base, tok, info, exs, cfg, epochs, dp, model_cfg, dp_stages=(1, 2)) -> dict:
    from mllm_dr.adapters import build_site_model
    from mllm_dr.evaluation import regression_evaluate
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.training import train_stage

    t0 = time.perf_counter()
    sm = build_site_model(copy.deepcopy(base), tok, info, FeatureStore(ws.features_dir).dims(), model_cfg,
                          seed=cfg.seed)
    sm.processor.fit_norms(exs[1])
    clipped, numbers, steps = [], {}, 0
    for stage in (1, 2):
        numbers[stage] = trained_numbers(sm, stage)
        hist = train_stage(sm, exs[stage], stage, epochs[stage], cfg, dp=dp if stage in dp_stages else None)
        clipped += [h["clipped_share"] for h in hist if "clipped_share" in h]
        steps += sum(h.get("steps", 0) for h in hist)
    m, fit = regression_evaluate(ws, sm, "test").metrics(), regression_evaluate(ws, sm, "train").metrics()
    return {"ccc": round(m["ccc"], 4), "mae": round(m["mae"], 4), "n_test": m["n"],
            "train_ccc": round(fit["ccc"], 4), "train_mae": round(fit["mae"], 4),
            "clipped_share": round(statistics.fmean(clipped), 3) if clipped else None,
            "trained_numbers": {f"stage{k}": v for k, v in numbers.items()}, "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1)}


def one_seed(args, seed: int) -> dict:
    from mllm_dr.base_model import load_base
    from mllm_dr.config import TrainConfig
    from mllm_dr.corpus import read_corpus
    from mllm_dr.dataset import examples, labelled_training_instances
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.synth import SynthConfig, write_synthetic
    from mllm_dr.training import PatientDP, by_patient
    from mllm_dr.workspace import Workspace

    out = fresh_output(args.out / f"seed{seed}", BENCH)      # never a folder this benchmark did not make
    corpus = write_synthetic(SynthConfig(out / "corpus", "edaic", args.participants, 1, seed))[0]
    ws = Workspace.init(out / "site", "site1")
    ws.config.corpus_path, ws.config.corpus_format, ws.config.max_context_tokens = str(corpus), "edaic", 256
    ws.save()
    extract_corpus(read_corpus(corpus), FeatureStore(ws.features_dir), ws.config.extraction)
    insts = labelled_training_instances(ws)
    exs = {s: examples(ws, insts, s) for s in (1, 2)}
    base, tok, info = load_base(args.base_model)
    patients = len(by_patient(exs[2]))
    rate = min(1.0, args.patients_per_step / patients)
    epochs = {1: args.stage1_epochs, 2: args.stage2_epochs}
    cfg = TrainConfig(seed=seed, batch_size=args.batch_size, lr_lora=args.lr_lora, lr_maa=args.lr_maa,
                      lr_lq=args.lr_lq)
    model_cfg = model_config(args, seed)
    budget = epoch_budget(args, exs, rate, cfg, model_cfg)
    steps = budget["steps"]
    res = {"seed": seed, "patients": patients, "sample_rate": round(rate, 4), **budget,
           "no_dp": one_arm(ws, base, tok, info, exs, cfg, epochs, None, model_cfg)}
    print(json.dumps({"seed": seed, "no_dp": res["no_dp"]}), flush=True)
    for norm in args.baseline_feature_norms:      # the same plain trainer, features scaled another way
        name = f"no_dp,feature-norm={norm}"
        res[name] = one_arm(ws, base, tok, info, exs, cfg, epochs, None, model_config(args, seed, norm))
        print(json.dumps({"seed": seed, name: res[name]}), flush=True)

    def dp_arm(name: str, clip: float, z: float, **extra) -> None:
        dp = PatientDP(clip, z, rate, step_items(args), seed=seed, optimizer=args.optimizer)
        arm = one_arm(ws, base, tok, info, exs, cfg, epochs, dp, model_cfg, args.dp_stages)
        if args.dp_stages != (1, 2):                  # a diagnosis: the other stage trains without DP
            name += ",dp-stage" + "+".join(map(str, args.dp_stages))
        res[name] = arm | {"noise_multiplier": round(z, 4), "clip": clip} | extra
        print(json.dumps({"seed": seed, name: res[name]}), flush=True)

    for name, clip, z, extra in dp_arms(args, rate, steps, patients):
        dp_arm(name, clip, z, **extra)
    return res


def dp_arms(args, rate: float, steps: int, patients: int) -> list[tuple[str, float, float, dict]]:
    """(name, clip, noise multiplier, extra fields) of every DP arm: per clip norm, the direct arms and the
    ``--as-if-patients`` arms (a bigger site's noise on the mean, trained here: TAN). Until session 45 the
    as-if arms took only the first ``--clip``."""
    arms = [(arm_name(args, eps, clip), clip, noise_for(eps, args.delta, rate, steps), {})
            for clip in (args.clips if args.direct else []) for eps in args.direct_epsilons]
    for size in args.as_if_patients:
        for eps in [e for e in args.epsilons if not math.isinf(e)]:
            z = noise_for(eps, args.delta, rate, steps)
            arms += [(arm_name(args, eps, clip, size), clip, z * patients / size,
                      {"noise_multiplier_at_that_size": round(z, 4)}) for clip in args.clips]
    return arms


def arm_name(args, eps: float, clip: float, as_if: int | None = None) -> str:
    return f"eps={eps:g}" + (f"@{as_if}" if as_if else "") + (f",clip={clip:g}" if len(args.clips) > 1 else "")


def patients_needed(args, epsilons: list[float], sizes: list[int]) -> dict:
    """From the accountant: the noise multiplier each epsilon needs at each site size (same epochs and
    expected patients per step as the benchmark)."""
    table = {}
    for p in sizes:
        rate = min(1.0, args.patients_per_step / p)
        steps = steps_for(args, rate)
        table[p] = {f"eps={e:g}": round(noise_for(e, args.delta, rate, steps), 3) for e in epsilons}
    return table


def noise_on_the_mean(args, patients: int, epsilons: list[float], sizes: list[int]) -> dict:
    """From the accountant, at this benchmark's sampling rate and steps (so the same noise multiplier z
    for an epsilon at every site size): the noise std on each step's mean clipped gradient per unit of
    clip norm, z / (rate * P), per site size P. A bigger site averages over more patients per step; a
    site has at least the utility measured here at epsilon E once its figure is no larger than
    this benchmark's for E."""
    rate = min(1.0, args.patients_per_step / patients)
    steps = steps_for(args, rate)
    z = {e: noise_for(e, args.delta, rate, steps) for e in epsilons}
    return {"sample_rate": round(rate, 4), "steps": steps,
            "noise_multiplier": {f"eps={e:g}": round(v, 4) for e, v in z.items()},
            "std_on_mean_gradient_per_unit_clip": {p: {f"eps={e:g}": round(v / (rate * p), 5) for e, v in z.items()}
                                     for p in sizes}}


def main() -> None:
    from cli.common import quiet_libraries
    from mllm_dr.config import FEATURE_NORM_SCOPES

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="tiny-random")
    ap.add_argument("--participants", type=positive_int, default=60)
    ap.add_argument("--seeds", default="0,1", type=as_text(comma_list(non_negative_int, "seed", unique=True)))
    ap.add_argument("--epsilons", default="1,4,8,inf", type=positive_number_list,
                    help="comma-separated target epsilons (inf: clipping without noise)")
    ap.add_argument("--stage1-epochs", type=non_negative_int, default=2)
    ap.add_argument("--stage2-epochs", type=non_negative_int, default=4)
    ap.add_argument("--patients-per-step", type=positive_number, default=8.0, help="expected patients in a DP-SGD step")
    ap.add_argument("--step", default=DPPolicy().step, choices=get_args(DPPolicy.model_fields["step"].annotation),
                    help="what a sampled patient gives a step: one item's instance (the kit's default), or all")
    ap.add_argument("--optimizer", default=DPPolicy().optimizer,
                    choices=get_args(DPPolicy.model_fields["optimizer"].annotation),
                    help="optimizer of the DP arms (the no-DP arm keeps AdamW): AdamW or DP-AdamBC")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="instances per step of the plain trainer")
    ap.add_argument("--clip", default="1", type=as_text(positive_number_list), help="per-patient clip norm(s), comma-separated: one set of DP arms each")
    ap.add_argument("--delta", type=positive_number, default=1e-5)
    ap.add_argument("--as-if-patients", default="", type=comma_list(positive_int, "site size", allow_empty=True),
                    help="site sizes whose noise on the mean to train with "
                    "(comma-separated; arms eps=E@P, see above)")
    ap.add_argument("--direct-epsilons", default=None, type=positive_number_list, help="epsilons of the arms at this site's own size "
                    "(default: --epsilons)")
    ap.add_argument("--no-direct", dest="direct", action="store_false",
                    help="only the no-DP and --as-if-patients arms (not eps=E at this site's own size)")
    ap.add_argument("--lora-rank", type=positive_int, default=None, help="LoRA rank of every arm (default: the kit's)")
    ap.add_argument("--frozen-a", action="store_true",
                    help="FFA-LoRA in every arm: A drawn from the seed and frozen, only B trains")
    ap.add_argument("--maa-hidden", type=positive_int, default=None,
                    help="hidden width of the regression head's FC layer in every arm (default: the kit's)")
    ap.add_argument("--dp-stages", default="1,2", type=comma_list(int, "stage"), help="stages the DP arms train with DP-SGD (the others plainly, "
                    "same z): a diagnosis of where the noise costs, NOT a privacy guarantee unless both")
    ap.add_argument("--feature-norm", default="participant", choices=FEATURE_NORM_SCOPES,
                    help="whose frames scale a participant's features, in every arm: 'participant' (each their "
                         "own: what the kit's patient-level DP uses since session 39) or 'dataset' (the site's "
                         "training frames: sessions 9-22's figures)")
    ap.add_argument("--baseline-feature-norms", default="",
                    help="comma-separated feature-norm scopes of extra plain-trainer arms (e.g. dataset)")
    ap.add_argument("--lr-lq", type=float, default=1e-3)
    ap.add_argument("--lr-lora", type=float, default=5e-4)
    ap.add_argument("--lr-maa", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-dp"))
    args = ap.parse_args()
    args.direct_epsilons = args.direct_epsilons or args.epsilons
    args.dp_stages = tuple(sorted(set(args.dp_stages)))
    if not args.dp_stages or not set(args.dp_stages) <= {1, 2}:
        ap.error("--dp-stages takes 1, 2 or 1,2")
    if not args.delta < 1:
        ap.error(f"--delta {args.delta:g}: must be below 1")
    args.clips = positive_number_list(args.clip)
    args.baseline_feature_norms = [n for n in args.baseline_feature_norms.split(",") if n]
    if bad := [n for n in args.baseline_feature_norms if n not in FEATURE_NORM_SCOPES or n == args.feature_norm]:
        ap.error(f"--baseline-feature-norms {','.join(bad)}: not a scope other than --feature-norm "
                 f"({', '.join(FEATURE_NORM_SCOPES)})")
    torch.set_num_threads(2)
    results = [one_seed(args, int(s)) for s in args.seeds.split(",")]
    arms = [k for k in results[0] if k.startswith(("no_dp", "eps="))]
    summary = {a: {m: {"mean": round(statistics.fmean(r[a][m] for r in results), 4),
                       "min": min(r[a][m] for r in results), "max": max(r[a][m] for r in results)}
                   for m in ("ccc", "mae", "train_ccc")} for a in arms}
    finite = [e for e in args.epsilons if not math.isinf(e)]
    sizes = [results[0]["patients"], 100, 250, 500, 1000, 2500, 5000]
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "summary": summary, "noise_by_site_size": patients_needed(args, finite, sizes),
              "noise_on_the_mean_at_this_rate": noise_on_the_mean(args, results[0]["patients"], finite, sizes),
              "per_seed": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_patient.json").write_text(json.dumps(report, indent=1, default=float))
    print(json.dumps({k: report[k] for k in ("summary", "noise_by_site_size", "noise_on_the_mean_at_this_rate")},
                     indent=1, default=float))


if __name__ == "__main__":
    main()
