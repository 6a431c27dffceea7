"""Corpus -> feature store, one participant at a time, resumable.

Strict (the default): a media problem (unreadable or empty file, a feature table without one of
the corpus's columns) stops extraction with that file named; participants done so far are kept.
Not strict: that modality is recorded missing for the participant (the reason is in the
manifest's notes) and extraction carries on. A feature-table row that cannot be read (malformed, or
the file cut mid-row) is such a problem too; not strict, the row is dropped and noted. A participant
is re-extracted when one of its source files changed (size/mtime, then SHA-256), and dropped from
the store when it left the corpus.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mllm_dr.corpus.model import Corpus, Participant
from mllm_dr.corpus.tables import DroppedRow, Problem
from mllm_dr.errors import InputError
from mllm_dr.features.audio import (HubertExtractor, OpenSmileExtractor, check_hubert_folder, load_wav, pool,
                                    read_corpus_audio_features)
from mllm_dr.features.recipe import get_recipe
from mllm_dr.features.schema import MediaCheck, checked_corpus
from mllm_dr.features.store import (FEATURE_VERSION, FeatureStore, ParticipantFeatures, columns_hash, describe_sources,
                                    source_files)
from mllm_dr.features.visual import OpenCvFaceExtractor, openface_header, read_openface, read_resnet_mat
from mllm_dr import progress as prog
from mllm_dr.progress import Progress
from mllm_dr.workspace import ExtractionSettings


class RecipeGap(InputError):
    """This participant's files cannot give a modality as the recipe defines it: that modality is
    recorded missing (zero padding, as for any missing modality), even in strict mode; when no participant
    can give it, the report also warns once for the site (``site_recipe_gap``)."""


@dataclass
class ExtractReport:
    extracted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # about the whole site (every participant)
    wav_seconds: float = 0.0        # audio duration run through the acoustic extractor
    extractor_seconds: float = 0.0  # wall time spent in it
    seconds: float = 0.0

    @property
    def real_time_factor(self) -> float | None:
        return self.extractor_seconds / self.wav_seconds if self.wav_seconds else None


def choose_audio_source(corpus: Corpus, settings: ExtractionSettings) -> str:
    """One acoustic source for the whole corpus, so every participant has the same width."""
    recipe = get_recipe(settings.recipe)
    if recipe.audio_source:
        return recipe.audio_source
    if settings.audio_source != "auto":
        return settings.audio_source
    if settings.hubert_path:
        return "hubert"
    with_audio = [p for p in corpus.participants if p.media.wav or p.media.audio_features]
    if with_audio and all(p.media.audio_features for p in with_audio):
        return "corpus"
    return "opensmile"


class Extractor:
    def __init__(self, settings: ExtractionSettings, audio_source: str, columns: dict[str, list[str]] | None = None,
                 acoustic=None):
        self.s = settings
        self.audio_source = audio_source
        self.columns = columns or {}      # the corpus's schema per feature table kind (features.schema)
        self.recipe = get_recipe(settings.recipe)
        self._acoustic = acoustic if audio_source == "hubert" else None     # one already loaded (extract_workspace)
        self._face = None

    def source_files(self, p: Participant) -> list[Path]:
        """Every file this extractor reads for the participant (recorded in the manifest)."""
        return source_files(p, self.audio_source)

    def fingerprint(self) -> dict:
        return {"version": FEATURE_VERSION, "recipe": self.recipe.name, "audio_source": self.audio_source, "audio_hz": self.s.audio_hz,
                "visual_hz": self.s.visual_hz, "max_frames": self.s.max_frames, "hubert": self.s.hubert_path}

    @property
    def acoustic(self):
        if self._acoustic is None:
            self._acoustic = HubertExtractor(Path(self.s.hubert_path)) if self.audio_source == "hubert" else OpenSmileExtractor()
        return self._acoustic

    def audio(self, p: Participant, notes: list[Problem], report: ExtractReport):
        segments, files, names, source = [], [], [], None
        raw = _Read()
        if self.audio_source == "corpus":
            for path in p.media.audio_features:
                data, names, hz = read_corpus_audio_features(path, notes, self.columns.get("audio_features"))
                ref = self.columns.get("audio_pickle")
                if path.suffix == ".pkl" and ref is not None and len(names) != len(ref):
                    # compared with most of the corpus's pickles (features.schema), never with whichever
                    # participant came first (session 45: one odd first file took everyone's audio away)
                    raise InputError(f"{len(names)} feature columns per frame, where most of the corpus's feature "
                                     f"pickles have {len(ref)}", path)
                segments.append(pool(raw.count(data), hz, self.s.audio_hz))
                files.append(path)
            source = "corpus:" + (p.media.audio_features[0].name.split("_", 1)[-1] if p.media.audio_features else "")
        else:
            for path in p.media.wav:
                signal = load_wav(path, notes)
                t0 = time.perf_counter()
                data = self.acoustic(signal)
                report.extractor_seconds += time.perf_counter() - t0
                report.wav_seconds += signal.size / 16000
                segments.append(pool(raw.count(data), self.acoustic.native_hz, self.s.audio_hz))
                files.append(path)
                names = self.acoustic.columns
            source = self.acoustic.name if segments else None
        return self._finish(segments, notes, p, "audio", files, raw), names, source

    def visual(self, p: Participant, notes: list[Problem]):
        segments, files, names, source = [], [], [], None
        raw = _Read()
        wanted = self.recipe.visual_columns
        if wanted and not p.media.openface:
            raise RecipeGap(f"recipe {self.recipe.name!r} needs OpenFace/CLNF columns; this participant has "
                            f"{'ResNet features' if p.media.resnet else 'video' if p.media.video else 'no visual data'}",
                            p.folder)
        if p.media.openface:
            for segment in p.media.openface:
                try:
                    data, names, fps = read_openface(segment, notes,
                                                     list(wanted) if wanted else self.columns.get("openface"))
                except InputError as err:
                    if wanted and "absent" in err.message:
                        raise RecipeGap(f"recipe {self.recipe.name!r}: {err.message}", err.path) from None
                    raise
                tracked = data[~np.isnan(data).all(axis=1)] if data.size else data
                raw.count(tracked)              # frames without a face are missing by design, not counted as bad
                segments.append(pool(data, fps, self.s.visual_hz))
                files.append(segment[0])
            source = "openface"
        elif p.media.resnet:
            for path in p.media.resnet:
                data, names = read_resnet_mat(path)
                segments.append(raw.count(data))
                files.append(path)
            source = "resnet"
        elif p.media.video:
            if self._face is None:
                self._face = OpenCvFaceExtractor()
            for path in p.media.video:
                segments.append(raw.count(self._face(path, self.s.visual_hz)))
                files.append(path)
                if short := getattr(self._face, "last_short", None):   # frames lost: strict extraction stops
                    notes.append(DroppedRow(str(path), short))
            names, source = list(OpenCvFaceExtractor.columns), OpenCvFaceExtractor.name
        return self._finish(segments, notes, p, "visual", files, raw), names, source

    def _finish(self, segments: list[np.ndarray], notes: list[Problem], p: Participant, modality: str,
                files: list[Path] = (), raw: _Read | None = None) -> torch.Tensor | None:
        """The participant's segments ([T, D] each, read from ``files``) as one [T, D] tensor; segments of two
        widths (CMDC .pkl files of one subject, say) are an error naming the odd file, never a crash.
        ``raw``: the values as read, before pooling, where the non-finite ones are counted (session 44: counted
        after pooling, a NaN inside a window was not counted at all); None: count ``segments``."""
        for path, s in zip(files, segments):
            if s.shape[1] != segments[0].shape[1]:
                raise InputError(f"{s.shape[1]} feature columns per frame, where {Path(files[0]).name} of the same "
                                 f"participant has {segments[0].shape[1]}", path)
        segments = [s for s in segments if s.size]
        if not segments:
            return None
        x = np.concatenate(segments, axis=0)
        if raw is None:
            raw = _Read()
            raw.count(x)
        if raw.bad:   # pooled as missing, stored as 0 (the model cannot take NaN), and said: never silent
            notes.append(Problem(str(p.folder), f"{modality}: {raw.bad} of {raw.size} feature values are not finite "
                                                f"(NaN or infinite in the source) and are stored as 0"))
        if x.shape[0] > self.s.max_frames:
            # windows of ceil(T / cap) frames: at most the cap (session 45: round() let up to 1.5 x through)
            x = pool(x, float(-(-x.shape[0] // self.s.max_frames)), 1.0)      # a NaN counts as missing (nanmean)
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


class _Read:
    """How many feature values were read for one modality, and how many of them are not finite."""

    def __init__(self):
        self.bad = self.size = 0

    def count(self, data: np.ndarray) -> np.ndarray:
        """Count ``data`` (as read, before pooling) and hand it back."""
        self.bad += int(data.size - np.isfinite(data).sum())
        self.size += int(data.size)
        return data


def extract_corpus(corpus: Corpus, store: FeatureStore, settings: ExtractionSettings,
                   progress: Progress = None, check: MediaCheck | None = None, strict: bool = False,
                   acoustic=None) -> ExtractReport:
    """Extract every participant whose stored features are missing or were made from other files.
    ``acoustic``: the acoustic extractor when the caller built it already (``extract_workspace`` loads
    --hubert before it writes anything)."""
    report = ExtractReport()
    wanted = get_recipe(settings.recipe).visual_columns
    if wanted and (gap := site_recipe_gap(corpus, wanted)):
        # the site joins with visual missing (zero padding, as the paper does for a missing modality: issue 12
        # section 2), said once for the site, not only per participant: until session 42 real DAIC CLNF
        # headers (x_0, Tx) dropped every participant's visual features this way unnoticed
        report.warnings.append(f"recipe {settings.recipe!r}: {gap}; this site's visual modality is missing for "
                               "every participant (zero padding). Check the site's OpenFace/CLNF files")
    prog.start(progress, "extracting features", len(corpus.participants))
    t0 = time.perf_counter()
    extractor = Extractor(settings, choose_audio_source(corpus, settings), check.columns if check else None, acoustic)
    shipped = [p.id for p in corpus.participants if p.media.audio_features]
    lacking = [p.id for p in corpus.participants if p.media.wav and not p.media.audio_features]
    chosen = get_recipe(settings.recipe).audio_source or settings.audio_source != "auto" or settings.hubert_path
    if extractor.audio_source == "opensmile" and not chosen and shipped and lacking:   # one source for all: said
        report.problems.append(Problem(str(corpus.root), f"audio from openSMILE on the wav for every participant: "
                                       f"{len(lacking)} participant(s) with audio have no usable shipped feature "
                                       f"table (participant {lacking[0]}, ...), so the {len(shipped)} shipped "
                                       f"table(s) are not used"))
    if extractor.audio_source in ("hubert", "opensmile") and any(p.media.wav for p in corpus.participants):
        extractor.acoustic  # load now: an extractor that cannot be built is an error, not silently no audio
    present = {p.id for p in corpus.participants}
    # a reset (other settings, a version that changed them) deletes every stored file: those of participants
    # no longer in the corpus (a withdrawn consent) are reported removed
    report.removed += [pid for pid in store.set_fingerprint(extractor.fingerprint(), corpus.root) if pid not in present]
    for f in store.unlisted_files():     # the reset's files, and any no manifest lists: deleted before extracting
        f.unlink(missing_ok=True)
        if f.stem not in present and f.stem not in report.removed:
            report.removed.append(f.stem)
    fresh: set[str] = set()       # participants whose stored features match this corpus as it is now
    for p in corpus.participants:
        known = store.manifest["participants"].get(p.id, {}).get("sources")
        # the files the media check left out (--no-strict) are recorded too: known, so not taken later for a
        # recording that came since extraction (dataset.examples), and a replaced one shows as changed. Every
        # one (MediaCheck.left_out, session 44), not only those a problem names alone
        left_out = [f for f in (check.left_out.get(p.id, []) if check else []) if f.is_file()]
        sources = describe_sources(corpus.root, extractor.source_files(p) + left_out, known)
        verdict = _verdict(corpus.root, p, extractor, check) if check else None
        if store.is_current(p.id, sources, verdict):
            store.refresh_sources(p.id, sources, verdict)     # same bytes, touched (a copy, a backup): new size/mtime kept
            fresh.add(p.id)
            report.skipped.append(p.id)
            prog.advance(progress)
            continue
        notes: list[Problem] = []
        feats = ParticipantFeatures(p.id, None, None)
        for modality, fn in (("audio", lambda: extractor.audio(p, notes, report)), ("visual", lambda: extractor.visual(p, notes))):
            try:
                before = len(notes)
                x, names, source = fn()
                dropped = next((n for n in notes[before:] if isinstance(n, DroppedRow)), None)
                if strict and dropped:          # a row left out of a feature table: a media problem
                    raise InputError(f"a row cannot be read: {dropped.message}", dropped.path)
                if x is not None and _differs(store, modality, fresh, names):
                    raise InputError(f"its {len(names)} columns differ from the other participants' in the feature "
                                     "store", p.folder)
            except InputError as err:
                if strict and not isinstance(err, RecipeGap):
                    raise InputError(f"{modality} of participant {p.id}: {err.message}; extraction stopped (strict; "
                                     "participants done so far are kept). Fix the file, or pass --no-strict to "
                                     "extract with this modality missing", err.path or p.folder) from None
                notes.append(Problem(err.path or str(p.folder), f"{modality} missing: {err.message}"))
                continue
            setattr(feats, modality, x)
            setattr(feats, f"{modality}_names", list(names))
            setattr(feats, f"{modality}_source", source if x is not None else None)
        checked = check.by_participant.get(p.id, []) if check else []      # already in the corpus's problems
        feats.notes = [f"{n.path}: {n.message}" for n in checked + notes]
        store.put(feats, sources, verdict)
        fresh.add(p.id)
        report.problems.extend(notes)
        report.extracted.append(p.id)
        prog.advance(progress)
    for pid in sorted(set(store.participants) - {p.id for p in corpus.participants}):
        store.remove(pid)
        report.removed.append(pid)
    for f in store.unlisted_files():     # no manifest entry (an older kit's reset, a crash): consent withdrawn too
        f.unlink(missing_ok=True)
        if f.stem not in report.removed:
            report.removed.append(f.stem)
    report.seconds = time.perf_counter() - t0
    return report


def site_recipe_gap(corpus: Corpus, wanted: tuple[str, ...]) -> str | None:
    """Why no participant with visual data can give the recipe's visual columns (from the files' headers),
    or None when one can (or none has visual data)."""
    lacking: dict[str, list[str]] = {}
    for p in corpus.participants:
        if not p.modalities()["visual"]:
            continue
        have = [set(_columns(files)) for files in p.media.openface]
        missing = [c for c in wanted if not have or any(c not in h for h in have)]
        if not missing:
            return None
        lacking[p.id] = missing
    if not lacking:
        return None
    union = [c for c in wanted if any(c in m for m in lacking.values())]
    shown = ", ".join(union[:5]) + (f" and {len(union) - 5} more" if len(union) > 5 else "")
    return f"none of the {len(lacking)} participant(s) with visual data has every column it needs (lacking: {shown})"


def _columns(files: list[Path]) -> list[str]:
    cols = []
    for path in files:
        try:
            cols += openface_header(path)
        except (InputError, OSError):
            pass                        # unreadable: lacks the columns (the media check names the file)
    return cols


def _verdict(root: Path, p: Participant, extractor: Extractor, check: MediaCheck) -> dict:
    """What the media check decided for this participant: the files it left out, and the hash of the reference
    column set of each kind of table the extraction reads for it. Stored with the entry: a changed verdict
    (another reference after participants came or left) is a change even when no file's bytes are (session 45)."""
    import os

    kinds = []
    if p.media.openface:
        kinds.append("openface")
    if extractor.audio_source == "corpus" and p.media.audio_features:
        kinds += ["audio_features", "audio_pickle"]
    left = sorted(os.path.relpath(os.path.abspath(f), os.path.abspath(root)) for f in check.left_out.get(p.id, []))
    return {"left_out": left, "columns": {k: columns_hash(check.columns[k]) for k in kinds if k in check.columns}}


