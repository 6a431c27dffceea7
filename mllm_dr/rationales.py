"""Teacher rationales (paper section 3.1), built on the site's premises.

A teacher is told the true item score (Table 1) and writes "Evaluation Result: N /
Evaluation Reason: ...". Answers are validated (format, N equals the label, a reason
of a few words); failures are retried with sampling and every reject is recorded.
Teachers: an OpenAI-compatible endpoint on the hospital network, a local HF model,
or (default) the embedded base model with the result pre-filled to the label.
Nothing is sent anywhere but the configured teacher.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Protocol

from mllm_dr.aspects import AspectInstance
from mllm_dr.errors import InputError
from mllm_dr.generation import chat_prompt, generate_texts
from mllm_dr.parsing import (_REASON, _RESULT, ANSWER_TOKEN_BUDGET, estimated_answer_tokens, first_block, fits_budget,
                             format_answer, parse_answer, SENTENCE_ENDS)
from mllm_dr.phq import ITEM_TOPICS, MAX_ITEM
from mllm_dr.quotes import MIN_CUT_WORDS, allowed_quotes, quote_allowed, quotes_in_reason, sentence_ends, training_quotes
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
            if quote_fits(quote, inst.label, count):
                return _quoted_parts(quote, inst.label)
        return f"{long_answer(inst.item)}", f" fits a score of {inst.label}."
    return f"{no_statement(inst.item)};", f" a score of {inst.label} is given."


def long_answer(item: str) -> str:
    """How a rationale opens when the item's evidence turn has no quote whose answer fits the budget."""
    return f"The participant's long answer on {ITEM_TOPICS[item]}"


def _quoted_parts(quote: str, label) -> tuple[str, str]:
    return f'The participant said "{quote}", which', f" fits a score of {label}."


def quote_fits(quote: str, label=MAX_ITEM, count: Callable[[str], int] = estimated_answer_tokens) -> bool:
    """Whether the training answer quoting ``quote`` (``_extractive_parts``) fits ANSWER_TOKEN_BUDGET by ``count``
    (the answer's tokens with its EOS): the one budget test of a quote, for the training answers and the scorer's
    and validator's allowed quotes (``scoring_quotes``: the label, one digit, counts the same for any score)."""
    return fits_budget(format_answer(label, "".join(_quoted_parts(quote, label))), count)


def scoring_quotes(evidence: str | None) -> frozenset[str]:
    """What a rationale may quote for an item whose evidence turn is ``evidence``, for the scorer
    (``quotes.VerbatimQuotes``, either engine) and the teacher's validator (``validate``): the texts of
    ``quotes.allowed_quotes`` whose training answer fits the answer's budget (``quote_fits``, by the estimate the
    training answers are cut by). Empty for an item with no evidence turn and for one whose turn has no quote
    that fits: a training answer never quotes it (``_extractive_parts``: "The participant's long answer on ..."),
    and a quote held open to a longer end ran out of the budget inside the quote, with no score (session 47's
    second read: "Yes, <a run-on clause of 50 words>")."""
    return frozenset(q for q in allowed_quotes(evidence) if quote_fits(q))


def scoring_opening(item: str, evidence: str | None) -> str | None:
    """The words the scorer makes an item's reason open with (``quotes.VerbatimQuotes`` ``openings``), as its
    training answers open where the item has nothing to quote: ``no_statement`` without an evidence turn,
    ``long_answer`` when no quote of it fits the budget (``scoring_quotes``); None (the model's own) else."""
    if not evidence:
        return no_statement(item)
    return None if scoring_quotes(evidence) else long_answer(item)


class Teacher(Protocol):
    name: str

    def answer(self, instances: list[AspectInstance], attempt: int) -> list[str]: ...


class TeacherText(str):
    """A teacher's answer with what is known of how it ended: ``problem`` (why it cannot be used whatever it
    says: "cut by the teacher's token limit" when generation stopped at the limit, not at EOS / OpenAI's
    ``finish_reason == "length"``; "teacher returned no text") or None. A teacher may return plain str."""

    problem: str | None = None

    @classmethod
    def of(cls, text: str, problem: str | None = None) -> "TeacherText":
        out = cls(text)
        out.problem = problem
        return out


CUT = "cut by the teacher's token limit"
NO_TEXT = "teacher returned no text"


