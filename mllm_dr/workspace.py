"""A site workspace: config, feature store, rationales, checkpoints, audit log.

Everything a site derives from its interviews stays under this folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from mllm_dr.atomic import atomic_write_text
from mllm_dr.errors import InputError, WorkspaceBusyError, read_model
from mllm_dr.protocol import SiteName

CONFIG_NAME = "workspace.json"
ENV_VAR = "MLLMDR_WORKSPACE"
LOCK_NAME = "workspace.lock"
STALE_NAME = "STALE.json"   # inside an adapter folder: trained on a corpus this workspace no longer uses


class ExtractionSettings(BaseModel):
    audio_hz: float = Field(10.0, gt=0, description="audio frames per second kept after pooling")
    visual_hz: float = Field(5.0, gt=0, description="visual frames per second kept after pooling")
    max_frames: int = Field(4096, gt=0, description="longer sequences are pooled further")
    audio_source: str = Field("auto", pattern="^(auto|corpus|opensmile|hubert)$")
    hubert_path: str | None = None
    recipe: str = Field("site", description="feature recipe (mllm_dr/features/recipe.py); a federation's own "
                        "comes with its enrollment bundle")


class WorkspaceConfig(BaseModel):
    site_id: SiteName
    created: str
    corpus_path: str | None = None
    corpus_format: str | None = None
    extraction: ExtractionSettings = ExtractionSettings()
    max_context_tokens: int = Field(384, gt=32, description="dialogue tokens per aspect instance before reduction")


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        path = self.root / CONFIG_NAME
        if not self.root.exists():
            raise InputError("does not exist; run 'mllmdr-site init --workspace PATH' first", self.root)
        if not path.is_file():
            raise InputError("not a site workspace (no workspace.json); run 'mllmdr-site init' first", self.root)
        self.config = read_model(path, WorkspaceConfig, "workspace config")

    # folders -------------------------------------------------------------
    features_dir = property(lambda self: self.root / "features")
    rationales_dir = property(lambda self: self.root / "rationales")
    rationales_path = property(lambda self: self.rationales_dir / "rationales.jsonl")
    rejects_path = property(lambda self: self.rationales_dir / "rejects.jsonl")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    audit_path = property(lambda self: self.root / "audit" / "audit.jsonl")
    question_map_path = property(lambda self: self.root / "cmdc_question_map.json")
    # turn embeddings of the quote selector (mllm_dr/evidence.py): derived from patient text, stays here
    embeddings_cache_path = property(lambda self: self.root / "cache" / "turn-embeddings.safetensors")

    def save(self) -> None:
        atomic_write_text(self.root / CONFIG_NAME, self.config.model_dump_json(indent=1))

    @contextmanager
    def lock(self, command: str):
        """One writing command at a time: an exclusive fcntl lock on ``workspace.lock``.

        The kernel drops it when the process ends, so a crash never leaves the workspace locked.
        """
        fh = open(self.root / LOCK_NAME, "a+", encoding="utf-8")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                raise WorkspaceBusyError(f"in use by {_holder(fh.read())}; wait for it to finish (or stop it) "
                                         "and run this command again", self.root) from None
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"command": command, "pid": os.getpid(),
                                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
            fh.flush()
            yield
        finally:
            fh.close()

    def corpus_change(self, corpus_path: Path, replace: bool) -> str | None:
        """The one rule for repointing: a workspace keeps its corpus unless told ``--replace-corpus``.

        Returns the old corpus path when it is being replaced, None when nothing changes.
        """
        new, old = str(Path(corpus_path).resolve()), self.config.corpus_path
        if old is None or old == new:
            return None
        if not replace:
            raise InputError(f"this workspace was extracted from {old}, not {new}; pass --replace-corpus to switch "
                             "(features are re-extracted, rationales set aside, trained adapters marked stale)",
                             self.root)
        return old

    def mark_adapters_stale(self, reason: str) -> list[str]:
        """Put a STALE.json marker in every adapter folder under checkpoints/ (a new save replaces the folder
        and so drops it). Returns the folders marked."""
        marked = []
        for folder in sorted(p for p in self.checkpoints_dir.glob("*/*") if p.is_dir()):
            atomic_write_text(folder / STALE_NAME, json.dumps({"reason": reason}))
            marked.append(str(folder.relative_to(self.root)))
        return marked

    @classmethod
    def init(cls, root: Path, site_id: str, max_context_tokens: int | None = None) -> "Workspace":
        root = Path(root)
        if (root / CONFIG_NAME).exists():
            raise InputError("a workspace already exists here", root)
        _refuse_foreign_folder(root)
        extra = {} if max_context_tokens is None else {"max_context_tokens": max_context_tokens}
        try:
            cfg = WorkspaceConfig(site_id=site_id, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  **extra)
        except ValidationError as err:
            first = err.errors()[0]
            if first["loc"] == ("max_context_tokens",):     # the bound is WorkspaceConfig's own (gt)
                raise InputError(f"--max-context-tokens {max_context_tokens}: must be above {first['ctx']['gt']}") \
                    from None
            raise InputError(f"site id {site_id!r} must be 1-64 letters, digits, '.', '_' or '-'") from None
        from mllm_dr.private import private_dir

        # only this account reads what a site derives: a folder made beforehand (by IT, 'mkdir -p', 0755)
        # was kept as it was (a review, session 44)
        private_dir(root)
        for sub in ("features", "rationales", "checkpoints", "audit", "keys", "reviews", "reports", "logs",
                    "federation"):
            private_dir(root / sub)
        shutil.copyfile(str(resources.files("mllm_dr.resources").joinpath("cmdc_question_map.json")),
                        root / "cmdc_question_map.json")
        atomic_write_text(root / CONFIG_NAME, cfg.model_dump_json(indent=1))
        from mllm_dr.audit import _signing_key

        _signing_key(root / "audit" / "audit.jsonl")    # the site's audit key, made once
        return cls(root)


# what an empty volume's root holds (mkfs makes it): a workspace may be made there
EMPTY_VOLUME = ("lost+found",)


def _refuse_foreign_folder(root: Path) -> None:
    """InputError unless ``root`` is new or empty: init into a folder holding anything else (the center's
    folder, a corpus) wrote its audit entry into the center's log and made a corpus folder 0700, and a later
    `data synth` removed the workspace with the synthetic site it was made in (a review, session 44)."""
    if not root.is_dir():
        return                  # new (made below); a file is named by the OS error of making it
    held = sorted(p.name for p in root.iterdir() if p.name not in EMPTY_VOLUME)
    if held:
        raise InputError(f"not empty (it holds {', '.join(map(repr, held[:3]))}{', ...' if len(held) > 3 else ''}) "
                         "and not a workspace; give --workspace a new or empty folder", root)


def resolve_workspace(path: str | Path | None) -> Workspace:
    """``--workspace`` wins; otherwise MLLMDR_WORKSPACE."""
    chosen = path or os.environ.get(ENV_VAR)
    if not chosen:
        raise InputError(f"no workspace: pass --workspace or set {ENV_VAR}")
    return Workspace(Path(chosen))


def stale_note(adapter_folder: Path) -> str | None:
    """Why the adapters in this folder should not be trusted any more, or None."""
    marker = Path(adapter_folder) / STALE_NAME
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())["reason"]
    except (ValueError, KeyError):
        return "marked stale (unreadable marker)"


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"'mllmdr-site {h['command']}' (pid {h['pid']}, since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "another command"


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):   # as audit's: not splitlines
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"line {n} is not JSON", path) from None
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Whole-file atomic rewrite: readers never see a half-written line."""
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
