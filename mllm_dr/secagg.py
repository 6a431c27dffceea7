"""Secure aggregation of the sites' weighted updates: the center learns only their sum.

No Flower here (bytes, numpy, tensors); the apps carry the messages. For each masked round:

1. Key exchange: every site makes a fresh X25519 key pair for (run, round), keeps the private
   key on site (``KeyStore``) and sends the public key; the center relays the roster of public
   keys with the training message.
2. Masking (at the site, after training): the update's difference from the global is clipped
   to L2 <= ``clip_norm`` (the site enforces the bound the center can no longer check), scaled
   by the site's weight n_k, quantised to fixed point (``FRAC_BITS``) in the ring Z/2^64, and the
   weight n_k itself is appended. For every peer j the site adds (if its id sorts first) or
   subtracts PRG(seed_kj), where seed_kj = HKDF-SHA256(X25519(k, j), run|round|pair) and the PRG
   is ChaCha20's keystream. Each reply looks uniformly random on its own.
3. Unmasking (at the center): the sum of all masked vectors mod 2^64 is the sum of the encoded
   vectors (the masks cancel pairwise): sum n_k * delta_k and sum n_k, exact up to quantisation
   (<= K / 2^(FRAC_BITS+1) per coordinate before dividing by sum n_k).

Dropout: a site that drops after the key exchange leaves its pairwise masks in the others'
replies; without it the sum cannot be unmasked, so the round fails cleanly and names the site
(no SecAgg+ share reconstruction). Threat model: an honest-but-curious center; it relays the
keys, so an actively malicious center could substitute them (no site-to-site PKI).
"""

from __future__ import annotations

import glob
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mllm_dr.atomic import atomic_write_bytes
from mllm_dr.errors import MllmDrError
from mllm_dr.privacy import clipped_delta
from mllm_dr.protocol import run_name

FRAC_BITS = 24                 # fixed-point step 2^-24 (6e-8) on n_k * delta
WEIGHT = "secagg.weight"       # the masked weight n_k travels as one more tensor
State = dict[str, torch.Tensor]


class SecAggError(MllmDrError):
    """Masking or unmasking is impossible (missing key, inconsistent roster, incomplete sum)."""


# ----------------------------------------------------------------------------- keys
def public_hex(key: X25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def pair_seed(own: X25519PrivateKey, peer_hex: str, info: str) -> bytes:
    """The 32-byte secret two sites share for this round (X25519 + HKDF-SHA256)."""
    try:         # ValueError: not 32 bytes of hex, or a low-order point (an all-zero shared secret)
        secret = own.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer_hex)))
    except ValueError:
        raise SecAggError(f"malformed public key in the roster: {peer_hex[:16]}...") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


def public_key_problem(public_hex: str) -> str | None:
    """Why a site's public key cannot mask a round: not 32 bytes of hex, or a point no key agreement
    works with (low order: X25519 gives an all-zero secret). The center checks each key before it
    relays the roster (a review, session 42: one site's "00"*32 let every honest site train, be charged
    its DP budget, then fail to mask, and the round named the honest sites as dropped)."""
    try:
        pair_seed(X25519PrivateKey.generate(), public_hex, "check")
    except SecAggError:
        return f"public key {public_hex[:16]!r}... is not an X25519 key a pair can agree on"
    return None


