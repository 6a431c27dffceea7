"""Session 46: a review of the teacher-rationale validation and backends (mllm_dr/rationales.py).

1. an explicit score claim other than the label is refused; 2. quotes must be the item's evidence turn;
3. an answer cut by the teacher's token limit is refused; 4. another teacher re-asks final rejects, --redo
re-asks all; 5. endpoint replies that crashed are rejects or one-line errors, 429/5xx retried; 6. an API key
from the environment, --max-new-tokens sent as max_tokens; 7. a teacher answering fewer prompts is an error;
8. `already_done` counts only today's instances. The fake teachers and the fake urlopen are inputs."""

from __future__ import annotations

import http.client
import io
import json
import urllib.error
from types import SimpleNamespace

import pytest

from mllm_dr.aspects import AspectInstance
from mllm_dr.errors import InputError
import mllm_dr.rationales as R        # as a module: each test fails on its own where a name is missing

SLEEP = "i lie awake most nights, it is hard to fall asleep"
TIRED = "i feel tired all day, and i have no energy at all"


def _inst(item="Sleep", label=2, evidence=SLEEP, participant="p1"):
    dialogue = f"Ellie: how are you sleeping\nParticipant: {evidence}" if evidence else "Ellie: hello\nParticipant: fine"
    return AspectInstance(participant, item, label, dialogue, 2, 2, evidence=evidence)


def _answer(reason, label=2):
    return f"Evaluation Result: {label}\nEvaluation Reason: {reason}"


GOOD = 'The participant said "i lie awake most nights", which shows sleep trouble on most nights.'


# ----------------------------------------------------------------------------- 1: a claim of another score
@pytest.mark.parametrize("claim, same", [
    ("which suggests a score of 3.", "which suggests a score of 2."),
    ("so the score is 3.", "so the score is 2."),
    ("and I would rate this a 1 (several days).", "and I would rate this a 2 (more than half the days)."),
    ("the score: 3.", "the score: 2."),
    ("giving it a 3 overall.", "giving it a 2 overall."),
    ("which is 3 out of 3.", "which is 2 out of 3."),
    ("1/3 here.", "2/3 here."),
    ("which suggests a score of three.", "which suggests a score of two."),
])
def test_a_reason_claiming_another_score_than_its_label_is_refused(claim, same):
    dialogue = f"Participant: {SLEEP}"
    why = R.validate(_answer(f"The participant lies awake most nights, {claim}"), 2, dialogue)
    assert why is not None and "claims a score" in why, claim
    # the same reason claiming the label is fine: the check reads the number, not the phrasing
    assert R.validate(_answer(f"The participant lies awake most nights, {same}"), 2, dialogue) is None, same


@pytest.mark.parametrize("reason", [
    "The participant lies awake three or four nights a week, most nights.",
    "She rated three or four nights a week as bad, lying awake most nights.",
    "The participant has lain awake for 2 weeks, given 2 weeks of stress.",
    "The participant lies awake 2 out of 3 nights, on most nights.",
    "The participant rated one of the questions as hard; she lies awake most nights.",
    "The participant gave 2 answers about sleep and gave one example of lying awake most nights.",
    "A score of 0 means not at all; she lies awake on most nights.",
    "She lies awake more than a score of 1 would suggest, on most nights.",
    'The participant said "i would rate my sleep a 3", lying awake most nights.',
    "The participant lies awake until 3 am on most nights.",
])
def test_numbers_that_are_no_score_claims_are_not_refused(reason):
    assert R.validate(_answer(reason), 2, f"Participant: {SLEEP}") is None, reason


