"""Workspace -> model examples: aspect instances + features + answers (rationales)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mllm_dr import evidence
from mllm_dr.aspects import AspectInstance, build_instances, load_question_map
from mllm_dr.corpus import read_corpus
from mllm_dr.corpus.labels import effective_split
from mllm_dr.errors import InputError
from mllm_dr.features.store import CHANGED_IN, FEATURE_VERSION, FeatureStore, source_files
from mllm_dr.processor import Example
from mllm_dr.parsing import format_answer
from mllm_dr.rationales import extractive_rationale
from mllm_dr.workspace import Workspace


def load_corpus(ws: Workspace):
    if not ws.config.corpus_path:
        raise InputError("the workspace has no corpus yet; run 'mllmdr-site extract --corpus PATH' first", ws.root)
    return read_corpus(ws.config.corpus_path, ws.config.corpus_format or "auto")


def instances_by_split(ws: Workspace, splits: tuple[str, ...], participant: str | None = None,
                       corpus=None) -> list[AspectInstance]:
    """The aspect instances of the corpus's participants in ``splits`` (only ``participant``'s when given:
    scoring one interview builds no other). ``corpus``: as the caller already read it, else read here."""
    corpus = corpus or load_corpus(ws)
    evidence.use_cache_file(ws.embeddings_cache_path)       # a later command (or Flower message) re-uses them
    qmap = load_question_map(ws.question_map_path) if ws.question_map_path.is_file() else None
    chosen = [p for p in corpus.participants if effective_split(p.id, p.split) in splits and participant in (None, p.id)]
    for p in chosen:
        if not p.participant_turns:
            _no_words(corpus, p)
    return [i for p in chosen for i in build_instances(corpus, p, ws.config.max_context_tokens, question_map=qmap)]


def _no_words(corpus, p) -> None:
    """A participant without a word of interview (its transcript missing, unreadable, or without the
    participant's turns) is an error naming the transcript: never trained or scored from an empty dialogue
    (a site-path review, session 41: such a participant trained 'Score: 3' on nothing)."""
    near = [q for q in corpus.problems if p.folder is not None and Path(q.path).is_relative_to(p.folder)]
    why = f"{near[0].path}: {near[0].message}" if near else "its transcript has none of the participant's turns"
    raise InputError(f"participant {p.id} has no interview text ({why}); restore the transcript, or take the "
                     f"participant out of the corpus's split and label files", Path(near[0].path) if near else
                     (p.folder or Path(corpus.root)))


TRAINING_SPLITS = ("train", "dev")     # what every trainer (and the teacher) learns from; never test


def labelled_training_instances(ws: Workspace) -> list[AspectInstance]:
    """The instances every trainer (and the teacher) uses: labelled train/dev participants, never test."""
    return [i for i in instances_by_split(ws, TRAINING_SPLITS) if i.label is not None]


def labelled_training_counts(ws: Workspace) -> tuple[int, int]:
    """(participants, instances) of ``labelled_training_instances``, counted from the labels alone."""
    corpus = load_corpus(ws)
    per = [sum(p.items.get(item) is not None for item in corpus.item_names) for p in corpus.participants
           if effective_split(p.id, p.split) in TRAINING_SPLITS]
    return sum(1 for k in per if k), sum(per)


def fallback_rationale(inst: AspectInstance) -> str:
    """Used when no teacher rationale was accepted: an extractive one, grounded in the dialogue, its quote
    normalised as the scorer's rule has it and cut to the answer budget (``rationales.extractive_rationale``)."""
    return extractive_rationale(inst)


def dialogue_digest(inst: AspectInstance) -> str:
    """What a teacher record keeps of the dialogue it was written from (a hash: the record never
    needs the words again, only whether they changed)."""
    return hashlib.sha256(inst.dialogue.encode()).hexdigest()


def teacher_record_of(inst: AspectInstance) -> dict:
    """What a teacher answer (accepted or rejected) records of the instance it answered: what
    ``is_current`` compares with the instance of today."""
    return {"participant": inst.participant, "item": inst.item, "label": inst.label, "evidence": inst.evidence,
            "dialogue_sha256": dialogue_digest(inst)}


def is_current(record: dict, inst: AspectInstance) -> bool:
    """A teacher answer still fits its instance when it was written for the same quote (``evidence``),
    the same label and the same dialogue. One from before the quote was recorded (session 25) or for a
    quote the selector no longer picks may cite another item's answer; one for a corrected label was
    validated against the old score; one for a corrected transcript may quote words no longer said.
    Records from before the dialogue hash (session 40) are judged by quote and label."""
    return ("evidence" in record and record["evidence"] == inst.evidence and record.get("label") == inst.label
            and record.get("dialogue_sha256", dialogue_digest(inst)) == dialogue_digest(inst))


def split_stale(records: list[dict], instances: list[AspectInstance]) -> tuple[list[dict], list[dict]]:
    """(records kept, records stale): stale = written for an instance here with another quote, label
    or dialogue (is_current false); a record of no instance here is kept (it is not this call's to judge)."""
    by_key = {(i.participant, i.item): i for i in instances}
    kept, stale = [], []
    for r in records:
        inst = by_key.get((r["participant"], r["item"]))
        (stale if inst is not None and not is_current(r, inst) else kept).append(r)
    return kept, stale


TEACHER_RECORD_KEYS = ("participant", "item", "rationale")     # what training reads of an accepted record


def read_teacher_records(path: Path) -> list[dict]:
    """The accepted teacher answers (``rationales.jsonl``), each a JSON object with a participant, item and
    rationale (strings); a line that is not one is an InputError naming the file and line (session 46: a
    hand-edited record without a key, or a line of a list, raised KeyError/TypeError)."""
    if not Path(path).is_file():
        return []
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), start=1):   # as read_jsonl
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"line {n} is not JSON; run 'mllmdr-site rationales' to write it again, or mend "
                             f"the line", path) from None
        if not isinstance(rec, dict):
            raise InputError(f"line {n} is not a teacher record (a JSON object, not {type(rec).__name__}); mend or "
                             f"delete the line", path)
        bad = [k for k in TEACHER_RECORD_KEYS if not isinstance(rec.get(k), str)]
        if bad:
            raise InputError(f"line {n}: the teacher record has no {', '.join(bad)} (a string); mend or delete the "
                             f"line", path)
        out.append(rec)
    return out