# A local teacher's token limit per answer unless --max-new-tokens says otherwise. The prefilled default teacher
# completes one sentence after the label and its opening (it stops at that sentence's end): 40. A teacher writing
# the whole answer (--teacher-path) must be able to write any answer the scorer's budget lets train (up to
# ANSWER_TOKEN_BUDGET tokens, counted with the student's tokenizer, EOS included) and end it: an answer it cannot
# end before its limit is refused as cut (session 46), so its limit is the budget plus a margin (another tokenizer,
# a blank line or a markup the parser accepts). An answer over the budget is still refused by ``validate``.
PREFILLED_MAX_NEW_TOKENS = 40
LOCAL_MAX_NEW_TOKENS = ANSWER_TOKEN_BUDGET + 32


class LocalTeacher:
    """A causal LM on this machine. ``prefill`` writes the label into the answer (the default teacher)."""

    def __init__(self, model, tok, name: str, prefill: bool, max_new_tokens: int = PREFILLED_MAX_NEW_TOKENS):
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
        answers = []
        for inst, (new, ended) in zip(instances, outs):
            prefix = self._prefix(inst)
            if self.prefill:        # the default teacher completes one sentence: it ends at that sentence's end
                stop = _first_sentence_end(prefix, new)
                if stop is not None:
                    new, ended = new[:stop], True
            answers.append(TeacherText.of(prefix + new, None if ended else CUT))
        return answers


def _first_sentence_end(prefix: str, new: str) -> int | None:
    """Where in ``new`` (generated after ``prefix``) the first sentence ends outside a quote (the index after
    its mark), or None: ``quotes.sentence_ends``, the parser's rule too (session 47: this one knew only " and
    “ ”, and took "vs. weekends" for an end). The prefilled default teacher is asked for one sentence after its
    opening (the extractive rationale's, ``_extractive_parts``); a 135M model then goes on ("... The participant
    also") until its token limit, and that answer would be refused as cut although its sentence is whole."""
    ends = sentence_ends(prefix + new, len(prefix))
    return ends[0] - len(prefix) + 1 if ends else None


RETRY_STATUS = (429, 500, 502, 503, 504)
BACKOFF_S = (1.0, 4.0, 10.0)        # the waits before the retries of a 429/5xx reply (one try, then three more)
ENDPOINT_MAX_TOKENS = 200           # max_tokens of an endpoint's answer unless --max-new-tokens says otherwise


