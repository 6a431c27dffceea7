"""Benchmark: the stage-2 uplink per site per round, per encoding, as a fraction of the base model.

A stage-2 reply carries LoRA (q_proj and v_proj of every layer, rank 16) and the MAA head; with
ffa-lora only the B factors of LoRA (A is frozen and shared). Its tensors are built from the base
model's shapes (``config.json``: layers, hidden width, heads, kv heads) and the real MAA module, then
encoded by the site's own path (``mllm_dr.uplink.encode_update``, a delta to the global with error
feedback) and decoded by the center's: the bytes are what would travel, the errors what the center
would see. fp32 is the baseline, encoded in the same process.

- ``tiny-random``: shapes from its config, checked against a real site model's adapter state
  (names and shapes must equal the real ones: the method is the kit's naming, not a guess). The
  check runs first, whatever ``--shapes`` says: a mismatch ends the benchmark (exit 1) before
  anything is measured;
- ``smollm2``: shapes from its config, base = its safetensors on disk (measured);
- ``llama3-8b``: LLaMA-3-8B shapes (hidden 4096, 32 heads, 8 kv heads of 128: q 4096x4096, v 1024x4096,
  32 layers), base = 8,030,261,248 parameters in bf16 (computed, no weights needed).

Errors: deltas ~ N(0, 1e-3) (one round of LoRA training moves the factors by about that), relative
L2 error of one decoded round, and of the sum over ``--rounds`` rounds with and without error feedback.

    .venv/bin/python -m bench.uplink --rounds 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import comma_list, positive_int
from mllm_dr.compression import MODES, decode, encode
from mllm_dr.config import DEFAULT_MODEL
from mllm_dr.maa import MAA
from mllm_dr.uplink import decode_update, encode_update

LLAMA3_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "num_hidden_layers": 32}
LLAMA3_8B_BASE_BYTES = 8_030_261_248 * 2          # bf16 safetensors of the released model
LORA_NAME = "lora.base_model.model.model.layers.{i}.self_attn.{p}.{f}.weight"


def stage2_shapes(cfg: dict, ffa: bool) -> dict[str, tuple[int, ...]]:
    """name -> shape of a stage-2 reply for a LLaMA-architecture base of config ``cfg``."""
    lora, hidden = DEFAULT_MODEL.lora, cfg["hidden_size"]
    head = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    out = {"q_proj": cfg["num_attention_heads"] * head, "v_proj": cfg["num_key_value_heads"] * head}
    shapes = {}
    for i in range(cfg["num_hidden_layers"]):
        for p in lora.targets:
            if not ffa:
                shapes[LORA_NAME.format(i=i, p=p, f="lora_A")] = (lora.r, hidden)
            shapes[LORA_NAME.format(i=i, p=p, f="lora_B")] = (out[p], lora.r)
    shapes |= {f"maa.{n}": tuple(t.shape) for n, t in MAA(hidden, DEFAULT_MODEL.maa).state_dict().items()}
    return shapes


def shape_name(text: str) -> str:
    """``--shapes``: llama3-8b (computed), smollm2, tiny-random, or a local Hugging Face model folder."""
    if text in ("llama3-8b", "smollm2", "tiny-random") or (Path(text) / "config.json").is_file():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not llama3-8b, smollm2, tiny-random or a model folder with "
                                     f"config.json")


def check_shapes(real: dict[str, tuple[int, ...]], computed: dict[str, tuple[int, ...]]) -> None:
    """Exit (one line) when the computed stage-2 reply is not a real site model's: every figure of this
    benchmark would measure another set of tensors (until session 45 this was only recorded)."""
    if real == computed:
        return
    missing, extra = sorted(set(real) - set(computed)), sorted(set(computed) - set(real))
    wrong = sorted(n for n in set(real) & set(computed) if real[n] != computed[n])
    raise SystemExit(f"stage2_shapes does not match a real tiny-random site model ({len(missing)} tensor(s) missing, "
                     f"{len(extra)} extra, {len(wrong)} of another shape; first: {(missing + extra + wrong)[:3]}): "
                     f"fix stage2_shapes before measuring")


def real_tiny_stage2() -> dict[str, tuple[int, ...]]:
    """The stage-2 tensors of a real tiny-random site model (the check on ``stage2_shapes``)."""
    from mllm_dr.adapters import build_site_model, get_adapter_state
    from mllm_dr.base_model import load_base
    from mllm_dr.federated import allowed

    base, tok, info = load_base("tiny-random")
    sm = build_site_model(base, tok, info, {"audio": 25}, DEFAULT_MODEL, seed=0)
    sm.model.enable_lora()
    return {n: tuple(t.shape) for n, t in get_adapter_state(sm.model).items() if allowed(n, 2, DEFAULT_MODEL)}


def _rel(err: dict, ref: dict) -> float:
    num = sum(float((err[n] - ref[n]).double().pow(2).sum()) for n in ref)
    return (num / sum(float(t.double().pow(2).sum()) for t in ref.values())) ** 0.5


def measure(shapes: dict, base_bytes: int, rounds: int, tmp: Path, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    glob = {n: 0.02 * torch.randn(s, generator=g) for n, s in shapes.items()}
    deltas = [{n: 1e-3 * torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(rounds)]
    out = {"values": sum(t.numel() for t in glob.values()), "base_bytes": base_bytes}
    for mode in MODES:
        ef = tmp / f"{mode}.safetensors"
        ef.unlink(missing_ok=True)
        t = time.perf_counter()
        wire = encode_update({n: glob[n] + deltas[0][n] for n in glob}, glob, mode, ef)
        enc_s = time.perf_counter() - t
        t = time.perf_counter()
        back = decode_update(wire, glob, mode)
        dec_s = time.perf_counter() - t
        nbytes = sum(v.numel() * v.element_size() for v in wire.values())
        lora = sum(v.numel() * v.element_size() for n, v in wire.items() if n.startswith("lora."))
        row = {"bytes": nbytes, "fraction_of_base": nbytes / base_bytes, "percent_of_base": 100 * nbytes / base_bytes,
               "lora_bytes": lora, "lora_percent_of_base": 100 * lora / base_bytes,
               "encode_s": round(enc_s, 3), "decode_s": round(dec_s, 3),
               "round_rel_error": _rel({n: back[n] - glob[n] for n in glob}, deltas[0])}
        if mode != "fp32" and rounds > 1:     # the sum the center accumulates, with and without error feedback
            with_ef = {n: back[n] - glob[n] for n in glob}
            plain = decode(encode(deltas[0], mode))
            for d in deltas[1:]:
                step = decode_update(encode_update({n: glob[n] + d[n] for n in glob}, glob, mode, ef), glob, mode)
                with_ef = {n: with_ef[n] + step[n] - glob[n] for n in glob}
                plain = {n: plain[n] + v for n, v in decode(encode(d, mode)).items()}
            true = {n: sum(d[n] for d in deltas) for n in glob}
            row |= {f"sum_{rounds}_rounds_rel_error_with_feedback": _rel(with_ef, true),
                    f"sum_{rounds}_rounds_rel_error_without": _rel(plain, true)}
        out[mode] = row
    for mode in MODES:
        out[mode]["ratio_to_fp32"] = round(out[mode]["bytes"] / out["fp32"]["bytes"], 4)
    return out


def main() -> None:
    from mllm_dr.base_model import base_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny-random,smollm2,llama3-8b", type=comma_list(shape_name, "shape"),
                    help="comma-separated: llama3-8b, smollm2, tiny-random or model folders")
    ap.add_argument("--rounds", type=positive_int, default=8, help="rounds summed for the error-feedback figure")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-uplink"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"config": {"rounds": args.rounds, "lora_rank": DEFAULT_MODEL.lora.r,
                         "lora_targets": list(DEFAULT_MODEL.lora.targets), "delta_std": 1e-3, "seed": 0}}
    # the method first, whatever --shapes says: every shape's tensors come from stage2_shapes
    tiny = json.loads((base_info("tiny-random").path / "config.json").read_text())
    check_shapes(real_tiny_stage2(), stage2_shapes(tiny, ffa=False))
    for shape in args.shapes:
        if shape == "llama3-8b":
            cfg, base_bytes, how = LLAMA3_8B, LLAMA3_8B_BASE_BYTES, "computed: 8,030,261,248 params x 2 B (bf16)"
        else:
            info = base_info(shape)
            cfg = json.loads((info.path / "config.json").read_text())
            base_bytes = sum(f.stat().st_size for f in info.path.glob("*.safetensors"))
            how = f"measured: {info.path.name}/*.safetensors on disk"
        entry = {"base": how}
        if shape == "tiny-random":
            entry["shapes_match_a_real_site_model"] = True        # checked above (else the run ended there)
        for agg, ffa in (("exact-lora|fedavg", False), ("ffa-lora", True)):
            entry[agg] = measure(stage2_shapes(cfg, ffa), base_bytes, args.rounds, args.out)
        report[shape] = entry
        print(json.dumps({shape: entry}, default=float), flush=True)
    goal = report.get("llama3-8b")
    if goal:
        report["goal_int8_at_most_0.05_percent_of_8b"] = {a: goal[a]["int8"]["percent_of_base"] <= 0.05
                                                          for a in ("exact-lora|fedavg", "ffa-lora")}
    (args.out / "uplink.json").write_text(json.dumps(report, indent=1, default=float))
    print(json.dumps({k: report[k] for k in report if k.startswith("goal")} | {"json": str(args.out / "uplink.json")}))


if __name__ == "__main__":
    main()
