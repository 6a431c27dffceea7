"""Teacher rationales (paper section 3.1), built on the site's premises.

A teacher is told the true item score (Table 1) and writes "Evaluation Result: N /
Evaluation Reason: ...". Answers are validated (format, N equals the label, a reason
of a few words); failures are retried with sampling and every reject is recorded.
Teachers: an OpenAI-compatible endpoint on the hospital network, a local HF model,
or (default) the embedded base model with the result pre-filled to the label.
Nothing is sent anywhere but the configured teacher.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Protocol

from mllm_dr.aspects import AspectInstance
from mllm_dr.errors import InputError
from mllm_dr.generation import chat_prompt, generate_texts
from mllm_dr.parsing import ANSWER_TOKEN_BUDGET, estimated_answer_tokens, fits_budget, format_answer, parse_answer
from mllm_dr.phq import ITEM_TOPICS
from mllm_dr.quotes import training_quotes
from mllm_dr import progress as prog
from mllm_dr.progress import Progress


def no_statement(item: str) -> str:
    """How a rationale opens when nothing in the dialogue speaks to the item (no evidence turn)."""
    return f"The dialogue gives no direct statement on {ITEM_TOPICS[item]}"


def extractive_rationale(inst: AspectInstance, count: Callable[[str], int] = estimated_answer_tokens) -> str:
    """The rationale an item trains on when no teacher rationale was accepted (``dataset.fallback_rationale``),
    grounded in the dialogue: its evidence turn quoted, whole or cut at a clause (``quotes.training_quotes``,
    the longest whose answer fits ANSWER_TOKEN_BUDGET by ``count``: the answer's tokens with its EOS), or, when
    no cut fits, the item named without a quote; an item with no evidence turn says so (``no_statement``)."""
    return "".join(_extractive_parts(inst, count))


def _extractive_parts(inst: AspectInstance, count: Callable[[str], int]) -> tuple[str, str]:
    """``extractive_rationale`` as (its opening, the rest): the default teacher is given the opening."""
    if inst.evidence:
        for quote in training_quotes(inst.evidence):
            parts = f'The participant said "{quote}", which', f" fits a score of {inst.label}."
            if fits_budget(format_answer(inst.label, "".join(parts)), count):
                return parts
        return f"The participant's long answer on {ITEM_TOPICS[inst.item]}", f" fits a score of {inst.label}."
    return f"{no_statement(inst.item)};", f" a score of {inst.label} is given."


class Teacher(Protocol):
    name: str

    def answer(self, instances: list[AspectInstance], attempt: int) -> list[str]: ...


class LocalTeacher:
    """A causal LM on this machine. ``prefill`` writes the label into the answer (the default teacher)."""

    def __init__(self, model, tok, name: str, prefill: bool, max_new_tokens: int = 40):
        self.model, self.tok, self.name, self.prefill, self.max_new_tokens = model, tok, name, prefill, max_new_tokens

    def _prefix(self, inst: AspectInstance) -> str:
        # Pre-filling the result and the most item-related quote grounds the reason: without it
        # the 135M model echoes the format instruction ("A concise and logical description").
        # The opening is the extractive rationale's: its quote normalised and cut to the answer budget as the
        # training answers' are (session 45).
        if not self.prefill:
            return ""
        opening = _extractive_parts(inst, estimated_answer_tokens)[0]
        return f"Evaluation Result: {inst.label}\nEvaluation Reason: {opening}"

    def answer(self, instances: list[AspectInstance], attempt: int) -> list[str]:
        prompts = [chat_prompt(self.tok, i.teacher_messages(), self._prefix(i)) for i in instances]
        outs = generate_texts(self.model, self.tok, prompts, self.max_new_tokens, sample=attempt > 0, seed=attempt)
        return [self._prefix(i) + o for i, o in zip(instances, outs)]


class OpenAICompatibleTeacher:
    """POST {url}/chat/completions on the hospital network (vLLM, TGI, Ollama, ...)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/") + ("/chat/completions" if not url.rstrip("/").endswith("/chat/completions") else "")
        self.model, self.api_key, self.timeout, self.name = model, api_key, timeout, f"openai:{model}"

    def answer(self, instances: list[AspectInstance], attempt: int) -> list[str]:
        return [self._one(i, attempt) for i in instances]

    def _one(self, inst: AspectInstance, attempt: int) -> str:
        body = json.dumps({"model": self.model, "messages": inst.teacher_messages(),
                           "temperature": 0.0 if attempt == 0 else 0.8, "max_tokens": 200}).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, TimeoutError, KeyError, json.JSONDecodeError) as err:
            raise InputError(f"teacher endpoint failed: {err}", self.url) from None


@dataclass
class RationaleResult:
    accepted: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    first_try_accepted: int = 0
    total: int = 0

    @property
    def acceptance_rate(self) -> float:
        return len(self.accepted) / self.total if self.total else 0.0


_STOP = set("the a an and or but of to in on at for with that this is was are were be been have has had i my me you "
             "your it its they their them he she his her participant participants score dialogue".split())


def _content_words(text: str) -> set[str]:
    words = {w.strip(".,;:!?\"'()").lower() for w in text.split()}
    return {w for w in words if len(w) >= 4 and w not in _STOP}


