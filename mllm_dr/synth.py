"""A synthetic multi-site corpus written in the real layouts (the embedded default).

Each site folder is an E-DAIC-WOZ, DAIC-WOZ or CMDC copy that the ordinary readers
read. What carries signal (documented in the README, never clinical data):

- text: each item's score picks the participant's sentence for that item: one template
  sentence per score (synth_text, the default) or, with ``text="free"``, paraphrases,
  hedges, negations, small talk and unasked items (synth_free);
- audio: a voiced tone whose pitch, loudness, pitch variability and pause ratio fall
  or rise with the participant's latent severity;
- visual: OpenFace AU intensities (smile AU12 down, brow lowerer AU04 and lip corner
  depressor AU15 up), downward gaze and head pitch follow the latent severity.

Sites are non-IID: site k draws latent severity from a Beta whose mean moves from low
(first site) to high (last site). Item scores are the latent severity plus per-item noise,
so items vary within a participant.

Free text: a test participant (``labels.effective_split``) answers with held-out phrasings that no
train/dev participant says for the same item and score (synth_free.answer_options), and the labels
come from their own random stream, (seed, LABEL_STREAM). Template mode draws labels, text and media
from one stream, so its labels (from the second site on) depend on the media settings (``seconds``,
``audio_tables``) as well as on the seed; it is kept so, byte for byte, because the demo's and the
README's figures were measured on it.

A run removes the kit-made site folders it does not write (``siteN`` with N > sites, holding
SYNTHETIC.json and nothing else the kit did not write); anything else in the folder is refused.

Each site's SYNTHETIC.json (which the readers ignore) records, per participant and item,
the indices of the transcript turns (as the reader returns them) that answer the item:
the ground truth of quote selection and of the grounding figures (mllm_dr.grounding).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from mllm_dr import phq, synth_free, synth_media
from mllm_dr.corpus.model import INTERVIEWER_SPEAKER, PARTICIPANT_SPEAKER
from mllm_dr.errors import InputError
from mllm_dr.synth_text import ELLIE_QUESTIONS, EN, FILLER_EN, FILLER_ZH, ZH

TEXT_MODES = ("template", "free")
LABEL_STREAM = 1    # free mode: the labels' own random stream, (seed, LABEL_STREAM)
SIDECAR = "SYNTHETIC.json"
AnswerTurns = dict[str, dict[str, list[int]]]   # participant -> item -> answering turn indices


@dataclass
class SynthConfig:
    out: Path
    format: str = "edaic"
    participants: int = 24          # in total, spread over the sites
    sites: int = 3
    seed: int = 0
    seconds: float = 6.0            # audio/visual length per participant (per question for CMDC: seconds / 6)
    question_map: dict[str, list[str]] | None = None  # CMDC item -> questions (defaults to the packaged map)
    text: str = "template"          # "template": one sentence per item score; "free": synth_free interviews
    audio_tables: bool = False      # E-DAIC: also ship openSMILE's 23-column eGeMAPS table, as E-DAIC does


@dataclass
class SynthParticipant:
    id: str
    split: str | None
    severity: float
    items: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.items.values())


def write_synthetic(cfg: SynthConfig) -> list[Path]:
    """Write ``cfg.sites`` site folders under ``cfg.out``; returns their paths.

    Each site is written to a temporary folder and renamed into place, so a failure
    leaves no half-written site.
    """
    if cfg.format not in ("edaic", "daic", "cmdc"):
        raise ValueError(f"unknown format {cfg.format!r}")
    if cfg.text not in TEXT_MODES:
        raise ValueError(f"unknown text mode {cfg.text!r}; expected one of {TEXT_MODES}")
    if cfg.sites < 1 or cfg.participants < cfg.sites:
        raise ValueError("need at least one site and one participant per site")
    _refuse_foreign_content(Path(cfg.out))
    rng = np.random.default_rng(cfg.seed)
    # template mode draws labels, text and media from the one stream (so its labels move with the media
    # settings; kept: the demo's figures were measured on it); free mode draws the labels from their own
    labels_rng = np.random.default_rng([cfg.seed, LABEL_STREAM]) if cfg.text == "free" else rng
    cfg.out.mkdir(parents=True, exist_ok=True)
    _remove_surplus_sites(cfg.out, cfg.sites)
    sites = []
    per_site = np.array_split(np.arange(cfg.participants), cfg.sites)
    for k, idx in enumerate(per_site):
        final = cfg.out / f"site{k + 1}"
        tmp = cfg.out / f".site{k + 1}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        people = _draw_participants(cfg, k, len(idx), labels_rng)
        writer = {"edaic": _write_edaic, "daic": _write_daic, "cmdc": _write_cmdc}[cfg.format]
        answers = writer(tmp, people, cfg, rng)
        (tmp / SIDECAR).write_text(json.dumps({
            "warning": "synthetic data for testing; not clinical data", "seed": cfg.seed, "site": k + 1,
            "format": cfg.format, "text": cfg.text, "participants": [p.id for p in people],
            "answer_turns_note": "participant -> item -> indices of the turns (as the corpus reader returns "
                                 "them) that answer the item; [] = the item was never asked",
            "answer_turns": answers}, indent=1, ensure_ascii=False))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        sites.append(final)
    return sites


def _refuse_foreign_content(out: Path) -> None:
    """Only an empty folder or one holding kit-made sites (``_kit_made``) may be written into: the sites are
    replaced, and nobody's own files may go with them."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError("is a file; give a folder to write the synthetic sites into", out)
    for entry in sorted(out.iterdir()):
        if not _kit_made(entry):
            raise InputError(f"holds {entry.name!r}, which is not a synthetic site made by this kit (or holds more "
                             "than it wrote); choose an empty or new folder", out)


