"""A rehearsal of a large consortium on one machine (Flower-free parts).

``mllmdr-center simulate`` runs the real ServerApp and ClientApp under Flower's simulation engine.
Each virtual site is a real workspace (synthetic corpus, extracted features, enrolled with a real
center folder), so the ClientApp runs the code path hospitals run. What is rehearsal-only:

- the workspace of a virtual node: Flower's simulation gives each node only ``partition-id``; the
  ClientApp maps it to a workspace through the rehearsal file named by ``MLLMDR_SIMULATION`` in its
  own environment. A real SuperNode always sets ``workspace`` in its node config (``mllmdr-site``),
  so this path never runs there and the run config can never choose a site's folder;
- dropouts: the sites the rehearsal file names for a round fail that round (an error reply, as a
  site whose process crashed), so the center's handling of a failing site can be rehearsed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from mllm_dr.atomic import atomic_write_text
from mllm_dr.errors import InputError, MllmDrError

SIMULATION_ENV = "MLLMDR_SIMULATION"     # path of rehearsal.json; set only by `mllmdr-center simulate`
REHEARSAL_FILE = "rehearsal.json"
PREPARED = ("center", "corpus", "sites")    # what a rehearsal's preparation writes beside its record
LOCK_FILE = "rehearsal.lock"     # locked by the `simulate` using the folder (folder_lock); the file stays after it
#                                  ends: the lock, not the file, says that a rehearsal runs


@contextmanager
def folder_lock(folder: Path, refusal: str, where: Path):
    """The rehearsal folder ``folder`` for this process alone while the block runs (``LOCK_FILE``; the lock goes
    with the process: a killed rehearsal leaves none); InputError naming ``where``, one line, when another process
    holds it: ``refusal`` with ``{holder}`` filled in (" (pid N ...)" or nothing)."""
    from mllm_dr.atomic import Busy, held_or_busy

    try:
        with held_or_busy(Path(folder) / LOCK_FILE):
            yield
    except Busy as busy:
        raise InputError(refusal.format(holder=f" ({busy.holder})" if busy.holder else ""), where) from None


class SimulatedDropout(MllmDrError):
    """A virtual site failing a round on purpose (rehearsal only)."""


class Preparation(BaseModel):
    """What a rehearsal folder's virtual sites were prepared with, kept in ``rehearsal.json`` (session 44): a
    reused ``--dir`` kept its sites and silently ignored another --participants, --seed or --site-policy.
    ``complete`` is set by the record written last, once every site is enrolled: an interrupted preparation
    is known as such (it read as a folder of fewer sites)."""

    sites: int
    participants: int
    seed: int
    site_policies: dict[str, dict] = Field(default_factory=dict, description="site id -> the policy it holds")
    complete: bool = False

    def differences(self, asked: "Preparation") -> list[str]:
        """The options ``asked`` sets otherwise than this preparation, as the operator gave them."""
        out = [f"--{name} {getattr(self, name)} (asked: {getattr(asked, name)})"
               for name in ("sites", "participants", "seed") if getattr(self, name) != getattr(asked, name)]
        was, now = (", ".join(sorted(p)) or "no site" for p in (self.site_policies, asked.site_policies))
        if was != now:
            out.append(f"--site-policy held by {was} (asked: {now})")
        elif _normalised(self.site_policies) != _normalised(asked.site_policies):
            out.append(f"--site-policy held by {was} is another policy than the one asked")
        return out


def _normalised(policies: dict[str, dict]) -> str:
    """Policies as JSON text: a recorded policy (read back from JSON) compares equal to the one loaded now."""
    return json.dumps(policies, sort_keys=True)


class Rehearsal(BaseModel):
    """What the ClientApp of a virtual node needs: its workspace, and the rounds it fails; and what the
    folder's sites were prepared with (None: a record of a kit before session 44)."""

    workspaces: list[str] = Field(description="partition-id -> workspace root")
    dropouts: dict[int, list[str]] = Field(default_factory=dict, description="round -> site ids failing it")
    preparation: Preparation | None = None

    def write(self, path: Path) -> Path:
        atomic_write_text(path, self.model_dump_json(indent=1))
        return path

    @classmethod
    def from_env(cls) -> "Rehearsal | None":
        path = os.environ.get(SIMULATION_ENV)
        if not path:
            return None
        try:
            return cls.model_validate_json(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"not a readable rehearsal file ({type(err).__name__})", path) from None