def teacher_rationales(ws: Workspace, instances: list[AspectInstance]) -> tuple[dict[tuple[str, str], str], int]:
    """(participant, item) -> the accepted teacher rationale that is current (is_current), and how
    many accepted ones are stale (those instances train on the extractive rationale until
    ``mllmdr-site rationales`` asks the teacher again)."""
    keys = {(i.participant, i.item) for i in instances}
    kept, stale = split_stale(read_teacher_records(ws.rationales_path), instances)
    return {(r["participant"], r["item"]): r["rationale"] for r in kept if (r["participant"], r["item"]) in keys}, \
        len(stale)


def training_rationale(inst: AspectInstance, rationales: dict[tuple[str, str], str]) -> tuple[str, str]:
    """(the rationale a stage-2 training answer of ``inst`` gives, "teacher" | "extractive"): the current
    accepted teacher rationale, else the extractive one (``fallback_rationale``)."""
    teacher = rationales.get((inst.participant, inst.item))
    return (teacher, "teacher") if teacher else (fallback_rationale(inst), "extractive")


def rationale_sources(ws: Workspace, instances: list[AspectInstance], processor) -> dict[str, int]:
    """How the stage-2 training answers of the labelled ``instances`` are made, as the trainer reads them:
    ``teacher`` on a teacher rationale, ``extractive`` on the extractive one (no teacher record: a site that
    never ran 'rationales', an instance the teacher was rejected on, a stale record; and those replaced),
    ``over_budget_replaced`` of them an answer longer than the scorer's budget that the processor trains
    as the extractive rationale instead (``Processor.answer_over_budget``). teacher + extractive = the
    labelled instances. One count for the local run and a federated site (session 46: only stale
    records were counted, so a site training 100% extractive was never told)."""
    rationales = teacher_rationales(ws, instances)[0]
    out = {"teacher": 0, "extractive": 0, "over_budget_replaced": 0}
    for inst in instances:
        if inst.label is None:
            continue
        text, source = training_rationale(inst, rationales)
        if processor.answer_over_budget(format_answer(inst.label, text)):
            out["over_budget_replaced"] += 1
            source = "extractive"
        out[source] += 1
    return out


