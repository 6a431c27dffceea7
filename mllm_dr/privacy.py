"""Differential privacy of a site's adapter updates, and the site's (epsilon, delta) ledgers.

Site-level DP (the unit protected is the site's whole contribution in a round): the
update's difference from the global state is clipped to L2 norm ``clip_norm`` and
Gaussian noise N(0, (noise_multiplier * clip_norm)^2) is added to every coordinate, on
site, before anything leaves. Each round is one Gaussian mechanism (sampling rate 1);
the composition over rounds is accounted with Opacus' RDP accountant. The ledger lives in
the workspace (``privacy.json``) and a site stops contributing once the next round would
take it past its budget.

Patient-level DP (the unit protected is one patient, all 8 of their item instances) is DP-SGD
inside the site's training (``training.py``): its steps are accounted here too, in a ledger of
their own (``privacy-patient.json``): epsilons of different units never add up.

A ledger records the delta of its charges (its epsilon is reported at that delta), and "unprotected
rounds": training without DP released after DP rounds, which makes epsilon infinite (the guarantee is
void; in JSON files and audit entries that epsilon is null beside the void's record, never a bare
Infinity). The workspace's signed audit log anchors each ledger: one holding fewer rounds than the log's
``dp_round`` entries (less its ``dp_refund`` ones) was deleted or rolled back and is refused (``_anchored``).

A new privacy period (a cohort whose data was never in training; the DPO's decision) starts with
``reset_ledger`` (``mllmdr-site policy reset-ledger``): the ledger is archived beside itself, the reset is
audited (``dp_ledger_reset``), then an empty ledger starts; the anchor counts each unit's entries after its
last reset only. A site-level ledger holding rounds or unprotected rounds is reset only with the per-patient one
(``--unit both``: the per-patient epsilon counts them), one audit entry per unit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mllm_dr.atomic import atomic_write_text, file_lock
from mllm_dr.errors import InputError, MllmDrError

class BudgetSpent(MllmDrError):
    """The site's epsilon budget would be exceeded by one more round."""


class NonFiniteUpdate(MllmDrError):
    """A site-level DP update with a NaN or infinite value: no clipping bounds it, so it is never noised
    and sent."""