class KeyStore:
    """A site's private keys between the key exchange and its masked reply (mode 600, one per round)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, run: str, round_: int) -> Path:
        try:
            return self.folder / f"{run_name(run)}-round{int(round_):04d}.x25519"
        except ValueError as err:
            raise SecAggError(str(err)) from None

    def new(self, run: str, round_: int) -> str:
        """A fresh key for (run, round); earlier unused keys of the run are deleted. Returns the public key."""
        if int(round_) < 1:                                       # training rounds count from 1
            raise SecAggError(f"no secure-aggregation key for round {round_}: rounds count from 1")
        self.drop(run)                                            # (a run name that cannot name a file: refused)
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self._path(run, round_), raw)
        os.chmod(self._path(run, round_), 0o600)
        return public_hex(key)

    def drop(self, run: str) -> None:
        """Delete every key of ``run`` (unused ones: a round that failed after the key exchange, or the run's end)."""
        self._path(run, 0)                                        # a run name that cannot name a file: refused
        # this run's keys as _path names them, whatever the round's sign (a key of round -1 is '-001', which
        # '\d{4,}' kept for ever: session 45); the glob alone also matched those of a run named '{run}-round1'
        mine = re.compile(rf"{re.escape(run)}-round-?\d+\.x25519")
        for old in self.folder.glob(f"{glob.escape(run)}-round*.x25519"):
            if mine.fullmatch(old.name):
                old.unlink(missing_ok=True)

    def take(self, run: str, round_: int) -> X25519PrivateKey:
        """The key of (run, round), deleted from disk: each key masks one reply only."""
        path = self._path(run, round_)
        if not path.is_file():
            raise SecAggError(f"no secure-aggregation key for run {run} round {round_} (the key exchange did not "
                              f"reach this site, or the key was used already)")
        key = X25519PrivateKey.from_private_bytes(path.read_bytes())
        path.unlink()
        return key


# ----------------------------------------------------------------------------- roster and masks
def parse_roster(text: str) -> dict[str, str]:
    """'site-a=<hex>;site-b=<hex>' -> {site id: public key hex}."""
    roster = dict(part.split("=", 1) for part in text.split(";") if "=" in part)
    if len(roster) != len([p for p in text.split(";") if p]):
        raise SecAggError("malformed secure-aggregation roster")
    return roster


def format_roster(keys: dict[str, str]) -> str:
    return ";".join(f"{site}={pub}" for site, pub in sorted(keys.items()))


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 from a 32-byte seed (ChaCha20 keystream, nonce 0)."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * n))
    return np.frombuffer(stream, dtype=np.uint64).copy()


def pair_info(run: str, round_: int, a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"mllmdr-secagg|{run}|{round_}|{lo}|{hi}"


def encode(values: np.ndarray) -> np.ndarray:
    """float64 -> fixed point in Z/2^64 (round to nearest)."""
    return np.rint(values * 2.0 ** FRAC_BITS).astype(np.int64).view(np.uint64)


def decode(ring: np.ndarray) -> np.ndarray:
    return ring.view(np.int64).astype(np.float64) / 2.0 ** FRAC_BITS


def _flat(tensors: State, names: list[str]) -> np.ndarray:
    return np.concatenate([tensors[n].double().reshape(-1).numpy() for n in names]) if names else np.zeros(0)


def _split(vec: np.ndarray, names: list[str], shapes: dict[str, torch.Size]) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for n in names:
        k = int(np.prod(shapes[n], dtype=np.int64))
        out[n] = vec[i:i + k].reshape(tuple(shapes[n]))
        i += k
    return out


def pairwise_masks(me: str, key: X25519PrivateKey, roster: dict[str, str], run: str, round_: int, n: int) -> np.ndarray:
    """The sum of this site's signed pairwise masks (they cancel over the whole roster)."""
    total = np.zeros(n, dtype=np.uint64)
    for peer, pub in sorted(roster.items()):
        if peer == me:
            continue
        mask = prg(pair_seed(key, pub, pair_info(run, round_, me, peer)), n)
        total = total + mask if me < peer else total - mask
    return total


def mask_update(update: State, reference: State, weight: int, me: str, key: X25519PrivateKey,
                roster: dict[str, str], run: str, round_: int, clip_norm: float) -> tuple[State, float]:
    """The masked reply: every tensor of ``update`` as int64 ring elements (same names and shapes)
    plus ``WEIGHT``; and the update's norm before clipping (kept on site, in its audit log)."""
    if roster.get(me) != public_hex(key):
        raise SecAggError(f"the roster does not carry this site's ({me}) public key for round {round_}")
    names = sorted(update)
    deltas, norm = clipped_delta(update, reference, clip_norm)
    if not math.isfinite(norm):     # NaN passed the clip (min(1, nan) = 1) and encoded as INT64_MIN: the
        raise SecAggError(f"the update is not finite (norm {norm}): nothing masked, the round cannot use it")
    plain = np.concatenate([encode(weight * _flat(deltas, names)), np.array([weight], dtype=np.uint64)])
    masked = plain + pairwise_masks(me, key, roster, run, round_, plain.size)
    parts = _split(masked[:-1], names, {n: update[n].shape for n in names})
    out = {n: torch.from_numpy(parts[n].view(np.int64).copy()) for n in names}
    out[WEIGHT] = torch.from_numpy(masked[-1:].view(np.int64).copy())
    return out, norm


def ring_holds(weight: int, clip_norm: float) -> bool:
    """Whether sums of clipped updates fit the ring: every coordinate of sum_k n_k * delta_k lies within
    +-(sum_k n_k) * clip_norm, which must stay below 2^63 in fixed point, or the sum wraps around and decodes
    as another number without any sign of it (a huge ``clip_norm``, an aggregation review, session 45)."""
    return weight * clip_norm * 2.0 ** FRAC_BITS < 2.0 ** 63


def unmask_sum(masked: list[State], reference: State, expected_weight: int,
               clip_norm: float | None = None) -> tuple[State, int]:
    """Sum the masked replies of every site of the roster: (sum_k n_k * delta_k per tensor, sum_k n_k).
    Only correct when every site of the roster is in ``masked``: otherwise the masks do not cancel,
    which the unmasked weight shows (it must equal the sites' declared examples, ``expected_weight``).
    With ``clip_norm`` (the run's bound) a sum the ring cannot hold is refused (``ring_holds``)."""
    if clip_norm is not None and not ring_holds(expected_weight, clip_norm):
        raise SecAggError(f"{expected_weight} examples x the clip bound {clip_norm:g} do not fit the 64-bit ring at "
                          f"2^-{FRAC_BITS} steps: the sum could wrap around; lower secagg.clip_norm")
    names = sorted(n for n in masked[0] if n != WEIGHT)
    total = np.zeros(sum(reference[n].numel() for n in names) + 1, dtype=np.uint64)
    for m in masked:
        if sorted(m) != sorted(names + [WEIGHT]) or any(t.dtype != torch.int64 for t in m.values()):
            raise SecAggError("a masked reply carries other tensors or is not masked (int64 expected)")
        total = total + np.concatenate([_flat_ring(m, names), m[WEIGHT].numpy().view(np.uint64)])
    weight = int(total[-1:].view(np.int64)[0])
    if weight != expected_weight:
        raise SecAggError(f"the unmasked weight is {weight}, the sites declared {expected_weight}: the masks did "
                          f"not cancel (a site of the roster missing from the sum, or a reply altered)")
    sums = _split(decode(total[:-1]), names, {n: reference[n].shape for n in names})
    return {n: torch.from_numpy(v) for n, v in sums.items()}, weight


def _flat_ring(tensors: State, names: list[str]) -> np.ndarray:
    return np.concatenate([tensors[n].reshape(-1).numpy().view(np.uint64) for n in names])


def apply_sum(reference: State, sums: State, weight: int) -> State:
    """The new global tensors: reference + (sum_k n_k delta_k) / (sum_k n_k), the FedAvg of the updates."""
    return {n: (reference[n].double() + s / weight).to(reference[n].dtype) for n, s in sums.items()}
