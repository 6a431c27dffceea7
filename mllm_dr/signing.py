"""Signed global checkpoints: the center signs, every site verifies before loading.

A checkpoint is a folder with ``global.safetensors`` (the adapter tensors) and
``checkpoint.json`` (round, stage, base model hash, digest, Ed25519 signature). The
digest covers the tensor names, dtypes, shapes and bytes plus the JSON context, so one
flipped byte anywhere is caught. Keys are plain ``cryptography`` Ed25519 keys in PEM.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mllm_dr.atomic import atomic_folder
from mllm_dr.errors import InputError, MllmDrError

if TYPE_CHECKING:
    import torch

TENSORS = "global.safetensors"
META = "checkpoint.json"
SIGNED_FIELDS = ("round", "stage", "base_model", "base_sha256", "run", "model", "dims", "feature_recipe")
SIGNED_IF_SET = ("feature_norms",)   # signed when set, so checkpoints written before the field still verify


def signed_fields(context: dict) -> dict:
    """The part of a checkpoint's context its signature covers."""
    return {k: context.get(k) for k in SIGNED_FIELDS} | {k: context[k] for k in SIGNED_IF_SET if context.get(k)}


class SignatureError(MllmDrError):
    """A checkpoint or message whose signature does not verify: never load it."""


# ----------------------------------------------------------------------------- keys
def new_signing_key(path: Path) -> Ed25519PublicKey:
    """Write a fresh Ed25519 private key (PEM, mode 600) and its public key beside it (.pub)."""
    from mllm_dr.private import private_dir, write_private

    key = Ed25519PrivateKey.generate()
    private_dir(Path(path).parent)
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), exclusive=True)
    pub = key.public_key()
    write_private(Path(path).with_suffix(".pub"), public_pem(pub))
    return pub


def public_pem(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read signing key: {err}", path) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError("not an Ed25519 private key", path)
    return key


def load_public(data: bytes | str, source: str | Path = "public key") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data.encode() if isinstance(data, str) else data)
    except ValueError as err:
        raise InputError(f"cannot read public key: {err}", source) from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError("not an Ed25519 public key", source)
    return key


def fingerprint(pub: Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ----------------------------------------------------------------------------- digests
def state_digest(state: dict[str, torch.Tensor], context: dict) -> bytes:
    import torch   # here, not at import time: the audit and key commands need no torch

    h = hashlib.sha256()
    h.update(json.dumps(signed_fields(context), sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def sign_state(key: Ed25519PrivateKey, state: dict[str, torch.Tensor], context: dict) -> str:
    return key.sign(state_digest(state, context)).hex()


def verify_state(pub: Ed25519PublicKey, state: dict[str, torch.Tensor], context: dict, signature: str,
                 what: str = "global adapters") -> None:
    try:       # TypeError: a signature or context of another shape (a number, a list: exit 3 before session 44)
        if not isinstance(signature, str) or not isinstance(context, dict):
            raise TypeError("a signature is text, a context a mapping")
        pub.verify(bytes.fromhex(signature), state_digest(state, context))
    except (InvalidSignature, ValueError, TypeError):
        raise SignatureError(f"{what}: signature does not verify with the center's key "
                             f"(fingerprint {fingerprint(pub)}); refusing to load") from None


# ----------------------------------------------------------------------------- checkpoints
def write_checkpoint(folder: Path, key: Ed25519PrivateKey, state: dict[str, torch.Tensor], context: dict) -> dict:
    """Sign ``state`` in ``context`` and store it (atomically: the folder appears whole or not at all)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = signed_fields(context) | {"signature": sign_state(key, tensors, context),
                                     "signer": fingerprint(key.public_key())}
    store_signed(folder, tensors, meta)
    return meta


def read_checkpoint(folder: Path, pub: Ed25519PublicKey, base_sha256: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors + metadata, only after the signature (and the base model hash) check out."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / TENSORS).is_file():
        raise InputError("not a global checkpoint (checkpoint.json or global.safetensors missing)", folder)
    try:
        meta = json.loads((folder / META).read_text())
        state = load_file(str(folder / TENSORS))
    except Exception as err:  # a damaged file: name it, never load it half
        raise SignatureError(f"{folder}: checkpoint unreadable ({type(err).__name__}); refusing to load") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("signature"), str):   # else TypeError, exit 3
        raise SignatureError(f"{folder / META}: not a signed checkpoint's metadata (a JSON object with a text "
                             "signature); refusing to load")
    verify_state(pub, state, meta, meta["signature"], str(folder))
    if base_sha256 and meta.get("base_sha256") != base_sha256:
        raise SignatureError(f"{folder}: signed for base model sha256 {str(meta.get('base_sha256'))[:12]}..., "
                             f"not the local {base_sha256[:12]}...")
    return state, meta


def store_signed(folder: Path, state: dict[str, torch.Tensor], meta: dict,
                 site_files: dict[str, dict[str, torch.Tensor] | str] | None = None) -> None:
    """Keep a copy of an already verified checkpoint (a site saving what the center signed), with the
    site's own unsigned files beside it (``site_files``: file name -> tensors, or text), written in the
    same step."""
    from safetensors.torch import save_file

    with atomic_folder(Path(folder)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / TENSORS))
        for name, content in (site_files or {}).items():
            if isinstance(content, str):
                (tmp / name).write_text(content)
            else:
                save_file(content, str(tmp / name))
        (tmp / META).write_text(json.dumps(meta, indent=1))