# ----------------------------------------------------------------------------- 2: quotes are the evidence
def test_every_quote_mark_the_scorer_reads_opens_and_closes_a_quote_for_the_teacher_too():
    """The scorer reads „ « » as quote marks too (quotes.QUOTE_MARKS); the validator counted only " and “ ”, so an
    open « quote holding other words was accepted and a closed „...“ one refused as open (a second read, session 46)."""
    sleep = _inst()
    open_guillemet = "The participant said \u00abi lie awake most nights and it ruins my day. This fits a score of 2."
    why = R.validate(_answer(open_guillemet), 2, sleep.dialogue, evidence=sleep.evidence)
    assert why is not None and "quote open" in why
    german = "The participant said \u201ei lie awake most nights\u201c, which shows sleep trouble on most nights."
    assert R.validate(_answer(german), 2, sleep.dialogue, evidence=sleep.evidence) is None


def test_a_quote_that_is_not_the_items_evidence_turn_is_refused():
    sleep = _inst()
    assert R.validate(_answer(GOOD), 2, sleep.dialogue, evidence=sleep.evidence) is None
    other = 'The participant said "i feel tired all day", which shows sleep trouble on most nights.'
    why = R.validate(_answer(other), 2, sleep.dialogue, evidence=sleep.evidence)
    assert why is not None and "not the item's evidence" in why
    curly = "The participant said \u201ci feel tired all day\u201d, which shows sleep trouble on most nights."
    assert "not the item's evidence" in R.validate(_answer(curly), 2, sleep.dialogue, evidence=sleep.evidence)
    none = _inst(evidence=None)
    why = R.validate(_answer(GOOD), 2, none.dialogue + f" {SLEEP}", evidence=None)
    assert why is not None and "no evidence turn" in why
    # build_rationales checks against each instance's own evidence
    res = R.build_rationales(_Fixed({"Sleep": _answer(other)}), [sleep], retries=0)
    assert not res.accepted and "not the item's evidence" in res.rejects[0]["why"]


# ----------------------------------------------------------------------------- 3: cut by the token limit
CUT_TEXT = ('Evaluation Result: 2\nEvaluation Reason: The participant said "I lie awake most nights. It is hard", '
            'which shows that sleep trouble happens on most of the nights and the participant')


def test_an_answer_cut_by_the_teachers_token_limit_is_refused():
    dialogue = "Participant: I lie awake most nights. It is hard"
    why = R.validate(CUT_TEXT, 2, dialogue)
    assert why is not None and "cut" in why
    assert "quote open" in R.validate(_answer('The participant said "i lie awake most nights.'), 2, dialogue)
    # the same text marked cut by its teacher (no EOS / finish_reason "length") is refused even when it looks whole
    whole = R.TeacherText.of(_answer(GOOD), R.CUT)
    res = R.build_rationales(_Fixed({"Sleep": whole}), [_inst()], retries=0)
    assert not res.accepted and res.rejects[0]["why"] == R.CUT


def _fake_tok(decode):
    """A tokenizer class for a fake local teacher: EOS and pad 9, every prompt 3 ids; ``decode(rows)`` the texts."""
    import torch

    class Tok:
        eos_token_id, pad_token_id, padding_side = 9, 9, "right"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "prompt "

        def __call__(self, prompts, **kw):
            enc = {"input_ids": torch.ones(len(prompts), 3, dtype=torch.long)}
            return SimpleNamespace(to=lambda device: enc)

        def batch_decode(self, rows, skip_special_tokens):
            return decode(rows)

    return Tok