def _virtual(node_config) -> Rehearsal | None:
    """The rehearsal, when this is a virtual node of a simulation (no workspace of its own, a partition id,
    and the simulation variable set where the ClientApp runs); else None."""
    if "workspace" in node_config or "partition-id" not in node_config:
        return None
    return Rehearsal.from_env()


def node_workspace(node_config) -> str:
    """The workspace root of this node: a real SuperNode names it; a virtual node gets its partition's."""
    if "workspace" in node_config:
        return str(node_config["workspace"])
    rehearsal = _virtual(node_config)
    if rehearsal is None:
        raise InputError("the SuperNode's node config names no workspace (start it with 'mllmdr-site train "
                         "--federated')")
    part = int(node_config["partition-id"])
    if not 0 <= part < len(rehearsal.workspaces):
        raise InputError(f"partition {part} has no workspace in the rehearsal ({len(rehearsal.workspaces)} sites)",
                         os.environ[SIMULATION_ENV])
    return rehearsal.workspaces[part]


def rehearse_dropout(node_config, site: str, round_: int) -> None:
    """Raise SimulatedDropout when the rehearsal has this virtual site fail this round; a no-op otherwise."""
    rehearsal = _virtual(node_config)
    if rehearsal and site in rehearsal.dropouts.get(round_, []):
        raise SimulatedDropout(f"{site} drops out of round {round_} (rehearsed dropout)")


def dropout_schedule(sites: list[str], rounds: int, rate: float, seed: int = 0) -> dict[int, list[str]]:
    """round -> the sites that fail it: round(rate x sites) drawn afresh each round (seeded). A rate that
    would drop no site is refused (session 46: 0.1 of 5 sites rounded to none, without a word)."""
    if not 0 <= rate < 1:
        raise InputError(f"dropout rate {rate} must be in [0, 1)")
    k, rng = round(rate * len(sites)), random.Random(seed)
    if rate and not k:
        raise InputError(f"--dropout-rate {rate:g} of {len(sites)} site(s) drops no site; use at least "
                         f"{1 / len(sites):.3g} (one site) or 0 (no dropouts)")
    return {r: sorted(rng.sample(sites, k)) for r in range(1, rounds + 1) if k}


def policy_holders(sites: int, share: float, policy: dict | None) -> list[str]:
    """The virtual sites holding ``--site-policy``: the first round(share x sites). A policy that no site
    would hold is refused (session 44: a share of 0.1 of 2 sites rounded to none, without a word)."""
    if policy is None:
        if share:
            raise InputError("--site-policy-share needs --site-policy")
        return []
    holders = site_names(sites)[:round(share * sites)]
    if not holders:
        raise InputError(f"--site-policy-share {share:g} of {sites} site(s) gives the --site-policy to no site; "
                         f"use at least {1 / sites:.3g} (one site)")
    return holders


def read_folder(root: Path) -> Rehearsal | None:
    """The record of the rehearsal folder ``root``; None when ``root`` is new or empty (its lock file aside).
    A folder holding anything else than what a rehearsal writes (its record, center/, corpus/, sites/) is
    refused: `simulate --dir` pointed at a real center folder wrote a corpus, a nested center with a second
    CA and virtual sites into it (a review, session 44)."""
    root = Path(root)
    if not root.exists():
        return None
    if not root.is_dir():
        raise InputError("is a file; --dir takes a rehearsal folder (new, empty, or one 'simulate' made)", root)
    entries = sorted(p.name for p in root.iterdir() if not _record_temp(p.name) and p.name != LOCK_FILE)
    if not entries:
        return None
    foreign = [n for n in entries if n not in (REHEARSAL_FILE, *PREPARED)]
    if foreign:
        raise InputError(f"not a rehearsal folder: it holds {', '.join(map(repr, foreign[:3]))}, which 'simulate' "
                         "never writes; give --dir a new or empty folder", root)
    if REHEARSAL_FILE not in entries:
        raise InputError(f"not a rehearsal folder (no {REHEARSAL_FILE}; it holds {', '.join(map(repr, entries[:3]))}"
                         "); give --dir a new or empty folder", root)
    try:
        return Rehearsal.model_validate_json((root / REHEARSAL_FILE).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"not a readable rehearsal record ({type(err).__name__}); use a new --dir",
                         root / REHEARSAL_FILE) from None