def _differs(store: FeatureStore, modality: str, fresh: set[str], names: list[str]) -> bool:
    """Backstop after the schema check: one column list per modality across the current participants."""
    others = store.column_sets(modality, fresh)
    return len(others) == 1 and columns_hash(names) not in others


def extract_workspace(ws, corpus_path: Path, fmt: str = "auto", hubert: Path | None = None,
                      progress: Progress = None, replace_corpus: bool = False, strict: bool = True,
                      recipe: str | None = None) -> dict:
    """``mllmdr-site extract``: check the corpus, (re)point the workspace at it, extract, audit.

    Holds the workspace lock throughout; refuses another corpus unless ``replace_corpus``.
    ``recipe``: the feature recipe; None keeps the workspace's, or takes the enrolled federation's.
    """
    from mllm_dr import audit

    if recipe:
        get_recipe(recipe)                # an unknown name fails before anything is read or written
    with ws.lock("extract"):
        corpus, check = checked_corpus(corpus_path, fmt)
        old = ws.corpus_change(corpus_path, replace_corpus)
        chosen = get_recipe(recipe or federation_recipe(ws) or ws.config.extraction.recipe)
        acoustic = _checked_hubert(hubert, chosen, corpus)       # before anything is written (session 44)
        if strict and check.problems:
            first = check.problems[0]
            raise InputError(f"{len(check.problems)} media problem(s), first: {first.path}: {first.message}. "
                             f"'mllmdr-site data check {corpus_path}' lists them; fix them, or pass --no-strict to "
                             "extract with those modalities missing", corpus_path)
        store = FeatureStore(ws.features_dir)
        if old:
            _replace_corpus(ws, store, old, str(Path(corpus_path).resolve()))
        ws.config.corpus_path, ws.config.corpus_format = str(Path(corpus_path).resolve()), corpus.format
        if hubert:
            ws.config.extraction.hubert_path = str(Path(hubert).resolve())
            ws.config.extraction.audio_source = "hubert"
        ws.config.extraction.recipe = chosen.name
        ws.save()
        report = extract_corpus(corpus, store, ws.config.extraction, progress, check, strict, acoustic)
        audit.append(ws.audit_path, "extract", corpus_format=corpus.format, extracted=len(report.extracted),
                     skipped=len(report.skipped), removed=len(report.removed), problems=len(report.problems))
    sizes = [e["bytes"] for e in store.manifest["participants"].values()]
    return {"extracted": report.extracted, "skipped": report.skipped, "removed": report.removed, "dims": store.dims(),
            "recipe": ws.config.extraction.recipe,
            "seconds": round(report.seconds, 2), "real_time_factor": report.real_time_factor,
            "bytes_per_participant": sum(sizes) / len(sizes) if sizes else 0.0,
            "problems": [p.to_dict() for p in corpus.problems + report.problems], "warnings": report.warnings}


