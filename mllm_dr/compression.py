"""Uplink codec for site updates: fp32 (identity), fp16, or 8-bit blockwise, plus error feedback.

Pure functions on named tensors, no Flower here: the site encodes what it sends, the center
decodes before aggregation, and whatever checks names (signatures, the egress guard) sees the
encoded dict, which is exactly what travels.

Wire format (self-describing, so ``decode`` needs no mode):

- ``fp32``: ``name`` -> the float32 tensor itself.
- ``fp16``: ``name`` -> float16 tensor of the same shape (values beyond +-65504 are refused).
- ``int8``: ``name`` -> int8 codes of the same shape, and ``name + ".absmax"`` -> float32 of
  ceil(numel / 64): each block of ``BLOCK`` = 64 consecutive values (row-major) is scaled by its
  own absolute maximum, code = round(127 * x / absmax). Decoded = code * absmax / 127, so every
  value is within absmax / 254 of the truth. An allow-list pattern that ends in ``*``
  (``lora.*.lora_B.weight*``) matches a tensor and its companion; one that ends in ``.weight``
  matches the codes only and the egress guard would (rightly) refuse the ``.absmax`` tensor.

Bytes per value: 4 (fp32), 2 (fp16), 1 + 4/64 = 1.0625 (int8: 26.6 % of fp32).

Error feedback (EF-SGD, Seide et al. 2014; Karimireddy et al. 2019): the site adds the previous
round's residual (what quantization lost) to its update before encoding and keeps the new
residual, so the running sum of what the center decodes equals the running sum of the true
updates minus the last residual: the error stays bounded by one round's quantization error
instead of growing with the number of rounds. It is meant for *deltas* (trained minus the global
state received), which the center adds back. Each Flower message runs in a fresh process, so the
residual lives in a safetensors file (``ErrorFeedback.load`` / ``.save``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from mllm_dr.atomic import atomic_write_bytes
from mllm_dr.errors import InputError
from mllm_dr.protocol import UPLINK_ENCODINGS as MODES
BLOCK = 64
ABSMAX = ".absmax"
FP16_MAX = float(torch.finfo(torch.float16).max)
EF_FORMAT = "mllm-dr-error-feedback/1"

Tensors = dict[str, torch.Tensor]


def _checked(name: str, t: torch.Tensor) -> torch.Tensor:
    """The tensor as contiguous float32, or an InputError naming it."""
    if name.endswith(ABSMAX):
        raise InputError(f"tensor {name!r}: names ending in {ABSMAX!r} are reserved for int8 scales")
    if not t.is_floating_point():
        raise InputError(f"tensor {name!r}: expected floating point values, got {t.dtype}")
    t = t.detach().to(torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise InputError(f"tensor {name!r} has non-finite values (NaN or inf); nothing was encoded")
    return t


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    """flat values padded with zeros to whole blocks, viewed as (blocks, BLOCK)."""
    pad = -flat.numel() % BLOCK
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, BLOCK)


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like ``t``, float32 absmax per block of BLOCK values)."""
    blocks = _blocks(t.reshape(-1))
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.round(blocks * scale[:, None]).to(torch.int8)
    return codes.view(-1)[: t.numel()].view(t.shape), absmax