class PrivateRandom:
    """The randomness of DP (Poisson sampling and Gaussian noise) from a ChaCha20 keystream under a fresh
    256-bit key from the OS (``cryptography``), so nobody outside the site can replay it. torch's global
    generator cannot serve: training reseeds it with numbers the center knows (the round, for dropout),
    and a seeded ``torch.Generator`` keeps 64 bits at most (found by a privacy review, session 41: the
    center recovered a site's clipped update from its noised one). ``seed`` (tests, benchmarks) makes
    the stream repeat. Normals by Box-Muller over 53-bit uniforms (float64); the known floating-point
    attacks on such samplers (Mironov 2012, Jin et al. 2022) are not defended against."""

    SEGMENT = 2 ** 37      # bytes under one nonce: 2^31 blocks of 64, so the 32-bit block counter never wraps

    def __init__(self, seed: int | None = None):
        self._key = os.urandom(32) if seed is None else hashlib.sha256(f"mllm-dr dp seed {seed}".encode()).digest()
        self._segment, self._left, self._stream = 0, 0, None

    def _keystream(self, n: int) -> bytes:
        """``n`` bytes of the stream; a new nonce (the segment's number) every ``SEGMENT`` bytes (a long
        DP-SGD run draws hundreds of GiB of noise; the cipher refuses to wrap its counter)."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        parts = []
        while n:
            if not self._left:
                nonce = bytes(4) + self._segment.to_bytes(12, "little")     # block counter 0, then the segment
                self._stream = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
                self._segment, self._left = self._segment + 1, self.SEGMENT
            k = min(n, self._left)
            parts.append(self._stream.update(bytes(k)))
            self._left, n = self._left - k, n - k
        return b"".join(parts)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` floats uniform in (0, 1)."""
        raw = np.frombuffer(self._keystream(8 * n), dtype=np.uint64)
        return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53

    def normal(self, shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standard normal draws of ``shape``."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        radius, angle = np.sqrt(-2.0 * np.log(u[:half])), 2.0 * np.pi * u[half:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z).reshape(tuple(shape)).to(dtype)

    def permutation(self, n: int) -> list[int]:
        return np.argsort(self.uniform(n), kind="stable").tolist()


def clip_scale(norm: float, clip_norm: float) -> float:
    """The factor that brings a contribution of L2 norm ``norm`` within ``clip_norm``; 0 when the norm is
    not finite: the contribution is dropped (a NaN norm fails every comparison, which kept it unclipped,
    and an infinite one times 0 is NaN: callers zero it, never multiply)."""
    if not math.isfinite(norm):
        return 0.0
    return min(1.0, clip_norm / norm) if norm > 0 else 1.0


def clipped_delta(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], clip_norm: float
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """(update - reference) scaled to L2 norm <= ``clip_norm`` (float64), and its norm before clipping;
    zeros when that norm is not finite (``clip_scale``)."""
    odd = [n for n, t in update.items() if t.shape != reference[n].shape]
    if odd:                      # never a broadcast difference (a rank-1 factor against the run's rank)
        raise ValueError(f"update {odd[0]} has shape {tuple(update[odd[0]].shape)}, the global "
                         f"{tuple(reference[odd[0]].shape)}")
    deltas = {n: t.double() - reference[n].double() for n, t in update.items()}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    scale = clip_scale(norm, clip_norm)
    return {n: d * scale if scale else torch.zeros_like(d) for n, d in deltas.items()}, norm


def clip_and_noise(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], clip_norm: float,
                   noise_multiplier: float, seed: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """reference + clip(update - reference) + noise; returns (private update, norm before clipping).
    The noise comes from a :class:`PrivateRandom` (``seed``: a repeatable one, for tests). An update that
    is not finite is refused before any noise (NonFiniteUpdate): the site's training failed."""
    deltas, norm = clipped_delta(update, reference, clip_norm)
    if not math.isfinite(norm):
        raise NonFiniteUpdate(f"the update is not finite (L2 norm {norm} before clipping): site-level DP sends "
                              f"nothing of it")
    rng = PrivateRandom(seed)
    out = {}
    for n, d in deltas.items():
        noise = rng.normal(d.shape) * (noise_multiplier * clip_norm)
        out[n] = (reference[n].double() + d + noise).to(update[n].dtype)
    return out, norm


Mechanism = tuple[float, float, int]      # (noise multiplier, sampling rate, steps): Opacus' accountant history


def epsilon_after(history: list[Mechanism], delta: float) -> float:
    """Epsilon after these (subsampled) Gaussian mechanisms, composed with Opacus' RDP accountant."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(z), float(q), int(k)) for z, q, k in history]
    return float(acc.get_epsilon(delta))


def dp_sgd_steps(epochs: int, sample_rate: float, items: int = 1) -> int:
    """Steps of patient-level DP-SGD in ``epochs`` epochs: one epoch = 1 / sample_rate Poisson batches,
    for each of the ``items`` items when a step trains one item (``dp.step = "item"``)."""
    return epochs * max(1, round(1 / sample_rate)) * max(1, items)


def mechanism_possible(noise_multiplier, sample_rate, steps) -> bool:
    """A Gaussian mechanism the accountant may compose: noise > 0, rate in (0, 1], a whole number of steps
    >= 0 (Opacus composes negative steps as a negative cost: budget given back)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (noise_multiplier, sample_rate, steps))
    return (numbers and math.isfinite(noise_multiplier) and noise_multiplier > 0 and 0 < sample_rate <= 1
            and float(steps).is_integer() and steps >= 0)


UNIT_FILES = {"site": "privacy.json", "patient": "privacy-patient.json"}
RESET_EVENT = "dp_ledger_reset"
ANCHOR_EVENTS = ("dp_round", "dp_refund", "dp_unprotected_round", RESET_EVENT)   # what _anchored counts
SUPERNODE_PID = Path("federation") / "supernode.pid"      # fl_client.supernode.pidfile, under a workspace
MAX_REASON = 500

# the workspaces whose ledger locks this context holds (``PrivacyLedger._locked``: a reset of both units, and the
# SuperNode check, under one taking of the locks; fcntl locks taken twice by one process would wait on themselves)
_LOCKS_HELD: ContextVar[frozenset] = ContextVar("mllmdr_privacy_locks_held", default=frozenset())

# the audit log's DP entries as read once for a ledger operation (_one_audit_read): audit path -> entries
_AUDIT_READ: ContextVar[dict | None] = ContextVar("mllmdr_privacy_audit_read", default=None)


@contextmanager
def _one_audit_read():
    """Within the block, every ledger read anchors itself to one read of the audit log (per log): a charge
    reads each ledger of the workspace (its own; both units' for voids; the site's for a patient's inherited
    rounds), and each read used to read the log again (3-4 reads per charge). Reentrant; an entry appended
    within the block drops that log's read (``PrivacyLedger._audit``)."""
    if _AUDIT_READ.get() is not None:
        yield
        return
    token = _AUDIT_READ.set({})
    try:
        yield
    finally:
        _AUDIT_READ.reset(token)