class OpenAICompatibleTeacher:
    """POST {url}/chat/completions on the hospital network (vLLM, TGI, Ollama, ...).

    A 429 or 5xx reply is tried again after each wait of ``backoff`` (seconds); any other failure (no connection,
    another HTTP status, a reply that is not a chat completion) stops the run with one line naming the endpoint.
    A reply with no text (``"content": null``) or cut by ``max_tokens`` (``finish_reason == "length"``) is a
    reject. ``api_key`` goes in the Authorization header only (never into a name, a message or a file)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_tokens: int = ENDPOINT_MAX_TOKENS, backoff: tuple[float, ...] = BACKOFF_S,
                 urlopen: Callable = urllib.request.urlopen, sleep: Callable[[float], None] = time.sleep):
        self.url = url.rstrip("/") + ("/chat/completions" if not url.rstrip("/").endswith("/chat/completions") else "")
        self.model, self.api_key, self.timeout, self.name = model, api_key, timeout, f"openai:{model}"
        self.max_tokens, self.backoff, self._urlopen, self._sleep = max_tokens, tuple(backoff), urlopen, sleep

    def answer(self, instances: list[AspectInstance], attempt: int) -> list[str]:
        return [self._one(i, attempt) for i in instances]

    def _fail(self, what: str) -> InputError:
        return InputError(f"teacher endpoint failed: {what}", self.url)

    def _one(self, inst: AspectInstance, attempt: int) -> str:
        body = json.dumps({"model": self.model, "messages": inst.teacher_messages(),
                           "temperature": 0.0 if attempt == 0 else 0.8, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        try:
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        except ValueError as err:                       # not an http(s) URL
            raise self._fail(str(err)) from None
        for wait in (*self.backoff, None):
            try:
                with self._urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS or wait is None:
                    tries = "" if err.code not in RETRY_STATUS else f" (after {len(self.backoff) + 1} tries)"
                    raise self._fail(f"HTTP {err.code} {err.reason}{tries}") from None
                self._sleep(wait)
            except (http.client.HTTPException, OSError, ValueError) as err:  # URLError, timeouts, RemoteDisconnected
                detail = " ".join(str(err).split())
                raise self._fail(f"{type(err).__name__}: {detail}" if detail else type(err).__name__) from None
        try:
            reply = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise self._fail("the reply is not JSON") from None
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
                or not isinstance(choices[0].get("message"), dict):
            raise self._fail("the reply has no choices[0].message (not an OpenAI chat completion)")
        content = choices[0]["message"].get("content")
        if not isinstance(content, str) or not content.strip():
            return TeacherText.of("" if not isinstance(content, str) else content, NO_TEXT)
        return TeacherText.of(content, CUT if choices[0].get("finish_reason") == "length" else None)


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


# An explicit score claim in a teacher's reason ("...which suggests a score of 3.", "so the score is 3", "I would rate
# this a 1", "2 out of 3", "2/3"): the teacher's validator refuses one that differs from the label. Stricter than
# the scorer's ``parsing.contradicts`` (the kit's own phrasings only): a training rationale arguing for another
# score than its label teaches the student to contradict itself. Not claims: numbers of things ("three or four
# nights", "given 2 weeks", "2 out of 3 nights"), the scale recited or compared ("a score of 0 means not at all",
# "more than a score of 1"), and anything inside a quote (the participant's words).
_N = r"(?P<n>[0-3]|zero|one|two|three)(?![0-9]|[.,][0-9])"
_UNITS = (r"(?:(?:more|other|extra|full|whole|bad|good|poor|sleepless|separate|straight|long|short)\s+)?"
          r"(?:weeks?|days?|nights?|times?|hours?|hrs?|minutes?|mins?|months?|years?|examples?|reasons?|meals?|"
          r"people|persons?|items?|things?|questions?|am|pm|o'?clock)\b")
_COUNT = r"(?:[0-9]+|zero|one|two|three|four|five|six|seven|eight|nine|ten|a\s+few|several|many)"
# after the number: not a count of something ("2 weeks", "three or four nights", "2-3 days", "one of the worst")
_NOT_A_COUNT = (rf"(?!\s*(?:%|\+)|\s*[-–—]\s*(?:[0-9]|{_UNITS})|\s+(?:{_UNITS}|of\b)"
                rf"|\s*(?:or|to|and|[-–—/])\s*{_COUNT}\s+{_UNITS})")
_CLAIMS = [re.compile(p + _NOT_A_COUNT, re.IGNORECASE) for p in (
    rf"\bscor(?:e|ed|es|ing)\s*(?:of|is|was|would\s+be|should\s+be|will\s+be|[:=])?\s*(?:an?\s+)?{_N}",
    rf"\brating\s*(?:of|is|was|would\s+be|should\s+be|[:=])?\s*(?:an?\s+)?{_N}",
    r"\b(?:rate|rates|rated|give|gives|gave|given|giving|assign|assigns|assigned|assigning)\b"
    r"(?:\s+(?:it|this|that|him|her|them|the\s+item|this\s+item|the\s+participant|the\s+patient|as|at|with))*"
    rf"\s+(?:an?\s+)?(?:(?:score|rating)\s+(?:of\s+)?)?{_N}"     # then what follows a score, not a noun ("gave 2 answers")
    r"(?=\s*(?:[.,;:!?()\[\]]|$)|\s+(?:because|as|since|for|on|in|here|overall|given|due|based|out\s+of)\b)",
    rf"\b{_N}\s*(?:out\s+of|/)\s*(?:3|three)\b(?![0-9])")]
_WORD_N = {"zero": 0, "one": 1, "two": 2, "three": 3}
_COMPARED = re.compile(r"\b(?:than|short\s+of|above|below|under|over|beyond|exceeds?|exceeding|at\s+least|at\s+most|"
                       r"not|rather\s+than|instead\s+of|between|from)\s+(?:an?\s+|the\s+)?$", re.IGNORECASE)
_RECITED = re.compile(r"\s*(?:means?|meaning|would\s+mean|corresponds?|stands?\s+for|is\s+(?:defined|reserved|for)|"
                      r"requires?|would\s+(?:require|need))\b", re.IGNORECASE)
_QUOTED = re.compile(r'"[^"]*"|“[^”]*”')


def score_claims(reason: str) -> set[int]:
    """The scores ``reason`` explicitly claims outside quotes (see ``_CLAIMS``)."""
    text = _QUOTED.sub('""', reason)
    out = set()
    for pattern in _CLAIMS:
        for m in pattern.finditer(text):
            if _COMPARED.search(text[max(0, m.start() - 30):m.start()]) or _RECITED.match(text, m.end()):
                continue
            n = m.group("n").lower()
            out.add(_WORD_N[n] if n in _WORD_N else int(n))
    return out


NOT_CHECKED = object()      # validate's evidence when the caller has none to check quotes against


def _reason_as_written(text: str) -> str:
    """The reason's first block as the teacher wrote it (``parse_answer``'s, before ``clean_reason`` drops an
    unfinished last sentence)."""
    m = _RESULT.search(text)
    r = _REASON.search(text, m.end() if m else 0)
    return first_block(r.group(1)) if r else ""


def validate(text: str, label: int, dialogue: str | None = None,
             count: Callable[[str], int] = estimated_answer_tokens, evidence=NOT_CHECKED) -> str | None:
    """None when acceptable, else why not.

    Beyond format and label, the reason must not echo the format instruction (``parsing.ECHOES``, decided
    by the parser), must claim no other score than the label (``score_claims``), must end a sentence
    outside a quote (an answer cut by the teacher's token limit does not), its quotes must be what the scorer
    lets the model quote for the item (``scoring_quotes(evidence)``: none when the item has no
    evidence turn or no quote of it fits the budget; not checked when ``evidence`` is not given), the answer it trains must fit
    ANSWER_TOKEN_BUDGET (``count``: an answer's tokens with its EOS) and, when the dialogue is given, the
    reason must share a content word with it (a grounding check).
    """
    if not isinstance(text, str) or not text.strip():
        return NO_TEXT
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
    written = _reason_as_written(text)
    if quotes_in_reason(f"Evaluation Reason: {written}")[1] is not None:     # the scorer's quote marks (QUOTE_MARKS)
        return "the reason leaves a quote open (cut by the teacher's token limit?)"
    other = sorted(score_claims(written) - {label})
    if other:
        return f"the reason claims a score of {other[0]}, not the label {label}"
    if not written.endswith(SENTENCE_ENDS):
        return "the reason does not end a sentence outside a quote (cut by the teacher's token limit?)"
    if evidence is not NOT_CHECKED:
        allowed = scoring_quotes(evidence)
        closed, _ = quotes_in_reason(f"Evaluation Reason: {written}")
        bad = next((q for q in closed if not quote_allowed(q, allowed)), None)
        if bad is not None:
            return ("the reason quotes text although the item has no evidence turn" if not evidence else
                    "the reason quotes text although no quote of the item's evidence turn fits the answer budget"
                    if not allowed else
                    "the reason quotes words that are not the item's evidence turn (whole or cut at a clause, "
                    f"at least {MIN_CUT_WORDS} words, its answer within the budget: scoring_quotes)")
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
            texts = list(teacher.answer(pending, attempt))
            if len(texts) != len(pending):      # zip would drop the rest silently
                raise InputError(f"teacher {teacher.name} returned {len(texts)} answers for {len(pending)} prompts "
                                 f"(attempt {attempt + 1}); a teacher answers every instance it is given")
            still = []
            for inst, text in zip(pending, texts):
                why = getattr(text, "problem", None) or validate(text, inst.label, inst.dialogue,
                                                                 evidence=inst.evidence)
                if why is None:
                    result.accepted.append(teacher_record_of(inst) | {
                        "rationale": parse_answer(text).reason, "teacher": teacher.name, "attempts": attempt + 1})
                    result.first_try_accepted += attempt == 0
                else:
                    result.rejects.append(teacher_record_of(inst) | {
                        "teacher": teacher.name, "attempt": attempt + 1, "why": why,
                        "text": text[:500] if isinstance(text, str) else repr(text)[:500]})
                    still.append(inst)
            pending = still
        result.total += min(batch_size, len(labelled) - start)
        if on_batch:
            on_batch(min(batch_size, len(labelled) - start))
    return result


def make_teacher(url: str | None = None, model: str | None = None, path=None, max_new_tokens: int | None = None,
                 api_key_env: str | None = None) -> Teacher:
    """The teacher a site asked for: an endpoint (url + model; its API key read from the environment variable
    ``api_key_env``), a local folder, or the embedded default. ``max_new_tokens``: the answer's token limit
    (default PREFILLED_MAX_NEW_TOKENS, 40, for the embedded default, LOCAL_MAX_NEW_TOKENS, ANSWER_TOKEN_BUDGET + 32,
    for a local folder, ENDPOINT_MAX_TOKENS for an endpoint; session 46: a local folder's 40 cut, so refused, every
    answer of 41 to 64 tokens the budget allows)."""
    if bool(url) != bool(model):
        raise InputError("--teacher-url and --teacher-model go together")
    if url and path:
        raise InputError("choose either --teacher-url or --teacher-path")
    if api_key_env is not None and not url:
        raise InputError("--teacher-api-key-env is for a --teacher-url endpoint")
    if url:
        key = None
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise InputError(f"environment variable {api_key_env} (--teacher-api-key-env) is not set or empty")
        return OpenAICompatibleTeacher(url, model, api_key=key,
                                       max_tokens=ENDPOINT_MAX_TOKENS if max_new_tokens is None else max_new_tokens)
    if max_new_tokens is None:
        max_new_tokens = LOCAL_MAX_NEW_TOKENS if path else PREFILLED_MAX_NEW_TOKENS
    from mllm_dr.base_model import load_base

    lm, tok, info = load_base(str(path) if path else "smollm2")
    return LocalTeacher(lm, tok, f"local:{info.name}" + ("" if path else "+prefilled"), prefill=path is None,
                        max_new_tokens=max_new_tokens)


def run_rationales(ws, teacher: Teacher, retries: int = 2, progress: Progress = None, redo: bool = False) -> dict:
    """Rationales for every labelled train/dev instance of the workspace not done yet.

    Resumable: accepted instances and final rejects are skipped while they are current (the same
    quote, label and dialogue: ``dataset.is_current``); a final reject only while it is also this teacher's
    (another teacher is asked again; a reject recorded before session 46 names no teacher and still settles
    its item). ``redo``: every instance is asked again; a new accepted rationale replaces the earlier one
    (an instance the teacher fails keeps its earlier one). Both files are rewritten after each participant,
    so an interruption loses at most one participant's answers.
    """
    from mllm_dr.dataset import is_current, labelled_training_instances, read_teacher_records, split_stale
    from mllm_dr.workspace import read_jsonl, write_jsonl

    instances = labelled_training_instances(ws)
    # the accepted records as training reads them: a malformed line is one error naming file and line
    accepted, rejects = read_teacher_records(ws.rationales_path), read_jsonl(ws.rejects_path)
    # written for another quote (an earlier selector), label or dialogue: asked again, so none trains
    # on a stale answer; a final reject of another quote, label or dialogue no longer settles its item
    kept, stale = split_stale(accepted, instances)
    if stale:
        accepted = kept
        write_jsonl(ws.rationales_path, accepted)
    by_key = {(i.participant, i.item): i for i in instances}
    done = set() if redo else ({(r["participant"], r["item"]) for r in accepted} | {
        (r["participant"], r["item"]) for r in rejects
        if r.get("final") and r.get("teacher", teacher.name) == teacher.name
        and (r["participant"], r["item"]) in by_key and is_current(r, by_key[(r["participant"], r["item"])])})
    done &= set(by_key)             # records of instances no longer here are no work saved
    todo: dict[str, list[AspectInstance]] = {}
    for inst in instances:
        if (inst.participant, inst.item) not in done:
            todo.setdefault(inst.participant, []).append(inst)
    prog.start(progress, "rationales", sum(map(len, todo.values())))
    n_ok = n_total = n_first = 0
    for insts in todo.values():
        res = build_rationales(teacher, insts, retries=retries, batch_size=len(insts))
        new = {(a["participant"], a["item"]) for a in res.accepted}
        failed = {(i.participant, i.item) for i in insts} - new
        for r in res.rejects:
            r["final"] = (r["participant"], r["item"]) in failed and r["attempt"] == retries + 1
        accepted = [r for r in accepted if (r["participant"], r["item"]) not in new] + res.accepted
        rejects += res.rejects
        write_jsonl(ws.rationales_path, accepted)
        write_jsonl(ws.rejects_path, rejects)
        n_ok, n_total, n_first = n_ok + len(res.accepted), n_total + res.total, n_first + res.first_try_accepted
        prog.advance(progress, len(insts))
    return {"teacher": teacher.name, "instances": n_total, "accepted": n_ok, "first_try_accepted": n_first,
            "acceptance_rate": (n_ok / n_total) if n_total else None, "already_done": len(done),
            "stale_asked_again": len(stale), "redo": redo,
            "rationales_file": str(ws.rationales_path), "rejects_file": str(ws.rejects_path)}