def test_a_local_teacher_marks_an_answer_that_ended_at_the_limit_not_at_eos():
    import torch

    from mllm_dr.rationales import LocalTeacher

    texts = {5: " fits a score", 6: " fits a score of 2. The participant also", 7: " fits a score of 2."}

    Tok = _fake_tok(lambda rows: [texts[int(row[0])] for row in rows])

    class Model:
        device = "cpu"

        def generate(self, input_ids, max_new_tokens, **kw):
            # rows 0 and 1 stopped at the limit (no EOS), row 2 at EOS
            new = torch.tensor([[5] * max_new_tokens, [6] * max_new_tokens, [7, 7, 9, 9]])
            return torch.cat([input_ids, new], dim=1)

    three = [_inst(), _inst(), _inst()]
    outs = LocalTeacher(Model(), Tok(), "t", prefill=True, max_new_tokens=4).answer(three, 0)
    # the prefilled default teacher writes one sentence: one it finished before the limit ends there, whole
    assert [o.problem for o in outs] == [R.CUT, None, None] and outs[1].endswith("fits a score of 2.")
    assert R.validate(outs[1], 2, three[1].dialogue, evidence=SLEEP) is None
    # a teacher writing its own answer is cut whenever it reached the limit
    outs = LocalTeacher(Model(), Tok(), "t", prefill=False, max_new_tokens=4).answer(three, 0)
    assert [o.problem for o in outs] == [R.CUT, R.CUT, None]


def test_a_chat_models_own_end_of_turn_token_ends_its_answer():
    """A chat model whose turn ends with a token only its generation config lists (Llama-3's <|eot_id|>, here 11;
    the tokenizer's EOS is 9) was never stopped by it, and every answer that ended so was refused as cut."""
    import torch

    seen = {}

    Tok = _fake_tok(lambda rows: [_answer(GOOD)] * len(rows))

    class Model:
        device = "cpu"
        generation_config = SimpleNamespace(eos_token_id=[11, 9])

        def generate(self, input_ids, max_new_tokens, eos_token_id, pad_token_id, **kw):
            seen["eos"] = eos_token_id
            ends = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
            # row 0 ends its turn with 11 (generation stops there only when told; else it runs on to the
            # limit), row 1 with the tokenizer's EOS, row 2 never: each as generate pads it
            rows = []
            for wants in ([7, 11] + [7] * 8, [7, 9] + [7] * 8, [7] * 10):
                stop = next((k + 1 for k, t in enumerate(wants[:max_new_tokens]) if t in ends), max_new_tokens)
                rows.append(wants[:stop] + [pad_token_id] * (max_new_tokens - stop))
            return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    outs = R.LocalTeacher(Model(), Tok(), "t", prefill=False, max_new_tokens=4).answer([_inst()] * 3, 0)
    assert [o.problem for o in outs] == [None, None, R.CUT]
    assert sorted(seen["eos"]) == [9, 11]              # generation stops at either
    from mllm_dr.generation import end_token_ids

    assert end_token_ids(Model(), Tok()) == [9, 11]
    assert end_token_ids(SimpleNamespace(), Tok()) == [9]      # a model without a generation config


def test_a_local_teachers_default_limit_lets_it_write_every_answer_the_budget_trains(monkeypatch, tmp_path):
    """--teacher-path (a model writing the whole answer) defaulted to 40 new tokens: answers of 41 to
    ANSWER_TOKEN_BUDGET tokens were cut, so refused. The prefilled default teacher (one sentence) keeps 40."""
    from mllm_dr import base_model
    from mllm_dr.parsing import ANSWER_TOKEN_BUDGET

    loaded = []
    monkeypatch.setattr(base_model, "load_base", lambda spec, *a, **k: loaded.append(spec) or (
        "lm", "tok", SimpleNamespace(name=spec)))
    local = R.make_teacher(path=tmp_path)
    assert loaded == [str(tmp_path)] and local.prefill is False
    assert local.max_new_tokens >= ANSWER_TOKEN_BUDGET + 8          # the budget and room to end the answer
    default = R.make_teacher()
    assert default.prefill is True and default.max_new_tokens == 40
    assert R.make_teacher(path=tmp_path, max_new_tokens=50).max_new_tokens == 50      # an explicit limit is kept


# ----------------------------------------------------------------------------- 4 and 8: run_rationales
class _Fixed:
    """A teacher answering each item with a fixed text; records what it was asked."""

    def __init__(self, texts, name="fixed"):
        self.texts, self.name, self.asked = texts, name, []

    def answer(self, instances, attempt):
        self.asked += [(i.participant, i.item) for i in instances]
        return [self.texts[i.item] for i in instances]


