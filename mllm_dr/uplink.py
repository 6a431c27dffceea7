"""The compressed uplink of a training round: what a site sends, and what the center recovers.

The codec is ``mllm_dr.compression`` (fp32 identity, fp16, 8-bit blockwise with error feedback);
this module decides *what* is encoded and keeps the site's residual between rounds:

- ``fp32``: the trained tensors travel as they are (no delta, no residual file): bit-exact with
  a run that has no uplink encoding at all.
- ``fp16`` / ``int8``: the site sends the DELTA, trained minus the global it received (small
  numbers quantize well), plus the error-feedback residual of its earlier rounds of the run; the
  center decodes and adds its global back. A tensor whose shape differs from the global's (a site
  training LoRA at its own rank) has no common reference: it travels in full, both sides decide
  that from the shapes alone.

Error feedback is exact for the linear aggregations (fedavg, ffa-lora, stage 1, the MAA head): the
running sum of what the center decodes equals the running sum of the true deltas minus the last
residual. With exact-lora the global factors are re-expressed every round, so the residual of
A and B compensates to first order only; either way the error stays within one round's
quantization error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mllm_dr.compression import ABSMAX, MODES, ErrorFeedback, decode, encode
from mllm_dr.errors import InputError
from mllm_dr.protocol import run_name

Tensors = dict[str, torch.Tensor]
WIRE_DTYPES = {"fp16": torch.float16, "int8": torch.int8}


def residual_path(site_root: Path, run: str) -> Path:
    """The site's error-feedback file of ``run``: one file per run under the workspace's federation/."""
    try:
        run_name(run)
    except ValueError as err:
        raise InputError(f"{err}: it cannot name an error-feedback file") from None
    return Path(site_root) / "federation" / "uplink" / f"{run}.safetensors"


def pending_path(residual_file: Path) -> Path:
    """Where a round's new residual waits until its reply is released (``encode_update``'s ``save_to``)."""
    return residual_file.with_name(residual_file.name + ".pending")


def _reference(name: str, t: torch.Tensor, received: Tensors) -> torch.Tensor | None:
    """The global tensor a delta is taken against, or None when the tensor travels in full."""
    ref = received.get(name)
    return ref if ref is not None and ref.shape == t.shape else None


def encode_update(update: Tensors, received: Tensors, mode: str, residual_file: Path | None,
                  save_to: Path | None = None) -> Tensors:
    """What the site sends for its trained ``update`` (see the module docstring); with fp16/int8 the
    residual in ``residual_file`` is added and the new one written back (atomically), to ``save_to`` when
    given: a site's round keeps it pending until its reply leaves (``fl_client.uplink_mod.settle_residual``)."""
    if mode not in MODES:
        raise InputError(f"unknown uplink encoding {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "fp32":
        return encode(update, mode)
    delta = {}
    for name, t in update.items():
        ref = _reference(name, t, received)
        delta[name] = t.float() if ref is None else t.float() - ref.float()
    feedback = ErrorFeedback.load(residual_file) if residual_file else ErrorFeedback()
    wire = feedback.encode(delta, mode)
    if save_to or residual_file:
        feedback.save(save_to or residual_file)
    return wire


def decode_update(wire: Tensors, reference: Tensors, mode: str) -> Tensors:
    """The site's trained tensors back from what it sent under ``mode``; InputError when the reply is
    not in the run's encoding or malformed (the center rejects that site, named)."""
    if mode == "fp32":
        return wire             # as before any uplink encoding existed (masked replies are int64)
    want = WIRE_DTYPES[mode]
    odd = [n for n, t in wire.items() if not n.endswith(ABSMAX) and t.dtype != want]
    if odd:
        raise InputError(f"tensor {odd[0]!r} is {wire[odd[0]].dtype}; the run's uplink is {mode}")
    out = {}
    for name, t in decode(wire).items():
        ref = _reference(name, t, reference)
        out[name] = t if ref is None else ref.float() + t
    return out
