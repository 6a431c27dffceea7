"""The site's feature store: one safetensors file per participant plus a manifest.

Files are written atomically and hashed; the manifest is rewritten atomically after
each participant, so an interrupted extraction leaves a readable store and the next
run resumes where it stopped. Each entry records the source files it was made from
(path relative to the corpus, size, mtime, SHA-256): a participant is current only while
its sources are unchanged. Features never leave the site.
"""

from __future__ import annotations

import hashlib
import json
import os
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


# What stored features were made by; a store made by an older extractor is refused by ``examples``
# (train and score) until ``extract`` runs again. 2: columns selected by the corpus's schema, sources
# recorded; 3 (session 40): DAIC's CLNF files of a segment joined on frame number, never by row (a row
# one file dropped shifted every later frame of it against the others'); 4 (session 42): DAIC's CLNF gaze
# and pose columns read under OpenFace 2's names (x_0 -> gaze_0_x, Tx -> pose_Tx; the egemaps-openface
# recipe found none of them in real DAIC files and stored every participant without visual features).
# 5 (session 45): the frame cap (``max_frames``) is kept (a pooling window of ceil(T / cap) frames, where
# round() let up to 1.5 x the cap through), and OpenFace frames without a tracked face (success = 0) are
# missing values in place, no longer dropped (which squeezed the time axis).
FEATURE_VERSION = 5
CHANGED_IN = {3: "DAIC's CLNF files are now joined on frame number",
              4: "DAIC's CLNF gaze and pose columns are now read under OpenFace 2's names",
              5: "the frame cap is kept for long interviews, and OpenFace frames without a tracked face keep "
                 "their place in time"}
# version -> which recorded source files the change to the next version touched: a store none of whose
# sources it names holds exactly what the new extractor would make, and is upgraded in place
TOUCHED_SINCE = {2: lambda source: "_CLNF_" in Path(source).name,
                 3: lambda source: Path(source).name.endswith(("_CLNF_gaze.txt", "_CLNF_pose.txt")),
                 4: lambda source: False}      # judged per entry: ENTRY_TOUCHED_SINCE


def _touched_by_5(entry: dict, fingerprint: dict, root: Path | None) -> bool:
    """Version 4 -> 5 changed a participant's features when one of its modalities was stored over the frame cap
    (round() let it through), or when one of its OpenFace files has a frame with success = 0 (read from the
    corpus when ``root`` is known; without it, e.g. ``dataset.examples`` before extract runs, not judged)."""
    cap = fingerprint.get("max_frames") or 4096
    if any((entry.get(m) or {}).get("frames", 0) > cap for m in ("audio", "visual")):
        return True
    if root is None or (entry.get("visual") or {}).get("source") != "openface":
        return False
    return any(_face_lost(Path(root) / rel) for rel in (entry.get("sources") or {})
               if "OpenFace" in Path(rel).name or "_CLNF_" in Path(rel).name or Path(rel).suffix == ".csv")