def _reset_read(entries: list[dict], unit: str, audit_path: Path) -> tuple[dict[str, int], dict | None, list[dict]]:
    """How many ``dp_round``, ``dp_refund`` and ``dp_unprotected_round`` entries of ``unit`` the log holds after
    that unit's last ``dp_ledger_reset`` entry, and that entry (None: never reset). Entries of an older kit name
    no unit: those were site-level rounds. A reset entry is counted only when its signature verifies under the
    log's key (``audit.signed_by``): the rest of the count reads lines unchecked, but one typed-in reset line
    would give a whole budget back; such a line leaves the reset before it in force (the ledger is then refused
    as rolled back). Third: the unit's reset entries after ``last`` that do not verify (named in a refusal: a
    replaced audit key fails every earlier reset, F6 of session 47's review)."""
    from mllm_dr import audit

    counts, last, unverified = dict.fromkeys(ANCHOR_EVENTS[:3], 0), None, []
    pub = _log_key(audit_path) if any(e.get("event") == RESET_EVENT for e in entries) else None
    for e in entries:
        if e.get("unit") != unit and not (unit == "site" and e.get("unit") is None):
            continue
        if e.get("event") == RESET_EVENT:
            if e.get("unit") == unit and audit.signed_by(e, pub):
                counts, last, unverified = dict.fromkeys(counts, 0), e, []
            elif e.get("unit") == unit:
                unverified.append(e)
        elif e.get("event") in counts:
            counts[e["event"]] += 1
    return counts, last, unverified


def _unverified_note(audit_path: Path, unverified: list[dict]) -> str:
    """What a refusal adds when a reset entry of the unit does not verify under ``keys/audit.pub``: the refusal may
    come from the key, not the ledger."""
    if not unverified:
        return ""
    from mllm_dr.signing import fingerprint

    pub = _log_key(audit_path)
    fp = fingerprint(pub) if pub is not None else "unreadable"
    seqs = ", ".join(str(e.get("seq")) for e in unverified)
    return (f"; the reset at seq {seqs} is not signed by the audit key keys/audit.pub (fingerprint {fp}): was the "
            f"audit key replaced? restore keys/audit.* from a backup (a reset line typed into the log is never "
            f"signed)")


def _log_key(audit_path: Path):
    """The audit log's public key, or None when it is missing or unreadable (no reset entry then verifies)."""
    from mllm_dr import audit

    try:
        return audit.public_key(Path(audit_path))
    except (OSError, InputError, ValueError):
        return None


def json_epsilon(epsilon: float) -> float | None:
    """An epsilon as a JSON file or audit entry keeps it: None when infinite (strict JSON has no Infinity)."""
    return epsilon if math.isfinite(epsilon) else None


def ledgers(workspace_root: Path) -> list["PrivacyLedger"]:
    """The workspace's ledgers, one per privacy unit."""
    return [PrivacyLedger.of(workspace_root, unit) for unit in UNIT_FILES]


def refund_charge(workspace_root: Path, charge: str, why: str, audited: bool = False) -> bool:
    """Take ``charge`` back from the ledger of the workspace that holds it; True when one did. ``audited``:
    the round's ``dp_round`` entry was written already (its reply was blocked later), so the refund is
    audited too (``dp_refund``)."""
    return any([led.refund(charge, why, audited) for led in ledgers(workspace_root)])


def ledger_reports(workspace_root: Path, default_delta: float, policy_unit: str) -> list[dict]:
    """What status and `policy show` report (``PrivacyLedger.report``), the site policy's unit first: every ledger
    that exists, and the policy's unit when its history counts rounds (a patient ledger inheriting site-level
    rounds), and one the audit log says was deleted (its ``error``). Each report says when its ledger was last
    reset (``reset``): its epsilon covers the period since then only."""
    out = []
    with _one_audit_read():
        for led in sorted(ledgers(workspace_root), key=lambda led: led.unit != policy_unit):
            rep = led.report(default_delta)
            counted = rep.get("rounds") or rep.get("site_level_rounds_counted")
            if led.path.is_file() or "error" in rep or (led.unit == policy_unit and counted):
                out.append(rep)
    return out


def void_text(mark: dict) -> str:
    """What a ledger whose guarantee an unprotected round voided says (``PrivacyLedger.mark_unprotected``;
    ``units``: every ledger holding a mark, as ``void_since`` finds them; ``unit``: the first mark's). A mark in
    the site-level ledger is ended by a reset of both (the per-patient ledger counts it: ``reset_ledger``)."""
    units = mark.get("units") or [mark.get("unit", "site")]
    where = " and ".join(f"{u}-level" for u in units) + (" ledgers" if len(units) > 1 else " ledger")
    reset = "both" if "site" in units else units[0]
    return (f"guarantee void since {mark.get('time')}, run {mark.get('run')} round {mark.get('round')} (trained "
            f"without DP after DP rounds; recorded in the {where}: only a new privacy period, "
            f"'mllmdr-site policy reset-ledger --unit {reset}', ends it)")