def _record_temp(name: str) -> bool:
    """The temporary file of the record's atomic write, left by a crash mid-write (``atomic_write_text``)."""
    return name.startswith(f".{REHEARSAL_FILE}.") and name.endswith(".tmp")


def reusable(root: Path, record: Rehearsal | None, asked: Preparation) -> bool:
    """Whether the sites prepared under ``root`` serve a rehearsal ``asked`` for: True when its preparation
    completed with these very options (InputError, naming them, when they differ or the record is an older
    kit's); False when there is nothing to reuse, and then whatever an interrupted preparation left (only
    the folders a preparation makes) is removed, so that it starts again whole (session 44: the next
    identical command said the folder held 1 virtual site, not 8)."""
    if record is None:
        return False
    was = record.preparation
    if was is None:
        raise InputError("this rehearsal folder was prepared by a kit before session 44 (its record names no "
                         "--participants, --seed or site policies); use a new --dir", root / REHEARSAL_FILE)
    if was.complete:
        differ = was.differences(asked)
        if differ:
            raise InputError(f"this rehearsal folder was prepared otherwise: {'; '.join(differ)}; use a new --dir",
                             root)
        missing = [w.name for w in site_workspaces(root, asked.sites) if not (w / "workspace.json").is_file()]
        if missing:
            raise InputError(f"this rehearsal folder lost virtual site(s) {', '.join(missing[:3])}; use a new --dir",
                             root)
        return True
    for name in PREPARED:
        shutil.rmtree(Path(root) / name, ignore_errors=True)
    return False


def site_names(n: int) -> list[str]:
    width = len(str(n))
    return [f"site{i + 1:0{width}d}" for i in range(n)]


def site_workspaces(root: Path, n: int) -> list[Path]:
    """The workspaces of the ``n`` virtual sites of the rehearsal folder ``root`` (``prepare_sites`` makes them)."""
    return [Path(root).resolve() / "sites" / name for name in site_names(n)]


def prepare_sites(root: Path, center, n: int, participants_per_site: int = 4, seed: int = 0,
                  seconds: float = 1.0, site_policies: dict[str, dict] | None = None, progress=None) -> list[Path]:
    """Write a synthetic corpus split ``n`` ways under ``root/corpus`` and make one real workspace per
    site under ``root/sites``: features extracted, the site's policy, enrolled with ``center`` (a
    ``CenterDir``) through the same request -> approval -> bundle files a hospital exchanges."""
    from mllm_dr import audit
    from mllm_dr import progress as prog
    from mllm_dr.enrollment import install_bundle, make_request, write_bundle
    from mllm_dr.features.extract import extract_workspace
    from mllm_dr.signing import fingerprint, load_private
    from mllm_dr.synth import SynthConfig, write_synthetic
    from mllm_dr.workspace import Workspace

    corpora = write_synthetic(SynthConfig(Path(root) / "corpus", "edaic", participants_per_site * n, n, seed, seconds))
    out = []
    ca, center_pub = (center.pki / "ca.crt").read_text(), center.signing_pub.read_text()
    audit.append(center.audit_path, "rehearsal_init", sites=n, seed=seed)     # makes the center's audit key
    audit_key = fingerprint(load_private(audit.key_path(center.audit_path)).public_key())
    signing_key = load_private(center.signing_key)     # signed and pinned, as a hospital's should be (session 47)
    prog.start(progress, "preparing virtual sites", n)
    for ws_root, corpus in zip(site_workspaces(root, n), corpora):
        name = ws_root.name
        ws = Workspace.init(ws_root, name)
        if site_policies and name in site_policies:
            atomic_write_text(ws_root / "policy.json", json.dumps(site_policies[name]))
        extract_workspace(ws, corpus, "edaic")
        req = make_request(ws, ws_root / "enroll.request.json")
        center.approve(req)
        write_bundle(ws_root / "enroll.bundle.json", req, center.config.address, ca, center_pub, audit_key,
                     signing_key=signing_key)
        install_bundle(ws, ws_root / "enroll.bundle.json", center_fingerprint=fingerprint(signing_key.public_key()))
        out.append(ws_root.resolve())
        prog.advance(progress)
    return out