def _face_lost(path: Path) -> bool:
    """Whether an OpenFace table has a row with success = 0 (True when it cannot be read: extract it again)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            header = [c.strip() for c in fh.readline().split(",")]
            if "success" not in header:
                return False
            i = header.index("success")
            for line in fh:
                cells = line.split(",")
                if len(cells) > i and cells[i].strip() in ("0", "0.0"):
                    return True
    except OSError:
        return True
    return False


# version -> whether the change to the next version touched this stored entry (entry, old fingerprint, corpus root)
ENTRY_TOUCHED_SINCE = {4: _touched_by_5}


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
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("participants"), dict):
            raise InputError("feature manifest is not valid JSON with a 'participants' table; "
                             "move it away and run extract again", self.manifest_path)
        return data

    @property
    def participants(self) -> list[str]:
        return sorted(self.manifest["participants"])

    def set_fingerprint(self, fingerprint: dict, root: Path | None = None) -> list[str]:
        """Extraction settings; a change invalidates every stored participant, except a version change
        that touched none of this store's sources (``TOUCHED_SINCE``: the version is raised in place).
        ``root``: the corpus, read to judge a version change where the names of the sources cannot tell.
        Returns the participants whose entries were dropped; their files are no longer listed, and
        ``extract_corpus`` deletes them (``unlisted_files``; session 45: they stayed on disk, a withdrawn
        participant's among them)."""
        if self.manifest.get("fingerprint") == fingerprint:
            return []
        old = self.manifest.get("fingerprint") or {}
        dropped: list[str] = []
        if {k: v for k, v in old.items() if k != "version"} == {k: v for k, v in fingerprint.items() if k != "version"} \
                and self._untouched_since(old.get("version"), root):
            self.manifest["fingerprint"] = fingerprint
        else:
            dropped = sorted(self.manifest["participants"])
            self.manifest = {"version": 1, "fingerprint": fingerprint, "participants": {}}
        self._write_manifest()
        return dropped

    def unlisted_files(self) -> list[Path]:
        """Feature files in the store folder that the manifest does not list (left by a crash or an older kit)."""
        listed = {e.get("file") for e in self.manifest["participants"].values()}
        return sorted(f for f in self.dir.glob("*.safetensors") if f.name not in listed)

    def _untouched_since(self, version, root: Path | None = None) -> bool:
        """Whether every change from ``version`` to ``FEATURE_VERSION`` left this store's features as they are."""
        if not isinstance(version, int) or not all(v in TOUCHED_SINCE for v in range(version, FEATURE_VERSION)):
            return False
        sources = [src for entry in self.manifest["participants"].values() for src in (entry.get("sources") or {})]
        if any(TOUCHED_SINCE[v](src) for v in range(version, FEATURE_VERSION) for src in sources):
            return False
        old = self.manifest.get("fingerprint") or {}
        return not any(ENTRY_TOUCHED_SINCE[v](entry, old, root) for v in range(version, FEATURE_VERSION)
                       if v in ENTRY_TOUCHED_SINCE for entry in self.manifest["participants"].values())

    def other_version(self) -> int | None:
        """The extractor version of stored features when it is not this kit's (``FEATURE_VERSION``), else None."""
        version = (self.manifest.get("fingerprint") or {}).get("version")
        if not self.manifest["participants"] or version == FEATURE_VERSION:
            return None
        if isinstance(version, int) and version < FEATURE_VERSION and self._untouched_since(version):
            return None          # the change since touched none of its sources (e.g. no DAIC CLNF file)
        return version if isinstance(version, int) else 0

    def is_current(self, pid: str, sources: dict[str, dict] | None = None, verdict: dict | None = None) -> bool:
        """Stored, intact, and (when ``sources`` is given) made from the same source files; when ``verdict`` is
        given (the media check's for this participant: which files it left out, the reference columns), made
        under the same verdict (session 45: a changed verdict with the same bytes left stale features). An entry
        from before session 45 has no verdict recorded: taken as made under this one (``refresh_sources``
        records it)."""
        entry = self.manifest["participants"].get(pid)
        path = self.dir / f"{pid}.safetensors"
        if not entry or not path.is_file() or sha256_file(path) != entry["sha256"]:
            return False
        if verdict is not None and entry.get("check", verdict) != verdict:
            return False
        return sources is None or _hashes(entry.get("sources")) == _hashes(sources)

    def remove(self, pid: str) -> None:
        """Drop a participant that is no longer in the corpus."""
        entry = self.manifest["participants"].pop(pid, None)
        if entry is not None:
            (self.dir / entry["file"]).unlink(missing_ok=True)
            self._write_manifest()

    def put(self, feats: ParticipantFeatures, sources: dict[str, dict] | None = None, verdict: dict | None = None) -> dict:
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
            "audio": _describe(feats.audio, feats.audio_source, feats.audio_names),
            "visual": _describe(feats.visual, feats.visual_source, feats.visual_names),
            "notes": feats.notes, "sources": sources or {},
        }
        if verdict is not None:
            entry["check"] = verdict
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

    def refresh_sources(self, pid: str, sources: dict[str, dict], verdict: dict | None = None) -> None:
        """Keep the size/mtime of source files whose bytes did not change (``is_current``), so training's
        ``changed_sources`` does not hash them again each time (and the media check's verdict, when none was
        recorded)."""
        entry = self.manifest["participants"].get(pid)
        if entry is None:
            return
        changed = entry.get("sources") != sources
        entry["sources"] = sources
        if verdict is not None and entry.get("check") != verdict:
            entry["check"], changed = verdict, True
        if changed:
            self._write_manifest()

    def changed_sources(self, pid: str, corpus_root: Path) -> list[str]:
        """The source files (relative to the corpus root) ``pid``'s stored features were made from that are
        gone or hold other bytes now: a file is hashed again only when its size or mtime moved."""
        changed = []
        for rel, was in (self.manifest["participants"].get(pid, {}).get("sources") or {}).items():
            path = Path(corpus_root) / rel
            try:
                st = path.stat()
            except OSError:
                changed.append(rel)
                continue
            if (st.st_size, st.st_mtime_ns) != (was.get("size"), was.get("mtime_ns")) and \
                    sha256_file(path) != was.get("sha256"):
                changed.append(rel)
        return changed

    def new_sources(self, pid: str, corpus_root: Path, paths: list[Path]) -> list[str]:
        """Of ``paths`` (what an extraction would read for ``pid`` now), those its stored features were not
        made from: a wav or video copied in after extraction, unseen by the model until extract runs."""
        known = self.manifest["participants"].get(pid, {}).get("sources") or {}
        rel = [os.path.relpath(os.path.abspath(p), os.path.abspath(corpus_root)) for p in paths]
        return [r for r in rel if r not in known]

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


    def feature_columns(self) -> dict[str, list[str]]:
        """Per modality, the column-name hashes of every stored participant: what adapters trained on this
        store record (``trained_on``), so features extracted again with the same widths but other columns
        (another order, a renamed source) are refused, never read permuted (a second read, session 42)."""
        every = set(self.manifest["participants"])
        return {m: sorted(self.column_sets(m, every)) for m in ("audio", "visual")}

    def column_sets(self, modality: str, among: set[str]) -> set[str]:
        """The column-name hashes these stored participants have for a modality."""
        return {e[modality]["columns"] for pid, e in self.manifest["participants"].items()
                if pid in among and e[modality]["present"] and "columns" in e[modality]}