@pytest.fixture
def ws(tmp_path, monkeypatch):
    insts = [_inst("Sleep", 2, SLEEP), _inst("Tired", 3, TIRED)]
    monkeypatch.setattr("mllm_dr.dataset.labelled_training_instances", lambda ws: insts)
    return SimpleNamespace(rationales_path=tmp_path / "rationales.jsonl", rejects_path=tmp_path / "rejects.jsonl")


def test_another_teacher_is_asked_again_for_final_rejects_and_redo_asks_everything(ws):
    from mllm_dr.workspace import read_jsonl

    tired_ok = _answer('The participant said "i feel tired all day", which shows tiredness every day.', 3)
    weak = _Fixed({"Sleep": "no idea", "Tired": tired_ok}, "weak")
    assert R.run_rationales(ws, weak, retries=0)["accepted"] == 1
    assert all(r["teacher"] == "weak" and r["final"] for r in read_jsonl(ws.rejects_path))
    again = _Fixed({"Sleep": "no idea", "Tired": tired_ok}, "weak")
    assert R.run_rationales(ws, again, retries=0)["already_done"] == 2 and again.asked == []  # the same teacher: settled
    strong = _Fixed({"Sleep": _answer(GOOD), "Tired": tired_ok}, "strong")
    summary = R.run_rationales(ws, strong, retries=0)
    assert strong.asked == [("p1", "Sleep")] and summary["accepted"] == 1 and summary["already_done"] == 1
    assert {r["item"]: r["teacher"] for r in read_jsonl(ws.rationales_path)} == {"Sleep": "strong", "Tired": "weak"}
    redo = _Fixed({"Sleep": _answer(GOOD), "Tired": tired_ok}, "strong")
    summary = R.run_rationales(ws, redo, retries=0, redo=True)
    assert sorted(redo.asked) == [("p1", "Sleep"), ("p1", "Tired")] and summary["already_done"] == 0
    rows = read_jsonl(ws.rationales_path)
    assert len(rows) == 2 and {r["teacher"] for r in rows} == {"strong"}       # replaced, not duplicated


def test_already_done_counts_only_todays_instances(ws):
    from mllm_dr.dataset import teacher_record_of
    from mllm_dr.workspace import write_jsonl

    sleep = _inst()
    gone = _inst("Sleep", 2, SLEEP, participant="gone")              # a participant no longer in the corpus
    write_jsonl(ws.rationales_path, [teacher_record_of(i) | {"rationale": "r", "teacher": "t"} for i in (sleep, gone)])
    teacher = _Fixed({"Tired": _answer('The participant said "i feel tired all day", which shows tiredness daily.', 3)})
    summary = R.run_rationales(ws, teacher, retries=0)
    assert summary["already_done"] == 1 and teacher.asked == [("p1", "Tired")]


# ----------------------------------------------------------------------------- 7: fewer answers than prompts
def test_a_teacher_answering_fewer_prompts_than_it_was_given_is_an_error():
    class Short:
        name = "short"

        def answer(self, instances, attempt):
            return [_answer(GOOD)]

    with pytest.raises(InputError, match="short returned 1 answers for 2 prompts"):
        R.build_rationales(Short(), [_inst(), _inst("Tired", 3, TIRED)], retries=0)


def test_a_custom_teacher_returning_none_is_a_reject_not_a_crash():
    res = R.build_rationales(_Fixed({"Sleep": None}), [_inst()], retries=0)
    assert not res.accepted and res.rejects[0]["why"] == R.NO_TEXT


