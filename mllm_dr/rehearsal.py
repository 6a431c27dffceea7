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
from pathlib import Path

from pydantic import BaseModel, Field

from mllm_dr.atomic import atomic_write_text
from mllm_dr.errors import InputError, MllmDrError

SIMULATION_ENV = "MLLMDR_SIMULATION"     # path of rehearsal.json; set only by `mllmdr-center simulate`
REHEARSAL_FILE = "rehearsal.json"


class SimulatedDropout(MllmDrError):
    """A virtual site failing a round on purpose (rehearsal only)."""


class Rehearsal(BaseModel):
    """What the ClientApp of a virtual node needs: its workspace, and the rounds it fails."""

    workspaces: list[str] = Field(description="partition-id -> workspace root")
    dropouts: dict[int, list[str]] = Field(default_factory=dict, description="round -> site ids failing it")

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
    """round -> the sites that fail it: round(rate x sites) drawn afresh each round (seeded)."""
    if not 0 <= rate < 1:
        raise InputError(f"dropout rate {rate} must be in [0, 1)")
    k, rng = round(rate * len(sites)), random.Random(seed)
    return {r: sorted(rng.sample(sites, k)) for r in range(1, rounds + 1) if k}


def site_names(n: int) -> list[str]:
    width = len(str(n))
    return [f"site{i + 1:0{width}d}" for i in range(n)]


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
    names, out = site_names(n), []
    ca, center_pub = (center.pki / "ca.crt").read_text(), center.signing_pub.read_text()
    audit.append(center.audit_path, "rehearsal_init", sites=n, seed=seed)     # makes the center's audit key
    audit_key = fingerprint(load_private(audit.key_path(center.audit_path)).public_key())
    prog.start(progress, "preparing virtual sites", n)
    for name, corpus in zip(names, corpora):
        ws_root = Path(root) / "sites" / name
        ws = Workspace.init(ws_root, name)
        if site_policies and name in site_policies:
            atomic_write_text(ws_root / "policy.json", json.dumps(site_policies[name]))
        extract_workspace(ws, corpus, "edaic")
        req = make_request(ws, ws_root / "enroll.request.json")
        center.approve(req)
        write_bundle(ws_root / "enroll.bundle.json", req, center.config.address, ca, center_pub, audit_key)
        install_bundle(ws, ws_root / "enroll.bundle.json")
        out.append(ws_root.resolve())
        prog.advance(progress)
    return out