def reset_ledger(workspace_root: Path, unit: str, reason: str, default_delta: float) -> dict:
    """Start a new privacy period for ``unit`` at this site (``mllmdr-site policy reset-ledger``; the DPO's
    decision, e.g. a new cohort whose data was never in training): refused while the site may be training
    (its SuperNode runs, another command holds the workspace, a rehearsal runs its virtual sites: a round
    charged before the reset and audited after it would leave the new ledger refused), then
    ``PrivacyLedger.reset``. ``default_delta``: the policy's, for the epsilon of a ledger that records none.
    Returns what was done (the audit entry's fields, and the ledger's report after it)."""
    from mllm_dr.processes import running_from_pidfile
    from mllm_dr.workspace import Workspace

    if unit not in (*UNIT_FILES, "both"):
        raise InputError(f"no privacy unit {unit!r}: one of {', '.join(UNIT_FILES)} or both")
    reason = reset_reason(reason)
    ws = Workspace(workspace_root)
    site, patient = PrivacyLedger.of(ws.root, "site"), PrivacyLedger.of(ws.root, "patient")
    with ExitStack() as stack:
        stack.enter_context(ws.lock("policy reset-ledger"))      # a local `train`, extract, ... holds it
        stack.enter_context(_rehearsal_quiet(ws.root))
        stack.enter_context(site._locked())      # both ledgers' locks, held across both resets of --unit both
        # under the ledgers' locks (F7 of the review): a SuperNode started after this check waits for them to charge
        pid = running_from_pidfile(ws.root / SUPERNODE_PID)
        if pid:
            raise InputError(f"this site's SuperNode is running (pid {pid}) and may be training a round charged to "
                             f"the ledger; stop it first ('mllmdr-site stop'), reset the ledger, then start it again",
                             ws.root)
        if unit == "site" and site.path.is_file():
            held = site._data()
            if held["rounds"] or site.unprotected(held):
                raise InputError("the per-patient ledger counts this site-level ledger's rounds and unprotected rounds: "
                                 "resetting it alone would lower the per-patient epsilon without a patient-level "
                                 "reset; reset both (--unit both)", site.path)
        if unit != "both":
            return PrivacyLedger.of(ws.root, unit).reset(reason, default_delta)
        if not site.path.is_file() and not patient.path.is_file():
            patient._anchored({"unit": "patient", "rounds": []})     # "is missing" when the log has its rounds
            site._anchored({"unit": "site", "rounds": []})
            raise InputError("no privacy ledger here: nothing to reset", ws.root)
        for led in (site, patient):         # both readable and anchored before either is reset: never one of two
            led._data()
        if not patient.path.is_file():      # a per-patient epsilon counts the site's rounds: its reset is recorded too
            patient._write(patient._data(), 0.0)       # anchored: refused when the log has patient rounds
        # the patient ledger first: its epsilon at the reset counts the site rounds it inherits
        done = [led.reset(reason, default_delta) for led in (patient, site) if led.path.is_file()]
        for one in done:                    # what each ledger says once both are reset
            one["now"] = PrivacyLedger.of(ws.root, one["unit"]).report(default_delta)
        return {"unit": "both", "resets": done}


def reset_reason(reason: str | None) -> str:
    """The reason a reset records, on one line; an InputError when it is empty or too long."""
    reason = " ".join(str(reason or "").split())
    if not reason:
        raise InputError("a reset needs a reason (--reason TEXT, kept in the audit log): why a new privacy period "
                         "starts, e.g. the DPO's decision and the new cohort")
    if len(reason) > MAX_REASON:
        raise InputError(f"the reason is {len(reason)} characters; keep it under {MAX_REASON} (it goes in the audit "
                         f"log: a reference to the DPO's decision, never patient data)")
    return reason


@contextmanager
def _rehearsal_quiet(root: Path):
    """Hold the rehearsal folder's lock when ``root`` is a rehearsal's virtual site (``<folder>/sites/<name>``,
    ``mllm_dr.rehearsal``): refused while a `simulate` trains there."""
    from mllm_dr.rehearsal import REHEARSAL_FILE, folder_lock

    folder = root.parent.parent
    if root.parent.name != "sites" or not (folder / REHEARSAL_FILE).is_file():
        yield
        return
    with folder_lock(folder, "a 'mllmdr-center simulate'{holder} is training this rehearsal's virtual sites; wait for "
                             "it to end, then reset the ledger", root):
        yield


def _archive_name(path: Path, when: datetime, n: int) -> Path:
    """``privacy-patient.20250101T120000Z.retired.json`` beside ``path`` (``-2``, ``-3``... within one second)."""
    stamp = when.strftime("%Y%m%dT%H%M%SZ") + (f"-{n}" if n > 1 else "")
    return path.with_name(f"{path.stem}.{stamp}.retired{path.suffix}")


def _archive(path: Path, data: bytes) -> Path:
    """A copy of ``data`` (the ledger's bytes) beside ``path`` under a new name (``atomic_create_new``: never over
    another file, never a half-written one)."""
    from mllm_dr.atomic import atomic_create_new

    when = datetime.now(timezone.utc)
    try:
        return atomic_create_new((_archive_name(path, when, n) for n in range(1, 1000)), data)
    except FileExistsError:
        raise InputError("no free archive name beside the ledger (1000 resets this second?)", path) from None