def _remove_surplus_sites(out: Path, sites: int) -> None:
    """Delete the kit-made site folders (``_kit_made``, SYNTHETIC.json naming a site) that this run does not
    write: ``data synth OUT --sites 2`` after ``--sites 3`` left site3 behind, from another run and maybe
    another seed, and the readers took the mixed corpus as one (a review). Anything else stays."""
    keep = {f"site{k + 1}" for k in range(sites)}
    for entry in sorted(out.iterdir()):
        if entry.name in keep or not _kit_made(entry):
            continue
        if re.fullmatch(r"site\d+", entry.name):
            try:
                meta = json.loads((entry / SIDECAR).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not (isinstance(meta, dict) and "synthetic" in str(meta.get("warning", "")) and "site" in meta):
                continue
        shutil.rmtree(entry)


# what write_synthetic puts in a site folder, in any of the three layouts
SITE_CONTENT = re.compile(r"SYNTHETIC\.json|Detailed_PHQ8_Labels\.csv|(train|dev|test)_split\.csv|"
                          r"(train|dev|test)_split_Depression_AVEC2017\.csv|full_test_split\.csv|"
                          r"SubjectInfo\.csv|part1|\d+_P")
KIT_OWNERS = ("workspace.json", "center.json")     # a workspace's or a center's: never inside a synthetic site


def _kit_made(entry: Path) -> bool:
    """A site folder this kit wrote: ``siteN`` with its SYNTHETIC.json (or a ``.siteN.partial`` left by a
    failure), holding nothing but what ``write_synthetic`` writes and no workspace or center folder at any
    depth. Before session 44 the sidecar alone made a folder kit-made: a workspace made inside a synthetic
    site was deleted with it by the next `data synth` (a review)."""
    if re.fullmatch(r"site\d+", entry.name):
        if not (entry / SIDECAR).is_file():
            return False
    elif not re.fullmatch(r"\.site\d+\.partial", entry.name):
        return False
    if not entry.is_dir() or entry.is_symlink():
        return False
    if any(not SITE_CONTENT.fullmatch(p.name) for p in entry.iterdir()):
        return False
    return not any(p.name in KIT_OWNERS for p in entry.rglob("*.json"))


def _draw_participants(cfg: SynthConfig, site: int, n: int, rng: np.random.Generator) -> list[SynthParticipant]:
    mean = 0.25 + 0.5 * (site / max(cfg.sites - 1, 1))  # non-IID: severity mix differs per site
    conc = 4.0
    severities = rng.beta(mean * conc, (1 - mean) * conc, size=n)
    items_names = phq.PHQ9_ITEMS if cfg.format == "cmdc" else phq.PHQ8_ITEMS
    splits = _splits(n) if cfg.format != "cmdc" else [None] * n
    people = []
    counters = {"non-test": 0, "test": 0}
    # E-DAIC-like ids (train/dev from 300, test from 600); from the 5th site on the two ranges would
    # meet, so the test ids then follow the site's last train/dev id (ids stay unique within a site)
    test_base = max(600 + site * 30, 300 + site * 90 + sum(s != "test" for s in splits))
    for i, (sev, split) in enumerate(zip(severities, splits)):
        items = {name: int(np.clip(np.round(3 * sev + rng.normal(0, 0.6)), 0, 3)) for name in items_names}
        if cfg.format == "cmdc":
            total = sum(items.values())
            pid = f"{'MDD' if total >= phq.BINARY_CUTOFF else 'HC'}{site + 1}{i + 1:02d}"
        else:
            kind = "test" if split == "test" else "non-test"  # E-DAIC test IDs are 600+
            pid = str((test_base if kind == "test" else 300 + site * 90) + counters[kind])
            counters[kind] += 1
        people.append(SynthParticipant(pid, split, float(sev), items))
    return people


def _splits(n: int) -> list[str]:
    n_test = max(1, round(n * 0.2)) if n >= 3 else 0
    n_dev = max(1, round(n * 0.2)) if n >= 4 else 0
    return ["train"] * (n - n_test - n_dev) + ["dev"] * n_dev + ["test"] * n_test


def _sentences(p: SynthParticipant, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Template mode: (item or 'filler', sentence) in interview order."""
    out = []
    fillers = list(rng.permutation(FILLER_EN))
    for item in phq.PHQ8_ITEMS:
        if fillers and rng.uniform() < 0.5:
            out.append(("filler", str(fillers.pop())))
        out.append((item, str(rng.choice(EN[item][p.items[item]]))))
    return out


def _script(p: SynthParticipant, cfg: SynthConfig, rng: np.random.Generator, interviewer: bool) -> list[synth_free.Line]:
    """(speaker, text, item answered or None) lines of one English interview."""
    if cfg.text == "free":
        return synth_free.interview(p.items, rng, interviewer, held_out=_held_out(p))
    lines: list[synth_free.Line] = [(INTERVIEWER_SPEAKER, "hi i'm ellie thanks for coming in today", None)] if interviewer else []
    for item, sentence in _sentences(p, rng):
        answered = None if item == "filler" else item
        if interviewer and answered:
            lines.append((INTERVIEWER_SPEAKER, ELLIE_QUESTIONS[item].lower(), None))
        lines.append((PARTICIPANT_SPEAKER, sentence.lower() if interviewer else sentence, answered))
    return lines


def _held_out(p: SynthParticipant) -> bool:
    """A test participant (CMDC: by the id hash every reader uses, labels.effective_split): free mode gives
    it the held-out phrasings only."""
    from mllm_dr.corpus.labels import effective_split

    return effective_split(p.id, p.split) == "test"


def _answer_turns(items: list[str], answered: list[str | None]) -> dict[str, list[int]]:
    """item -> indices of the turns that answer it (``answered[i]`` = item of turn i or None)."""
    return {item: [i for i, a in enumerate(answered) if a == item] for item in items}


# ---------------------------------------------------------------------------- layouts

def _write_edaic(root: Path, people: list[SynthParticipant], cfg: SynthConfig, rng: np.random.Generator) -> AnswerTurns:
    for split in ("train", "dev", "test"):
        rows = ["Participant_ID,Gender,PHQ_Binary,PHQ_Score,PCL-C (PTSD),PTSD Severity"]
        rows += [f"{p.id},{rng.choice(['male', 'female'])},{phq.binary(p.total)},{p.total},0,0" for p in people if p.split == split]
        (root / f"{split}_split.csv").write_text("\n".join(rows) + "\n")
    rows = ["Participant_ID," + ",".join(f"PHQ_8{i}" for i in phq.PHQ8_ITEMS) + ",PHQ_8Total"]
    rows += [f"{p.id}," + ",".join(str(p.items[i]) for i in phq.PHQ8_ITEMS) + f",{p.total}" for p in people]
    (root / "Detailed_PHQ8_Labels.csv").write_text("\n".join(rows) + "\n")
    answers = {}
    for p in people:
        d = root / f"{p.id}_P"
        (d / "features").mkdir(parents=True)
        lines = ["Start_Time,End_Time,Text,Confidence"]
        t = 0.0
        script = _script(p, cfg, rng, interviewer=False)   # E-DAIC transcripts hold the participant only
        for _, sentence, _ in script:
            lines.append(f'{t:.2f},{t + 2.5:.2f},"{sentence}",0.9{rng.integers(0, 9)}')
            t += 4.0
        (d / f"{p.id}_Transcript.csv").write_text("\n".join(lines) + "\n")
        answers[p.id] = _answer_turns(list(p.items), [item for _, _, item in script])
        sf.write(d / f"{p.id}_AUDIO.wav", synth_media.audio(p.severity, cfg.seconds, 16000, rng), 16000)
        cols, data = synth_media.openface_rows(p.severity, cfg.seconds, rng, with_face_id=True)
        synth_media.write_openface(d / "features" / f"{p.id}_OpenFace2.1.0_Pose_gaze_AUs.csv", cols, data)
        if cfg.audio_tables:
            synth_media.write_egemaps_table(d / "features" / f"{p.id}_OpenSMILE2.3.0_egemaps.csv", p.severity, cfg.seconds, rng)
    return answers


def _write_daic(root: Path, people: list[SynthParticipant], cfg: SynthConfig, rng: np.random.Generator) -> AnswerTurns:
    header = "Participant_ID,PHQ8_Binary,PHQ8_Score,Gender," + ",".join(f"PHQ8_{i}" for i in phq.PHQ8_ITEMS)
    for split in ("train", "dev"):
        rows = [header] + [f"{p.id},{phq.binary(p.total)},{p.total},{rng.integers(0, 2)}," +
                           ",".join(str(p.items[i]) for i in phq.PHQ8_ITEMS) for p in people if p.split == split]
        (root / f"{split}_split_Depression_AVEC2017.csv").write_text("\n".join(rows) + "\n")
    test = [p for p in people if p.split == "test"]
    (root / "test_split_Depression_AVEC2017.csv").write_text(
        "\n".join(["participant_ID,Gender"] + [f"{p.id},{rng.integers(0, 2)}" for p in test]) + "\n")
    (root / "full_test_split.csv").write_text("\n".join(["Participant_ID,PHQ_Binary,PHQ_Score,Gender"] + [
        f"{p.id},{phq.binary(p.total)},{p.total},{rng.integers(0, 2)}" for p in test]) + "\n")
    answers = {}
    for p in people:
        d = root / f"{p.id}_P"
        d.mkdir()
        script = _script(p, cfg, rng, interviewer=True)
        rows = ["start_time\tstop_time\tspeaker\tvalue"]
        for i, (speaker, text, _) in enumerate(script):
            rows.append(f"{3 * i:.3f}\t{3 * i + 2:.3f}\t{speaker}\t{text.lower()}")
        (d / f"{p.id}_TRANSCRIPT.csv").write_text("\n".join(rows) + "\n")
        answers[p.id] = _answer_turns(list(p.items), [item for _, _, item in script])
        sf.write(d / f"{p.id}_AUDIO.wav", synth_media.audio(p.severity, cfg.seconds, 16000, rng), 16000)
        cols, data = synth_media.openface_rows(p.severity, cfg.seconds, rng, with_face_id=False)
        meta = cols[:4]
        groups = {"AUs": [c for c in cols if c.startswith("AU")], "gaze": synth_media.GAZE, "pose": synth_media.POSE}
        for name, group in groups.items():
            idx = [cols.index(c) for c in meta + group]
            synth_media.write_openface(d / f"{p.id}_CLNF_{name}.txt", meta + group, data[:, idx])
    return answers


def _write_cmdc(root: Path, people: list[SynthParticipant], cfg: SynthConfig, rng: np.random.Generator) -> AnswerTurns:
    from mllm_dr.aspects import load_question_map

    qmap = cfg.question_map or load_question_map()
    question_item = {q: item for item, qs in qmap.items() for q in qs}
    n_questions = max(12, *(int(q[1:]) for q in question_item))
    rows = ["ID,MDD,VideoAvailabe,age,gender," + ",".join(f"PHQ-{k}" for k in range(1, 10)) + ",PHQtotal," +
            ",".join(f"HAMD{k:02d}" for k in range(1, 18)) + ",HAMDtotal"]
    part = root / "part1"
    part.mkdir()
    seconds = max(cfg.seconds / 6, 0.5)
    answers = {}
    for i, p in enumerate(people):
        video = i % 4 != 3  # about a quarter have no video, as in CMDC
        rows.append(f"{p.id},{int(p.id.startswith('MDD'))},{int(video)},{rng.integers(20, 60)},{rng.integers(0, 2)}," +
                    ",".join(str(p.items[it]) for it in phq.PHQ9_ITEMS) + f",{p.total}," + ",".join(["0"] * 17) + ",0")
        d = part / p.id
        d.mkdir()
        skipped = synth_free.unasked_items(list(p.items), rng) if cfg.text == "free" else set()
        answered: list[str | None] = []
        for k in range(1, n_questions + 1):
            q = f"Q{k}"
            item = question_item.get(q)
            if cfg.text == "free":
                text, answers_item = synth_free.cmdc_answer(item, p.items.get(item or ""), item not in skipped, rng,
                                                            held_out=_held_out(p))
            else:
                text, answers_item = (str(rng.choice(ZH[item][p.items[item]])) if item else str(rng.choice(FILLER_ZH))), True
            answered.append(item if answers_item else None)
            (d / f"{q}.txt").write_text(text, encoding="utf-8")
            stereo = np.stack([synth_media.audio(p.severity, seconds, 48000, rng)] * 2, axis=1)
            sf.write(d / f"{q}.wav", stereo, 48000)  # 48 kHz stereo, as distributed
            if video:
                cols, data = synth_media.openface_rows(p.severity, seconds, rng, with_face_id=True)
                synth_media.write_openface(d / f"{q}.csv", cols, data)
        answers[p.id] = _answer_turns(list(p.items), answered)   # one turn per question file, in order
    (root / "SubjectInfo.csv").write_text("\n".join(rows) + "\n")
    return answers