def columns_hash(names: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()[:16]


def source_files(p, audio_source: str) -> list[Path]:
    """Every file an extraction with this audio source reads for participant ``p`` (a corpus Participant):
    what the manifest records, and what ``dataset.examples`` compares with the corpus as it is now."""
    audio = p.media.audio_features if audio_source == "corpus" else p.media.wav
    visual = [f for seg in p.media.openface for f in seg] or p.media.resnet or p.media.video
    return [*audio, *visual]


def describe_sources(root: Path, paths: list[Path], known: dict | None = None) -> dict[str, dict]:
    """Size, mtime and SHA-256 of each source file, keyed by its path relative to the corpus root.

    The hash is taken again only when size or mtime changed since ``known`` (the stored entry).
    """
    out = {}
    for path in paths:
        st = path.stat()
        # as the corpus names it, links not followed: a session folder linked to a NAS share stays inside
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        old = (known or {}).get(rel) or {}
        same = old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": old["sha256"] if same else sha256_file(path)}
    return out


def _hashes(sources: dict | None) -> dict[str, str] | None:
    return None if sources is None else {k: v["sha256"] for k, v in sources.items()}


def _describe(x: torch.Tensor | None, source: str | None, names: list[str]) -> dict:
    if x is None:
        return {"present": False, "frames": 0, "dim": None, "source": None}
    return {"present": True, "frames": int(x.shape[0]), "dim": int(x.shape[1]), "source": source,
            "finite": bool(np.isfinite(x.numpy()).all()), "columns": columns_hash(names)}