@dataclass
class PrivacyLedger:
    """A site's (epsilon, delta) spent for one privacy unit: each entry one Gaussian mechanism with its
    sampling rate and number of steps (site level: the whole update once per round, rate 1, 1 step;
    patient level: a round's DP-SGD steps with Poisson sampling of patients). Beside them: the delta of the
    charges (epsilon is reported at it) and the rounds trained without DP after them (``mark_unprotected``)."""

    path: Path
    unit: str = "site"

    @classmethod
    def of(cls, workspace_root: Path, unit: str) -> "PrivacyLedger":
        return cls(Path(workspace_root) / UNIT_FILES[unit], unit)

    @property
    def audit_path(self) -> Path:
        """The signed audit log of the ledger's workspace (``Workspace.audit_path``)."""
        return self.path.parent / "audit" / "audit.jsonl"

    def _data(self) -> dict:
        """The ledger file's content; a damaged one is an error naming it (the site stops contributing
        until it is restored: a ledger cannot be guessed). A ledger of an older kit (no delta, no
        unprotected rounds) reads as it is."""
        if not self.path.is_file():
            return self._anchored({"unit": self.unit, "rounds": []})
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
                raise ValueError("no list of rounds")
            for k, r in enumerate(data["rounds"]):      # what check() refuses to add, refused when read
                if not isinstance(r, dict) or not mechanism_possible(r.get("noise_multiplier"),
                                                                     r.get("sample_rate", 1.0), r.get("steps", 1)):
                    raise ValueError(f"round entry {k} is not a possible mechanism")
            marks = data.get("unprotected", [])
            if not isinstance(marks, list) or not all(isinstance(m, dict) for m in marks):
                raise ValueError("the unprotected rounds are not a list of entries")
            delta = data.get("delta")   # absent in an older kit's ledger; "x" failed status with a TypeError
            if delta is not None and not (isinstance(delta, (int, float)) and not isinstance(delta, bool)
                                          and 0 < delta < 1):      # and 2 showed a negative epsilon (session 44)
                raise ValueError(f"delta {delta!r} is not a number between 0 and 1")
        except (OSError, ValueError) as err:
            raise InputError(f"the privacy ledger is unreadable ({type(err).__name__}: {str(err)[:120]}); restore it "
                             f"from a backup: the epsilon spent cannot be recomputed without it", self.path) from None
        return self._anchored(data)

    def _anchored(self, data: dict) -> dict:
        """``data``, once checked against the workspace's signed audit log, the ledger's anchor (session 44): a
        ledger holding fewer charged rounds than the log's ``dp_round`` entries less its ``dp_refund`` ones, or
        fewer unprotected rounds than its ``dp_unprotected_round`` ones, was deleted or rolled back, and is an
        error naming it (it used to count as a fresh budget). The ledger is written before each of those
        entries and a refund audited before it is written, so a ledger may hold more than the log (a crash
        between the two), never less. Only the entries after the unit's last ``dp_ledger_reset`` count
        (``_reset_read``; the reset is audited before the empty ledger is written, so a crash between the two
        leaves the old ledger, holding more than the log since: over-counted, never a fresh budget without its
        reset entry). The log's own integrity is what ``audit verify`` and the signed heads held by the center
        check; deleting both ledger and log is caught there, not here."""
        seen, last, unverified = _reset_read(self._anchor_entries(), self.unit, self.audit_path)
        note = _unverified_note(self.audit_path, unverified)
        charged, unprotected = seen["dp_round"] - seen["dp_refund"], seen["dp_unprotected_round"]
        held, held_unprotected = len(data["rounds"]), len(data.get("unprotected", []))
        if last is not None and (data.get("reset") or {}).get("seq") != last.get("seq") and self.path.is_file():
            # not the ledger the reset started: an interrupted reset (the old ledger in force, charged on since:
            # the archived rounds first, then every round since) or a backup from before the reset (refused: taken
            # for an interrupted reset, a rerun erased the new period's rounds; the second read of session 47)
            if data["rounds"][:last.get("rounds_at_reset", 0)] != self._archived_rounds(last) \
                    or held < last.get("rounds_at_reset", 0) + charged:
                raise InputError(f"the privacy ledger was rolled back to before its reset at {last.get('time')} "
                                 f"(audit seq {last.get('seq')}): it neither is the ledger that reset started nor "
                                 f"extends the one it archived ({last.get('archive')}); restore the ledger written "
                                 f"since from a backup{note}", self.path)
        if held < charged or held_unprotected < unprotected:
            what = "is missing" if not self.path.is_file() else "was rolled back"
            raise InputError(f"the privacy ledger {what}: the audit log records {charged} DP round(s) charged and "
                             f"{unprotected} unprotected round(s) for unit {self.unit}, the ledger holds {held} and "
                             f"{held_unprotected}; restore it from a backup: a deleted ledger is not a fresh budget"
                             f"{note}",
                             self.path)
        return data

    def _archived_rounds(self, reset: dict) -> list | None:
        """The rounds of the ledger ``reset`` (a ``dp_ledger_reset`` entry) archived, when its archive is beside
        this ledger with the sha256 the entry recorded; None otherwise."""
        path = self.path.with_name(str(reset.get("archive") or "-"))
        try:
            raw = path.read_bytes()
            return json.loads(raw)["rounds"] if hashlib.sha256(raw).hexdigest() == reset.get("archive_sha256") else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _anchor_entries(self) -> list[dict]:
        """The log's DP entries (``ANCHOR_EVENTS``), in log order: read once per ledger operation
        (``_one_audit_read``), else here."""
        from mllm_dr import audit

        read = _AUDIT_READ.get()
        key = str(self.audit_path)
        if read is not None and key in read:
            return read[key]
        entries = audit.event_entries(self.audit_path, ANCHOR_EVENTS)
        if read is not None:
            read[key] = entries
        return entries

    def last_reset(self) -> dict | None:
        """The unit's last ``dp_ledger_reset`` audit entry (signed under the log's key), else None."""
        return _reset_read(self._anchor_entries(), self.unit, self.audit_path)[1]

    def own(self, data: dict | None = None) -> list[Mechanism]:
        return [(r["noise_multiplier"], r.get("sample_rate", 1.0), r.get("steps", 1))
                for r in (data or self._data())["rounds"]]

    def unprotected(self, data: dict | None = None) -> list[dict]:
        """The rounds trained without DP after this ledger's charges (``mark_unprotected``)."""
        return (data or self._data()).get("unprotected", [])

    @staticmethod
    def recorded_delta(data: dict) -> float | None:
        """The delta of the ledger's charges (the last charge's); None in a ledger written without one."""
        return data.get("delta")

    def void_since(self, data: dict | None = None) -> dict | None:
        """The first unprotected round in either unit's ledger (a release without DP voids every unit's
        guarantee for the patients it trained on), else None; ``data``: this ledger's content, if read."""
        marks = [m | {"unit": led.unit} for led in ledgers(self.path.parent)
                 for m in (led.unprotected(data) if data is not None and led.path == self.path else led.unprotected())]
        if not marks:
            return None
        units = [u for u in UNIT_FILES if any(m["unit"] == u for m in marks)]
        return min(marks, key=lambda m: str(m.get("time"))) | {"units": units}

    def inherited(self) -> list[Mechanism]:
        """What this unit's loss must also count: for a patient, the site-level rounds of the same workspace
        (a policy may switch units). One patient moves a site's clipped update by at most 2C, so each such
        round is, per patient, a Gaussian with half its noise multiplier."""
        if self.unit != "patient":
            return []
        site = PrivacyLedger.of(self.path.parent, "site")
        return [(z / 2, q, k) for z, q, k in site.own()] if site.path.is_file() else []

    def history(self) -> list[Mechanism]:
        return self.inherited() + self.own()

    def _epsilon(self, data: dict, delta: float) -> float:
        """Epsilon of this ledger's content ``data`` at ``delta``: infinite once the guarantee is void."""
        return math.inf if self.void_since(data) else epsilon_after(self.inherited() + self.own(data), delta)

    def spent(self, delta: float) -> float:
        with _one_audit_read():
            return self._epsilon(self._data(), delta)

    def check(self, noise_multiplier: float, delta: float, budget: float, sample_rate: float = 1.0,
              steps: int = 1, data: dict | None = None) -> float:
        """Epsilon after one more round; raises BudgetSpent if that is over ``budget`` or the guarantee is
        void (``void_since``). Only a preview: what binds is ``spend``, which checks and records as one step
        (``data``: the ledger as it read it under its lock). A mechanism that cannot be (steps < 0, a rate
        outside (0, 1], noise <= 0) is a ValueError: Opacus composes negative steps as a negative cost, which
        would give budget back."""
        if not (mechanism_possible(noise_multiplier, sample_rate, steps) and 0 < delta < 1):
            raise ValueError(f"no such DP mechanism: {steps} steps at sample rate {sample_rate}, noise multiplier "
                             f"{noise_multiplier}, delta {delta}")
        with _one_audit_read():
            return self._check(noise_multiplier, delta, budget, sample_rate, steps,
                               self._data() if data is None else data)

    def _check(self, noise_multiplier: float, delta: float, budget: float, sample_rate: float, steps: int,
               data: dict) -> float:
        who = "per patient" if self.unit == "patient" else "for this site"
        void = self.void_since(data)
        if void:
            raise BudgetSpent(f"privacy budget: epsilon {who} is infinite, {void_text(void)}: DP-budgeted training "
                              f"is refused (runs without DP are not)")
        nxt = epsilon_after(self.inherited() + self.own(data) + [(noise_multiplier, sample_rate, steps)], delta)
        if nxt > budget:
            raise BudgetSpent(f"privacy budget: one more round would bring epsilon {who} to {nxt:.2f} > budget "
                              f"{budget:g} (delta {delta:g}); this site stops contributing")
        return nxt

    def report(self, default_delta: float) -> dict:
        """This ledger for status and `policy show`: epsilon at the delta of its charges (``default_delta``
        for a ledger written without one), its rounds, whether the guarantee is void, and ``error`` when its
        DP rounds are refused (unreadable), and ``reset``: the ledger's last reset (``reset_ledger``; when, by
        whom, why, the archive), after which alone its epsilon counts, with ``unfinished`` when the log records
        a reset the ledger file does not hold (interrupted before the empty ledger was written: the epsilon is
        still the old ledger's; run the reset again)."""
        with _one_audit_read():
            return self._report(default_delta)

    def _report(self, default_delta: float) -> dict:
        out: dict = {"unit": self.unit, "ledger": str(self.path)}
        reset = self.last_reset()
        if reset is not None:
            out["reset"] = {k: reset.get(k) for k in ("time", "actor", "reason", "archive", "seq")}
        try:
            data = self._data()
            if reset and self.path.is_file() and (data.get("reset") or {}).get("seq") != reset.get("seq"):
                out["reset"]["unfinished"] = ("the audit log records this reset, the ledger does not (interrupted "
                                              "before the empty ledger was written): the epsilon is still the old "
                                              "ledger's; run the reset again")
            delta = self.recorded_delta(data) or default_delta
            out |= {"epsilon": self._epsilon(data, delta), "delta": delta,
                    "delta_recorded": self.recorded_delta(data) is not None, "rounds": len(self.own(data)),
                    "site_level_rounds_counted": len(self.inherited()),
                    "unprotected_rounds": len(self.unprotected(data))}
            void = self.void_since(data)
            if void:
                out["void"] = void_text(void)
        except InputError as err:
            out["error"] = str(err)
        return out

    @contextmanager
    def _locked(self):
        """The locks of all the workspace's ledgers, site first: a patient ledger counts the site's
        (``inherited``) and a site refund lowers both; one order, so two ledgers never wait on each other.
        Reentrant within one context (``reset_ledger`` holds them across both units' resets). The audit log is
        read afresh once the locks are held (never a read made before them), then once for the block."""
        where = str(self.path.parent.resolve())
        with ExitStack() as stack:
            if where not in _LOCKS_HELD.get():
                for led in ledgers(self.path.parent):
                    stack.enter_context(file_lock(led.path))
                token = _LOCKS_HELD.set(_LOCKS_HELD.get() | {where})
                stack.callback(_LOCKS_HELD.reset, token)
            stack.enter_context(_one_audit_read())       # the log read once under the locks (``_anchored``)
            read = _AUDIT_READ.get()
            if read is not None:
                read.pop(str(self.audit_path), None)
            yield

    def _write(self, data: dict, epsilon: float) -> None:
        """Under the lock: the ledger's content, with its epsilon now (null when the guarantee is void)."""
        data["epsilon"], data["unit"] = json_epsilon(epsilon), self.unit
        atomic_write_text(self.path, json.dumps(data, indent=1, allow_nan=False))

    def _audit(self, event: str, epsilon: float, delta: float | None, **details) -> dict:
        """Under the lock: an audit entry with this ledger's epsilon now (null when the guarantee is void)."""
        from mllm_dr import audit

        entry = audit.append(self.audit_path, event, unit=self.unit, epsilon_total=json_epsilon(epsilon), delta=delta,
                             **details)
        read = _AUDIT_READ.get()
        if read is not None:                # the log changed: a later read within the lock reads it again
            read.pop(str(self.audit_path), None)
        return entry

    def spend(self, run: str, round_: int, noise_multiplier: float, clip_norm: float, delta: float,
              budget: float = math.inf, sample_rate: float = 1.0, steps: int = 1,
              charge: str = "") -> tuple[float, float]:
        """Charge one round before its mechanism runs: check the budget and append the round as one step
        under the ledger's lock (``mllm_dr.atomic.file_lock``), so two runs training at once cannot both
        pass the check on the same history and together overspend. Returns (epsilon of this round alone,
        cumulative epsilon); raises BudgetSpent with nothing recorded. ``refund(charge)`` takes the
        charge back when the round released nothing (``charge``: an id unique to this try of the round)."""
        with self._locked():
            data = self._data()      # the total with this round is what the check computes
            total = self.check(noise_multiplier, delta, budget, sample_rate, steps, data)
            data["rounds"].append({"run": run, "round": round_, "noise_multiplier": noise_multiplier,
                                   "clip_norm": clip_norm, "sample_rate": sample_rate, "steps": steps}
                                  | ({"charge": charge} if charge else {}))
            data["delta"] = delta
            self._write(data, total)
        return epsilon_after([(noise_multiplier, sample_rate, steps)], delta), total

    def record(self, run: str, round_: int, noise_multiplier: float, clip_norm: float, delta: float,
               sample_rate: float = 1.0, steps: int = 1) -> tuple[float, float]:
        """``spend`` with no budget to check (a round already decided)."""
        return self.spend(run, round_, noise_multiplier, clip_norm, delta, math.inf, sample_rate, steps)

    def mark_unprotected(self, run: str, round_: int, delta: float) -> None:
        """Record a round released without DP after this ledger's charges: the patients it trained on are no
        longer protected, so epsilon is infinite from now on, for every unit (``void_since``); audited. Called
        when the round's reply leaves the site (``privacy_mod.settle_charge``), never before: a round blocked
        or failed released nothing. ``delta`` (the policy's) is recorded in a ledger written without one."""
        with self._locked():
            data = self._data()
            data.setdefault("delta", delta)
            data.setdefault("unprotected", []).append({
                "run": run, "round": round_, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            self._write(data, math.inf)
            self._audit("dp_unprotected_round", math.inf, data["delta"], run=run, round=round_)

    def refund(self, charge: str, why: str = "", audited: bool = False) -> bool:
        """Take back the round charged as ``charge`` (``spend``): for a round that released nothing (its
        training failed, or the reply that left the site was an error). By id, so another try of the same
        round (a resumed run's) keeps its own charge. ``audited``: its ``dp_round`` entry was written (the
        reply was blocked after), so a ``dp_refund`` entry with the epsilon after it follows. A crash before
        the refund keeps the charge (the ledger errs on the patients' side). True when this ledger held it."""
        if not charge:
            return False
        with self._locked():
            data = self._data()
            if not any(r.get("charge") == charge for r in data["rounds"]):
                return False
            data["rounds"] = [r for r in data["rounds"] if r.get("charge") != charge]
            delta = self.recorded_delta(data)                # recorded by the spend that made the charge
            epsilon = self._epsilon(data, delta)
            if audited:      # before the ledger drops it: a ledger may hold more than the log, never less (_anchored)
                self._audit("dp_refund", epsilon, delta, charge=charge, why=why)
            self._write(data, epsilon)
        return True

    def reset(self, reason: str, default_delta: float) -> dict:
        """A new privacy period for this unit (``reset_ledger`` refuses it while the site may be training; call
        that): under the ledgers' lock, the ledger as it stands is copied beside itself
        (``privacy-patient.<UTC time>.retired.json``: never overwritten, never deleted), the reset is audited
        (``dp_ledger_reset``: the unit, its epsilon, rounds and void at the reset, the reason, the archive's
        name and sha256), and only then does an empty ledger replace it. A crash before the audit entry leaves
        the old ledger in force (and a spare archive); one after it leaves the old ledger too, which the anchor
        then accepts (it holds more than the log since the reset: over-counted), and ``report`` says the reset
        is unfinished. A ledger the anchor refuses (missing, rolled back, unreadable) is not reset: restore it
        first, so the archive holds its true history. The other unit's ledger and anchor are not touched, but
        the units are linked: a patient ledger counts the site-level rounds of the ``privacy.json`` in force and
        either unit's unprotected rounds void both, so ``reset_ledger`` resets a site-level ledger holding any
        rounds or marks only together with the patient one (``--unit both``)."""
        with self._locked():
            if not self.path.is_file():
                self._anchored({"unit": self.unit, "rounds": []})     # "is missing" when the log has its rounds
                raise InputError(f"no {self.unit}-level privacy ledger here: nothing to reset", self.path)
            raw = self.path.read_bytes()
            data = self._data()          # refused when missing, rolled back or unreadable: restore it first
            delta = self.recorded_delta(data) or default_delta
            void, before = self.void_since(data), self._epsilon(data, delta)
            fresh: dict = {"unit": self.unit, "rounds": []}
            after = self._epsilon(fresh, delta)      # 0, but a patient ledger's inherited site rounds, another void
            archive = _archive(self.path, raw)
            entry = self._audit(RESET_EVENT, after, delta, reason=reason, archive=archive.name,
                                archive_sha256=hashlib.sha256(raw).hexdigest(), epsilon_at_reset=json_epsilon(before),
                                rounds_at_reset=len(data["rounds"]),
                                unprotected_rounds_at_reset=len(self.unprotected(data)), void=void is not None,
                                **({"void_since": void_text(void)} if void else {}))
            # the entry first: a crash before the next line leaves the old ledger in force, never a fresh one unaudited
            fresh["reset"] = {"time": entry["time"], "seq": entry["seq"], "reason": reason, "archive": archive.name}
            self._write(fresh, after)
            return {"unit": self.unit, "ledger": str(self.path), "archive": str(archive),
                    "archive_sha256": entry["archive_sha256"], "audit_seq": entry["seq"], "time": entry["time"],
                    "reason": reason, "epsilon_at_reset": before, "rounds_at_reset": entry["rounds_at_reset"],
                    "void_at_reset": void is not None, "now": self.report(default_delta)}