def stale_teacher_rationales(ws: Workspace) -> int:
    """How many accepted teacher rationales of this site's training instances are stale (see
    ``teacher_rationales``); 0 without reading the corpus when the teacher has written none."""
    if not ws.rationales_path.is_file():
        return 0
    return teacher_rationales(ws, labelled_training_instances(ws))[1]


def examples(ws: Workspace, instances: list[AspectInstance], stage: int, with_answers: bool = True,
             corpus=None) -> list[Example]:
    """The model's examples of ``instances`` (features loaded and checked current). ``corpus``: the corpus
    as already read by the caller (evaluation calls this once per participant), else read here."""
    store = FeatureStore(ws.features_dir)
    extracted = bool(store.manifest["participants"])      # no features at all: a text-only site...
    if not extracted and instances:                       # ...only when its corpus has no media either
        wanted = {i.participant for i in instances}
        media = [p.id for p in load_corpus(ws).participants
                 if p.id in wanted and (p.modalities()["audio"] or p.modalities()["visual"])]
        if media:
            raise InputError(f"no features are stored, but {len(media)} participant(s) have audio or video "
                             f"(participant {media[0]}, ...): an extraction failed or the store was emptied; run "
                             f"'mllmdr-site extract --workspace {ws.root}' (a model without them would read text "
                             f"only, without a word)", store.dir)
    if extracted and (version := store.other_version()) is not None:     # never trained or scored on them
        since = "; ".join(why for v, why in sorted(CHANGED_IN.items()) if v > version)
        raise InputError(f"the features were made by extractor version {version}, this kit's is {FEATURE_VERSION} "
                         f"({since or 'extraction changed'}); run 'mllmdr-site extract --workspace {ws.root}' again "
                         f"(it extracts every participant again)", store.manifest_path)
    rationales = teacher_rationales(ws, instances)[0]
    now = {p.id: p for p in (corpus or load_corpus(ws)).participants} if extracted and instances else {}
    audio_source = (store.manifest.get("fingerprint") or {}).get("audio_source", "auto")
    corpus_root = Path(ws.config.corpus_path)
    cache: dict[str, dict] = {}
    out = []
    for inst in instances:
        if inst.participant not in cache:
            if extracted:    # a participant never extracted, or a damaged file, stops here, named (InputError):
                f = store.get(inst.participant)          # never a silent text-only score or training example
                changed = store.changed_sources(inst.participant, corpus_root)
                if not changed and inst.participant in now:   # and a file copied in since (session 41)
                    changed = store.new_sources(inst.participant, corpus_root,
                                                source_files(now[inst.participant], audio_source))
                if changed:   # features of files replaced since extract: never trained or scored on unseen
                    raise InputError(f"participant {inst.participant}: {len(changed)} source file(s) changed, "
                                     f"went away or came since its features were extracted ({changed[0]}); run "
                                     f"'mllmdr-site extract --workspace {ws.root}' again",
                                     corpus_root / changed[0])
                cache[inst.participant] = {"audio": f.audio, "visual": f.visual}   # a missing modality is None
            else:
                cache[inst.participant] = {"audio": None, "visual": None}
        answer = None
        if with_answers and inst.label is not None:
            if stage == 1:
                answer = f"Score: {inst.label}"
            else:
                answer = format_answer(inst.label, training_rationale(inst, rationales)[0])
        out.append(Example(inst, cache[inst.participant], answer, stage))
    return out
