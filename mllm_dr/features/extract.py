"""Corpus -> feature store, one participant at a time, resumable.

A failure in one modality of one participant is recorded (that modality is missing,
the reason is in the manifest's notes) and extraction carries on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mllm_dr.corpus.model import Corpus, Participant
from mllm_dr.corpus.tables import Problem
from mllm_dr.errors import InputError
from mllm_dr.features.audio import (HubertExtractor, OpenSmileExtractor, load_wav, pool,
                                    read_corpus_audio_features)
from mllm_dr.features.store import FeatureStore, ParticipantFeatures
from mllm_dr.features.visual import OpenCvFaceExtractor, read_openface, read_resnet_mat
from mllm_dr import progress as prog
from mllm_dr.progress import Progress
from mllm_dr.workspace import ExtractionSettings

FEATURE_VERSION = 1


@dataclass
class ExtractReport:
    extracted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    wav_seconds: float = 0.0        # audio duration run through the acoustic extractor
    extractor_seconds: float = 0.0  # wall time spent in it
    seconds: float = 0.0

    @property
    def real_time_factor(self) -> float | None:
        return self.extractor_seconds / self.wav_seconds if self.wav_seconds else None


def choose_audio_source(corpus: Corpus, settings: ExtractionSettings) -> str:
    """One acoustic source for the whole corpus, so every participant has the same width."""
    if settings.audio_source != "auto":
        return settings.audio_source
    if settings.hubert_path:
        return "hubert"
    with_audio = [p for p in corpus.participants if p.media.wav or p.media.audio_features]
    if with_audio and all(p.media.audio_features for p in with_audio):
        return "corpus"
    return "opensmile"


class Extractor:
    def __init__(self, settings: ExtractionSettings, audio_source: str):
        self.s = settings
        self.audio_source = audio_source
        self._acoustic = None
        self._face = None

    def fingerprint(self) -> dict:
        return {"version": FEATURE_VERSION, "audio_source": self.audio_source, "audio_hz": self.s.audio_hz,
                "visual_hz": self.s.visual_hz, "max_frames": self.s.max_frames, "hubert": self.s.hubert_path}

    @property
    def acoustic(self):
        if self._acoustic is None:
            self._acoustic = HubertExtractor(Path(self.s.hubert_path)) if self.audio_source == "hubert" else OpenSmileExtractor()
        return self._acoustic

    def audio(self, p: Participant, notes: list[Problem], report: ExtractReport):
        segments, names, source = [], [], None
        if self.audio_source == "corpus":
            for path in p.media.audio_features:
                data, names, hz = read_corpus_audio_features(path, notes)
                segments.append(pool(data, hz, self.s.audio_hz))
            source = "corpus:" + (p.media.audio_features[0].name.split("_", 1)[-1] if p.media.audio_features else "")
        else:
            for path in p.media.wav:
                signal = load_wav(path, notes)
                t0 = time.perf_counter()
                data = self.acoustic(signal)
                report.extractor_seconds += time.perf_counter() - t0
                report.wav_seconds += signal.size / 16000
                segments.append(pool(data, self.acoustic.native_hz, self.s.audio_hz))
                names = self.acoustic.columns
            source = self.acoustic.name if segments else None
        return self._finish(segments), names, source

    def visual(self, p: Participant, notes: list[Problem]):
        segments, names, source = [], [], None
        if p.media.openface:
            for files in p.media.openface:
                data, names, fps = read_openface(files, notes)
                segments.append(pool(data, fps, self.s.visual_hz))
            source = "openface"
        elif p.media.resnet:
            for path in p.media.resnet:
                data, names = read_resnet_mat(path)
                segments.append(data)
            source = "resnet"
        elif p.media.video:
            if self._face is None:
                self._face = OpenCvFaceExtractor()
            for path in p.media.video:
                segments.append(self._face(path, self.s.visual_hz))
            names, source = list(OpenCvFaceExtractor.columns), OpenCvFaceExtractor.name
        return self._finish(segments), names, source

    def _finish(self, segments: list[np.ndarray]) -> torch.Tensor | None:
        segments = [s for s in segments if s.size]
        if not segments:
            return None
        x = np.concatenate(segments, axis=0)
        if x.shape[0] > self.s.max_frames:
            x = pool(x, x.shape[0], self.s.max_frames)
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def extract_corpus(corpus: Corpus, store: FeatureStore, settings: ExtractionSettings,
                   progress: Progress = None) -> ExtractReport:
    """Extract every participant not already current in the store."""
    report = ExtractReport()
    prog.start(progress, "extracting features", len(corpus.participants))
    t0 = time.perf_counter()
    extractor = Extractor(settings, choose_audio_source(corpus, settings))
    store.set_fingerprint(extractor.fingerprint())
    for p in corpus.participants:
        if store.is_current(p.id):
            report.skipped.append(p.id)
            prog.advance(progress)
            continue
        notes: list[Problem] = []
        feats = ParticipantFeatures(p.id, None, None)
        for modality, fn in (("audio", lambda: extractor.audio(p, notes, report)), ("visual", lambda: extractor.visual(p, notes))):
            try:
                x, names, source = fn()
            except InputError as err:
                notes.append(Problem(err.path or str(p.folder), f"{modality} missing: {err.message}"))
                continue
            setattr(feats, modality, x)
            setattr(feats, f"{modality}_names", list(names))
            setattr(feats, f"{modality}_source", source if x is not None else None)
        feats.notes = [f"{n.path}: {n.message}" for n in notes]
        store.put(feats)
        report.problems.extend(notes)
        report.extracted.append(p.id)
        prog.advance(progress)
    report.seconds = time.perf_counter() - t0
    return report


def extract_workspace(ws, corpus_path: Path, fmt: str = "auto", hubert: Path | None = None,
                      progress: Progress = None) -> dict:
    """``mllmdr-site extract``: point the workspace at its corpus, extract, audit; returns the summary."""
    from mllm_dr import audit
    from mllm_dr.corpus import read_corpus

    corpus = read_corpus(corpus_path, fmt)
    ws.config.corpus_path, ws.config.corpus_format = str(Path(corpus_path).resolve()), corpus.format
    if hubert:
        ws.config.extraction.hubert_path = str(Path(hubert).resolve())
        ws.config.extraction.audio_source = "hubert"
    ws.save()
    store = FeatureStore(ws.features_dir)
    report = extract_corpus(corpus, store, ws.config.extraction, progress)
    audit.append(ws.audit_path, "extract", corpus_format=corpus.format, extracted=len(report.extracted),
                 skipped=len(report.skipped), problems=len(report.problems))
    sizes = [e["bytes"] for e in store.manifest["participants"].values()]
    return {"extracted": report.extracted, "skipped": report.skipped, "dims": store.dims(),
            "seconds": round(report.seconds, 2), "real_time_factor": report.real_time_factor,
            "bytes_per_participant": sum(sizes) / len(sizes) if sizes else 0.0,
            "problems": [p.to_dict() for p in corpus.problems + report.problems]}