def validate(text: str, label: int, dialogue: str | None = None,
             count: Callable[[str], int] = estimated_answer_tokens) -> str | None:
    """None when acceptable, else why not.

    Beyond format and label, the reason must not echo the format instruction (``parsing.ECHOES``, decided
    by the parser), the answer it trains must fit ANSWER_TOKEN_BUDGET (``count``: an answer's tokens with its
    EOS) and, when the dialogue is given, the reason must share a content word with it (a grounding check).
    """
    parsed = parse_answer(text)
    if parsed.score is None:
        return "no single 'Evaluation Result: N' (0-3)"
    if parsed.score != label:
        return f"result {parsed.score} differs from the label {label}"
    if parsed.reason is None:
        return "no usable 'Evaluation Reason' (missing or under 4 words)"
    if parsed.contradicted:      # the scorer falls back on such an answer: never train on one (session 44)
        return "the reason commits to another score than its result"
    if parsed.echoed:
        return "reason echoes the format instruction"
    if not fits_budget(format_answer(label, parsed.reason), count):      # its score would never be generated
        return (f"the answer is longer than the scoring budget ({count(format_answer(label, parsed.reason))} > "
                f"{ANSWER_TOKEN_BUDGET} tokens)")
    if dialogue is not None and not (_content_words(parsed.reason) & _content_words(dialogue)) \
            and not any("\u4e00" <= ch <= "\u9fff" for ch in parsed.reason):
        return "reason shares no content word with the dialogue (ungrounded)"
    return None


def build_rationales(teacher: Teacher, instances: list[AspectInstance], retries: int = 2,
                     on_batch: Callable[[int], None] | None = None, batch_size: int = 9) -> RationaleResult:
    """Ask the teacher for every labelled instance; keep valid answers, record rejects (each with
    what it answered: ``dataset.teacher_record_of``)."""
    from mllm_dr.dataset import teacher_record_of

    result = RationaleResult()
    labelled = [i for i in instances if i.label is not None]
    for start in range(0, len(labelled), batch_size):
        pending = labelled[start:start + batch_size]
        for attempt in range(retries + 1):
            if not pending:
                break
            texts = teacher.answer(pending, attempt)
            still = []
            for inst, text in zip(pending, texts):
                why = validate(text, inst.label, inst.dialogue)
                if why is None:
                    result.accepted.append(teacher_record_of(inst) | {
                        "rationale": parse_answer(text).reason, "teacher": teacher.name, "attempts": attempt + 1})
                    result.first_try_accepted += attempt == 0
                else:
                    result.rejects.append(teacher_record_of(inst) | {"attempt": attempt + 1, "why": why,
                                                                     "text": text[:500]})
                    still.append(inst)
            pending = still
        result.total += min(batch_size, len(labelled) - start)
        if on_batch:
            on_batch(min(batch_size, len(labelled) - start))
    return result


def make_teacher(url: str | None = None, model: str | None = None, path=None, max_new_tokens: int = 40) -> Teacher:
    """The teacher a site asked for: an endpoint (url + model), a local folder, or the embedded default."""
    if bool(url) != bool(model):
        raise InputError("--teacher-url and --teacher-model go together")
    if url and path:
        raise InputError("choose either --teacher-url or --teacher-path")
    if url:
        return OpenAICompatibleTeacher(url, model)
    from mllm_dr.base_model import load_base

    lm, tok, info = load_base(str(path) if path else "smollm2")
    return LocalTeacher(lm, tok, f"local:{info.name}" + ("" if path else "+prefilled"), prefill=path is None,
                        max_new_tokens=max_new_tokens)


def run_rationales(ws, teacher: Teacher, retries: int = 2, progress: Progress = None) -> dict:
    """Rationales for every labelled train/dev instance of the workspace not done yet.

    Resumable: accepted instances and final rejects are skipped while they are current (the same
    quote, label and dialogue: ``dataset.is_current``); both files are rewritten after each
    participant, so an interruption loses at most one participant's answers.
    """
    from mllm_dr.dataset import is_current, labelled_training_instances, split_stale
    from mllm_dr.workspace import read_jsonl, write_jsonl

    instances = labelled_training_instances(ws)
    accepted, rejects = read_jsonl(ws.rationales_path), read_jsonl(ws.rejects_path)
    # written for another quote (an earlier selector), label or dialogue: asked again, so none trains
    # on a stale answer; a final reject of another quote, label or dialogue no longer settles its item
    kept, stale = split_stale(accepted, instances)
    if stale:
        accepted = kept
        write_jsonl(ws.rationales_path, accepted)
    by_key = {(i.participant, i.item): i for i in instances}
    done = {(r["participant"], r["item"]) for r in accepted} | {
        (r["participant"], r["item"]) for r in rejects
        if r.get("final") and (r["participant"], r["item"]) in by_key and is_current(r, by_key[(r["participant"], r["item"])])}
    todo: dict[str, list[AspectInstance]] = {}
    for inst in instances:
        if (inst.participant, inst.item) not in done:
            todo.setdefault(inst.participant, []).append(inst)
    prog.start(progress, "rationales", sum(map(len, todo.values())))
    n_ok = n_total = n_first = 0
    for insts in todo.values():
        res = build_rationales(teacher, insts, retries=retries, batch_size=len(insts))
        failed = {(i.participant, i.item) for i in insts} - {(a["participant"], a["item"]) for a in res.accepted}
        for r in res.rejects:
            r["final"] = (r["participant"], r["item"]) in failed and r["attempt"] == retries + 1
        accepted += res.accepted
        rejects += res.rejects
        write_jsonl(ws.rationales_path, accepted)
        write_jsonl(ws.rejects_path, rejects)
        n_ok, n_total, n_first = n_ok + len(res.accepted), n_total + res.total, n_first + res.first_try_accepted
        prog.advance(progress, len(insts))
    return {"teacher": teacher.name, "instances": n_total, "accepted": n_ok, "first_try_accepted": n_first,
            "acceptance_rate": (n_ok / n_total) if n_total else None, "already_done": len(done),
            "stale_asked_again": len(stale),
            "rationales_file": str(ws.rationales_path), "rejects_file": str(ws.rejects_path)}
