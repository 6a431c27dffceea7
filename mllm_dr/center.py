"""The coordinating center's folder: PKI, signing key, approved sites, runs.

Nothing here ever holds patient data: the center sees adapter tensors, aggregate
metrics and sufficient statistics only.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from mllm_dr.atomic import atomic_write_text
from mllm_dr.enrollment import EnrollmentRequest
from mllm_dr.errors import InputError
from mllm_dr.pki import make_ca, make_server_cert
from mllm_dr.signing import new_signing_key

CONFIG = "center.json"


class CenterConfig(BaseModel):
    host: str = Field("127.0.0.1", description="address the SuperLink listens on and sites connect to")
    port: int = Field(9092, ge=1024, le=65535)
    san_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost"])
    created: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class CenterDir:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        path = self.root / CONFIG
        if not path.is_file():
            raise InputError("not a center folder (no center.json); run 'mllmdr-center init --dir DIR' first", self.root)
        try:
            self.config = CenterConfig.model_validate_json(path.read_text())
        except ValidationError as err:
            raise InputError(f"invalid center config: {err.errors()[0]['msg']}", path) from None

    pki = property(lambda self: self.root / "pki")
    signing_key = property(lambda self: self.root / "keys" / "signing.key")
    signing_pub = property(lambda self: self.root / "keys" / "signing.pub")
    sites_dir = property(lambda self: self.root / "sites")
    runs_dir = property(lambda self: self.root / "runs")
    state_dir = property(lambda self: self.root / "state")
    audit_path = property(lambda self: self.root / "audit" / "audit.jsonl")

    @classmethod
    def init(cls, root: Path, host: str = "127.0.0.1", port: int = 9092, extra_hosts: list[str] | None = None
             ) -> "CenterDir":
        root = Path(root)
        if (root / CONFIG).exists():
            raise InputError("a center folder already exists here", root)
        sans = list(dict.fromkeys([host, "127.0.0.1", "localhost", *(extra_hosts or [])]))
        for sub in ("pki", "keys", "sites", "runs", "state", "audit"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "keys").chmod(0o700)
        (root / "pki").chmod(0o700)
        make_ca(root / "pki")
        make_server_cert(root / "pki", sans)
        new_signing_key(root / "keys" / "signing.key")
        from mllm_dr.audit import _signing_key

        _signing_key(root / "audit" / "audit.jsonl")
        cfg = CenterConfig(host=host, port=port, san_hosts=sans,
                           created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write_text(root / CONFIG, cfg.model_dump_json(indent=1))
        return cls(root)

    # sites ----------------------------------------------------------------
    def approve(self, req: EnrollmentRequest) -> Path:
        """Remember an approved site (its public key is what the SuperLink will accept)."""
        existing = self.sites_dir / f"{req.site_id}.json"
        if existing.is_file():
            old = json.loads(existing.read_text())
            if old["fingerprint"] != req.fingerprint:
                raise InputError(f"site {req.site_id!r} is already approved with another key "
                                 f"({old['fingerprint']}); revoke it first", existing)
        atomic_write_text(existing, json.dumps(req.model_dump() | {
            "approved": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1))
        (self.sites_dir / f"{req.site_id}.pub").write_text(req.node_public_key + "\n")
        return existing

    def approved_sites(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.sites_dir.glob("*.json"))]

    def run_dir(self, run: str) -> Path:
        return self.runs_dir / run
