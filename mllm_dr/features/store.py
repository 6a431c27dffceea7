"""The site's feature store: one safetensors file per participant plus a manifest.

Files are written atomically and hashed; the manifest is rewritten atomically after
each participant, so an interrupted extraction leaves a readable store and the next
run resumes where it stopped. Features never leave the site.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from mllm_dr.atomic import atomic_write_bytes, atomic_write_text, sha256_file
from mllm_dr.errors import InputError

MANIFEST = "manifest.json"


@dataclass
class ParticipantFeatures:
    participant: str
    audio: torch.Tensor | None          # [T, Da] float32
    visual: torch.Tensor | None         # [T, Dv] float32
    audio_source: str | None = None
    visual_source: str | None = None
    audio_names: list[str] = field(default_factory=list)
    visual_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class FeatureStore:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / MANIFEST
        self.manifest = self._load_manifest()

    def _load_manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {"version": 1, "fingerprint": None, "participants": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
            assert isinstance(data.get("participants"), dict)
            return data
        except (json.JSONDecodeError, AssertionError):
            raise InputError("feature manifest is not valid JSON with a 'participants' table; "
                             "move it away and run extract again", self.manifest_path) from None

    @property
    def participants(self) -> list[str]:
        return sorted(self.manifest["participants"])

    def set_fingerprint(self, fingerprint: dict) -> None:
        """Extraction settings; a change invalidates every stored participant."""
        if self.manifest.get("fingerprint") != fingerprint:
            self.manifest = {"version": 1, "fingerprint": fingerprint, "participants": {}}
            self._write_manifest()

    def is_current(self, pid: str) -> bool:
        entry = self.manifest["participants"].get(pid)
        path = self.dir / f"{pid}.safetensors"
        return bool(entry) and path.is_file() and sha256_file(path) == entry["sha256"]

    def put(self, feats: ParticipantFeatures) -> dict:
        tensors = {k: v.contiguous().float() for k, v in (("audio", feats.audio), ("visual", feats.visual)) if v is not None}
        if not tensors:  # safetensors needs one tensor: an empty marker keeps 'no audio/visual' explicit
            tensors = {"_empty": torch.zeros(0)}
        meta = {"participant": feats.participant, "audio_source": feats.audio_source or "",
                "visual_source": feats.visual_source or "", "audio_names": json.dumps(feats.audio_names),
                "visual_names": json.dumps(feats.visual_names)}
        path = self.dir / f"{feats.participant}.safetensors"
        atomic_write_bytes(path, save(tensors, metadata=meta))
        entry = {
            "file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "audio": _describe(feats.audio, feats.audio_source), "visual": _describe(feats.visual, feats.visual_source),
            "notes": feats.notes,
        }
        self.manifest["participants"][feats.participant] = entry
        self._write_manifest()
        return entry

    def get(self, pid: str) -> ParticipantFeatures:
        entry = self.manifest["participants"].get(pid)
        if entry is None:
            raise InputError(f"participant {pid} has no features; run 'mllmdr-site extract'", self.manifest_path)
        path = self.dir / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise InputError("feature file is missing or does not match its manifest hash; run extract again", path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        t = load_file(str(path))
        return ParticipantFeatures(pid, t.get("audio"), t.get("visual"), meta.get("audio_source") or None,
                                   meta.get("visual_source") or None, json.loads(meta.get("audio_names", "[]")),
                                   json.loads(meta.get("visual_names", "[]")), entry.get("notes", []))

    def dims(self) -> dict[str, int | None]:
        """Feature widths across the store (None when no participant has that modality)."""
        out: dict[str, int | None] = {"audio": None, "visual": None}
        for entry in self.manifest["participants"].values():
            for m in out:
                if entry[m]["present"] and out[m] is None:
                    out[m] = entry[m]["dim"]
        return out

    def _write_manifest(self) -> None:
        atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True))


def _describe(x: torch.Tensor | None, source: str | None) -> dict:
    if x is None:
        return {"present": False, "frames": 0, "dim": None, "source": None}
    return {"present": True, "frames": int(x.shape[0]), "dim": int(x.shape[1]), "source": source,
            "finite": bool(np.isfinite(x.numpy()).all())}
