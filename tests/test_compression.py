"""Uplink codec: round-trip bounds per mode, bytes on the wire, error feedback, bad input."""

from __future__ import annotations

import fnmatch
import math

import pytest
import torch
from safetensors.torch import save_file

from mllm_dr.compression import BLOCK, ErrorFeedback, decode, encode, wire_bytes
from mllm_dr.errors import InputError

B_NAME = "lora.base_model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _update(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {B_NAME: torch.randn(576, 16, generator=g) * 0.02,
            "lora.base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(16, 576, generator=g),
            "maa.head.bias": torch.randn(100, generator=g)}          # 100 values: a partial last block


def _block_absmax(t: torch.Tensor) -> torch.Tensor:
    """Per-element absmax of its block, computed independently of the codec."""
    flat = t.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), BLOCK):
        out[start:start + BLOCK] = flat[start:start + BLOCK].abs().max()
    return out.view(t.shape)


def test_round_trip_error_is_within_each_modes_bound():
    up = _update()
    up["maa.zeros"] = torch.zeros(70)
    assert all(torch.equal(decode(encode(up, "fp32"))[n], t) for n, t in up.items())
    half = decode(encode(up, "fp16"))
    for n, t in up.items():
        assert torch.allclose(half[n], t, rtol=2 ** -11, atol=6e-8), n
    q = decode(encode(up, "int8"))
    for n, t in up.items():
        err = (q[n] - t).abs()
        assert (err <= _block_absmax(t) / 254 * (1 + 1e-5) + 1e-12).all(), n
        assert q[n].dtype == torch.float32 and q[n].shape == t.shape
    assert torch.equal(q["maa.zeros"], torch.zeros(70))
    # and int8 is not the identity: the test above can fail
    assert float((q[B_NAME] - up[B_NAME]).abs().max()) > 0


def test_bytes_on_the_wire_and_names_an_allow_list_can_match():
    up = _update()
    n_values = sum(t.numel() for t in up.values())
    assert wire_bytes(encode(up, "fp32")) == 4 * n_values
    assert wire_bytes(encode(up, "fp16")) == 2 * n_values
    wire = encode(up, "int8")
    scales = sum(math.ceil(t.numel() / BLOCK) for t in up.values())
    assert wire_bytes(wire) == n_values + 4 * scales
    lora_b = {n: t for n, t in up.items() if "lora_B" in n}
    assert wire_bytes(encode(lora_b, "int8")) / wire_bytes(encode(lora_b, "fp32")) == pytest.approx(1.0625 / 4)
    b_names = [n for n in wire if "lora_B" in n]
    assert b_names == [B_NAME, B_NAME + ".absmax"]
    assert all(fnmatch.fnmatchcase(n, "lora.*.lora_B.weight*") for n in b_names)
    assert not fnmatch.fnmatchcase(B_NAME + ".absmax", "lora.*.lora_B.weight")   # documented: needs the '*'


def test_error_feedback_keeps_the_running_sum_on_track():
    """Small values under one large value per block round to 0 every round without feedback."""
    rounds, small = 40, 0.003                         # below half a step (1/254) of a block whose absmax is 1
    update = torch.full((4, BLOCK), small)
    update[:, 0] = 1.0
    ef = ErrorFeedback()
    true_sum, fed_sum, plain_sum = torch.zeros_like(update), torch.zeros_like(update), torch.zeros_like(update)
    worst_fed = 0.0
    for _ in range(rounds):
        true_sum += update
        fed_sum += decode(ef.encode({"w": update}, "int8"))["w"]
        plain_sum += decode(encode({"w": update}, "int8"))["w"]
        worst_fed = max(worst_fed, float((true_sum - fed_sum).abs().max()))
        # telescoping: what the center summed plus what the site still holds is the true sum
        assert torch.allclose(fed_sum + ef.residual["w"], true_sum, atol=1e-5)
    plain_err = float((true_sum - plain_sum).abs().max())
    print(f"after {rounds} rounds: max |error| with feedback {worst_fed:.2e}, without {plain_err:.2e}")
    assert plain_err == pytest.approx(rounds * small, rel=1e-3)      # grows with every round
    assert worst_fed <= 1.01 / 254                                    # one round's quantization error, at most


def test_error_feedback_survives_a_process_restart(tmp_path):
    path = tmp_path / "ef.safetensors"
    updates = [_update(seed) for seed in range(4)]
    straight = ErrorFeedback()
    wires = [straight.encode(u, "int8") for u in updates]
    for i, u in enumerate(updates):                  # each round in a "fresh process": load, encode, save
        ef = ErrorFeedback.load(path)
        wire = ef.encode(u, "int8")
        ef.save(path)
        assert all(torch.equal(wire[n], wires[i][n]) for n in wire)
    assert ErrorFeedback.load(tmp_path / "missing.safetensors").residual == {}


def test_non_finite_input_is_an_error_naming_the_tensor_and_changes_nothing():
    ef = ErrorFeedback()
    ef.encode(_update(), "int8")
    kept = {n: t.clone() for n, t in ef.residual.items()}
    bad = _update(1)
    bad[B_NAME][3, 2] = float("nan")
    for mode in ("fp32", "fp16", "int8"):
        with pytest.raises(InputError, match=f"{B_NAME!r} has non-finite"):
            encode(bad, mode)
    with pytest.raises(InputError, match="non-finite"):
        ef.encode(bad, "int8")
    assert all(torch.equal(ef.residual[n], kept[n]) for n in kept)
    with pytest.raises(InputError, match="'big'.*fp16 range"):
        encode({"big": torch.tensor([1e6])}, "fp16")


def test_malformed_wire_and_files_are_errors_naming_what_is_wrong(tmp_path):
    wire = encode(_update(), "int8")
    codes_only = {n: t for n, t in wire.items() if not n.endswith(".absmax")}
    with pytest.raises(InputError, match=f"{B_NAME!r}: int8 codes without"):
        decode(codes_only)
    short = dict(wire, **{B_NAME + ".absmax": wire[B_NAME + ".absmax"][:-1]})
    with pytest.raises(InputError, match="expected float32 of shape"):
        decode(short)
    with pytest.raises(InputError, match="unknown uplink encoding"):
        encode(_update(), "int4")
    ef = ErrorFeedback({B_NAME: torch.zeros(8, 16)})
    with pytest.raises(InputError, match="differs from the kept residual"):
        ef.encode(_update(), "int8")
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(InputError, match="weights.safetensors: not an error-feedback file"):
        ErrorFeedback.load(other)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="junk.safetensors: not a readable error-feedback file"):
        ErrorFeedback.load(tmp_path / "junk.safetensors")