def _checked_hubert(hubert: Path | None, recipe, corpus: Corpus) -> HubertExtractor | None:
    """Check --hubert before ``extract_workspace`` writes anything (workspace.json, the store, rationales, the
    audit): a recipe that fixes the audio features conflicts with it; the folder must be a HuBERT checkpoint.
    Loaded here when the corpus has a wav to run it on (handed to ``extract_corpus``, loaded once). Session
    44: these were checked after the workspace was saved and a replaced corpus's store emptied."""
    if not hubert:
        return None
    if recipe.audio_source:
        raise InputError(f"--hubert conflicts with the feature recipe {recipe.name!r}, which fixes the audio "
                         "features; extract with --recipe site to use HuBERT", hubert)
    if not Path(hubert).is_dir():
        raise InputError("does not exist" if not Path(hubert).exists() else
                         "is not a folder (--hubert wants a local HuBERT checkpoint folder)", hubert)
    check_hubert_folder(Path(hubert))
    if any(p.media.wav for p in corpus.participants):
        return HubertExtractor(Path(hubert))
    return None


def federation_recipe(ws) -> str | None:
    """The recipe of the federation this site is enrolled in (from its bundle), if any."""
    from mllm_dr.enrollment import FEDERATION_FILE, federation_settings

    if not (ws.root / FEDERATION_FILE).is_file():
        return None
    return federation_settings(ws).feature_recipe or None


def store_recipe(store: FeatureStore):
    """The recipe the stored features were extracted with."""
    return get_recipe((store.manifest.get("fingerprint") or {}).get("recipe"))


def _replace_corpus(ws, store: FeatureStore, old: str, new: str) -> None:
    """--replace-corpus: empty the store, set the rationales aside, mark trained adapters stale; audited."""
    import shutil
    from datetime import datetime, timezone

    from mllm_dr import audit

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for pid in store.participants:
        store.remove(pid)
    aside = ws.rationales_dir / f"replaced-corpus-{stamp}"
    moved = [f for f in (ws.rationales_path, ws.rejects_path) if f.is_file()]
    for f in moved:
        aside.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), aside / f.name)
    stale = ws.mark_adapters_stale(f"trained on the corpus {old}, which this workspace replaced on {stamp}; "
                                   "train again")
    audit.append(ws.audit_path, "replace-corpus", old=old, new=new, stale_adapters=stale,
                 rationales_set_aside=str(aside) if moved else None)