# ----------------------------------------------------------------------------- 5 and 6: the endpoint
class _Reply(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _completion(content, finish="stop", **extra):
    return json.dumps({"choices": [{"message": {"content": content}, "finish_reason": finish}], **extra}).encode()


class _FakeUrlopen:
    """Replies in turn: bytes (a 200 body) or an exception to raise; records the requests."""

    def __init__(self, *replies):
        self.replies, self.requests = list(replies), []

    def __call__(self, req, timeout):
        self.requests.append(req)
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return _Reply(reply)


def _endpoint(fake, **kw):
    waits = []
    teacher = R.OpenAICompatibleTeacher("http://llm.test/v1", "m", urlopen=fake, sleep=waits.append, **kw)
    return teacher, waits


def _http_error(code):
    return urllib.error.HTTPError("http://llm.test/v1/chat/completions", code, "busy", {}, None)


def test_endpoint_replies_without_text_are_rejects_and_broken_replies_one_line_errors():
    teacher, _ = _endpoint(_FakeUrlopen(_completion(None), _completion(_answer(GOOD), "length")))
    res = R.build_rationales(teacher, [_inst()], retries=1)
    assert [r["why"] for r in res.rejects] == [R.NO_TEXT, R.CUT] and not res.accepted
    for reply, what in ((json.dumps({"choices": []}).encode(), "no choices"), (b"<html>", "not JSON"),
                        (http.client.RemoteDisconnected("closed"), "RemoteDisconnected"),
                        (http.client.IncompleteRead(b""), "IncompleteRead"),
                        (urllib.error.URLError(ConnectionRefusedError(111, "refused")), "refused"),
                        (_http_error(401), "HTTP 401")):
        teacher, _ = _endpoint(_FakeUrlopen(reply))
        with pytest.raises(InputError) as err:
            teacher.answer([_inst()], 0)
        assert str(err.value).startswith("http://llm.test/v1/chat/completions: ") and what in str(err.value)
        assert "\n" not in str(err.value)


def test_a_busy_endpoint_is_tried_again_with_backoff():
    fake = _FakeUrlopen(_http_error(429), _http_error(503), _completion(_answer(GOOD)))
    teacher, waits = _endpoint(fake, backoff=(0.5, 1.0, 2.0))
    assert teacher.answer([_inst()], 0) == [_answer(GOOD)] and waits == [0.5, 1.0]
    teacher, waits = _endpoint(_FakeUrlopen(*[_http_error(503)] * 4), backoff=(0.5, 1.0, 2.0))
    with pytest.raises(InputError, match=r"HTTP 503 busy \(after 4 tries\)"):
        teacher.answer([_inst()], 0)
    assert waits == [0.5, 1.0, 2.0]


def test_the_api_key_comes_from_the_environment_and_max_new_tokens_is_sent(monkeypatch, tmp_path):
    monkeypatch.setenv("S46_TEACHER_KEY", "sk-secret-46")
    teacher = R.make_teacher("http://llm.test/v1", "m", max_new_tokens=77, api_key_env="S46_TEACHER_KEY")
    fake = _FakeUrlopen(_completion(_answer(GOOD)))
    teacher._urlopen = fake
    teacher.answer([_inst()], 0)
    req = fake.requests[0]
    assert req.get_header("Authorization") == "Bearer sk-secret-46"
    assert json.loads(req.data)["max_tokens"] == 77
    assert "sk-secret" not in teacher.name
    assert R.make_teacher("http://llm.test/v1", "m").max_tokens == 200          # the endpoint's default, as before
    monkeypatch.delenv("S46_TEACHER_KEY")
    with pytest.raises(InputError, match="S46_TEACHER_KEY"):
        R.make_teacher("http://llm.test/v1", "m", api_key_env="S46_TEACHER_KEY")
    with pytest.raises(InputError, match="--teacher-api-key-env"):
        R.make_teacher(path=tmp_path, api_key_env="S46_TEACHER_KEY")


def test_the_cli_command_has_the_new_options():
    import inspect

    from cli.site_prepare import rationales

    params = inspect.signature(rationales).parameters
    assert params["redo"].default.param_decls == ("--redo",)
    assert "--teacher-api-key-env" in params["teacher_api_key_env"].default.param_decls
    assert params["max_new_tokens"].default.default is None