def dequantize_int8(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(codes.reshape(-1).to(torch.float32))
    return (blocks * (absmax / 127.0)[:, None]).view(-1)[: codes.numel()].view(codes.shape)


def encode(tensors: Tensors, mode: str) -> Tensors:
    """What travels for ``tensors`` under ``mode`` (see the module docstring for names)."""
    if mode not in MODES:
        raise InputError(f"unknown uplink encoding {mode!r}; expected one of {', '.join(MODES)}")
    wire: Tensors = {}
    for name, t in tensors.items():
        t = _checked(name, t)
        if mode == "fp32":
            wire[name] = t
        elif mode == "fp16":
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > FP16_MAX:
                raise InputError(f"tensor {name!r}: value {peak:.3g} is beyond the fp16 range; use int8 or fp32")
            wire[name] = t.to(torch.float16)
        else:
            wire[name], wire[name + ABSMAX] = quantize_int8(t)
    return wire


def decode(wire: Tensors) -> Tensors:
    """float32 tensors back from an encoded dict; malformed input is an InputError naming the tensor."""
    out: Tensors = {}
    for name, t in wire.items():
        if name.endswith(ABSMAX):
            if name[: -len(ABSMAX)] not in wire:
                raise InputError(f"tensor {name!r}: int8 scales without their codes")
            continue
        if t.dtype == torch.int8:
            absmax = wire.get(name + ABSMAX)
            if absmax is None:
                raise InputError(f"tensor {name!r}: int8 codes without {name + ABSMAX!r}")
            want = math.ceil(t.numel() / BLOCK)
            if absmax.dtype != torch.float32 or absmax.shape != (want,):
                raise InputError(f"tensor {name + ABSMAX!r}: expected float32 of shape ({want},), "
                                 f"got {absmax.dtype} {tuple(absmax.shape)}")
            if not (torch.isfinite(absmax).all() and (absmax >= 0).all()):
                raise InputError(f"tensor {name + ABSMAX!r}: scales must be finite and non-negative")
            out[name] = dequantize_int8(t, absmax)
        elif t.dtype in (torch.float16, torch.float32):
            if not torch.isfinite(t).all():
                raise InputError(f"tensor {name!r} has non-finite values (NaN or inf)")
            out[name] = t.to(torch.float32)
        else:
            raise InputError(f"tensor {name!r}: {t.dtype} is not an uplink encoding (fp32, fp16, int8)")
    return out


def wire_bytes(wire: Tensors) -> int:
    """Payload bytes of an encoded dict (tensor data only, no container overhead)."""
    return sum(t.numel() * t.element_size() for t in wire.values())


class ErrorFeedback:
    """The quantization residual a site carries from one round to the next, per tensor name."""

    def __init__(self, residual: Tensors | None = None):
        self.residual: Tensors = dict(residual or {})

    def encode(self, update: Tensors, mode: str) -> Tensors:
        """Encode ``update`` + residual; keep (update + residual) - decoded as the new residual.

        Tensors absent from ``update`` keep their residual (a stage that does not send them).
        Nothing changes if encoding fails (non-finite values, shape mismatch).
        """
        compensated = {}
        for name, t in update.items():
            t = _checked(name, t)
            prev = self.residual.get(name)
            if prev is not None and prev.shape != t.shape:
                raise InputError(f"tensor {name!r}: shape {tuple(t.shape)} differs from the kept residual's "
                                 f"{tuple(prev.shape)}; start a new error-feedback file for a new run")
            compensated[name] = t if prev is None else t + prev
        wire = encode(compensated, mode)
        decoded = decode(wire)
        self.residual |= {n: compensated[n] - decoded[n] for n in compensated}
        return wire

    def save(self, path: Path) -> None:
        """Write the residual atomically (a crash leaves the previous file)."""
        data = st_save({n: t.contiguous() for n, t in self.residual.items()}, metadata={"format": EF_FORMAT})
        atomic_write_bytes(Path(path), data)

    @classmethod
    def load(cls, path: Path) -> "ErrorFeedback":
        """The residual kept in ``path``; an empty one when the file does not exist yet."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            with safe_open(str(path), framework="pt") as fh:
                fmt = (fh.metadata() or {}).get("format")
                residual = {n: fh.get_tensor(n) for n in fh.keys()}
        except (SafetensorError, ValueError, OSError) as e:
            raise InputError(f"not a readable error-feedback file ({e})", path) from None
        if fmt != EF_FORMAT:
            raise InputError(f"not an error-feedback file (format {fmt!r}, expected {EF_FORMAT!r})", path)
        bad = [n for n, t in residual.items() if t.dtype != torch.float32 or not torch.isfinite(t).all()]
        if bad:
            raise InputError(f"error-feedback tensor {bad[0]!r} is not finite float32", path)
        return cls(residual)
