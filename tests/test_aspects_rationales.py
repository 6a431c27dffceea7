import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from mllm_dr.aspects import approx_tokens, build_instances, load_question_map, reduce_dialogue
from mllm_dr.corpus import read_corpus
from mllm_dr.corpus.model import Turn
from mllm_dr.errors import InputError
from mllm_dr.parsing import parse_answer
from mllm_dr.rationales import OpenAICompatibleTeacher, build_rationales, validate
from conftest import FIXTURES


def test_reduction_keeps_relevant_turns_in_order():
    turns = [Turn("Participant", f"filler sentence number {i} about the weather today") for i in range(40)]
    turns.insert(25, Turn("Ellie", "how easy is it for you to get a good night's sleep"))
    turns.insert(26, Turn("Participant", "i can't sleep at night, i wake up at three"))
    kept, reduced = reduce_dialogue(turns, "Sleep", budget=60, count=approx_tokens)
    assert reduced
    assert sum(approx_tokens(f"{t.speaker}: {t.text}") + 1 for t in kept) <= 60
    texts = [t.text for t in kept]
    assert "i can't sleep at night, i wake up at three" in texts
    assert "how easy is it for you to get a good night's sleep" in texts  # the question travels with its answer
    assert [turns.index(t) for t in kept] == sorted(turns.index(t) for t in kept)
    same, reduced = reduce_dialogue(turns[:3], "Sleep", budget=1000, count=approx_tokens)
    assert not reduced and same == turns[:3]


def test_instances_record_reduction_and_prompt():
    c = read_corpus(FIXTURES / "daic")
    insts = build_instances(c, c.get("319"), max_context_tokens=40)
    assert [i.item for i in insts][:2] == ["NoInterest", "Depressed"] and len(insts) == 8
    sleep = next(i for i in insts if i.item == "Sleep")
    assert sleep.label is None  # the empty DAIC cell stays unknown
    assert "Ellie:" in sleep.dialogue and "Participant:" in sleep.dialogue
    msgs = sleep.student_messages(audio=True, visual=True)
    assert "<AudioHere>" in msgs[1]["content"] and "self-rating" not in msgs[1]["content"]
    tired = next(i for i in insts if i.item == "Tired")
    assert "self-rating score of 3" in tired.teacher_messages()[1]["content"]


def test_cmdc_uses_the_question_map_file(tmp_path):
    c = read_corpus(FIXTURES / "cmdc")
    insts = {i.item: i for i in build_instances(c, c.get("MDD01"))}
    assert "Q8" in insts["SelfHarm"].dialogue and "Q2" not in insts["SelfHarm"].dialogue
    edited = tmp_path / "map.json"
    edited.write_text(json.dumps({"items": {"SelfHarm": ["Q2"]}}))
    insts = {i.item: i for i in build_instances(c, c.get("MDD01"), question_map=load_question_map(edited))}
    assert "Q2" in insts["SelfHarm"].dialogue and "Q8" not in insts["SelfHarm"].dialogue
    edited.write_text(json.dumps({"items": {"Nonsense": ["Q2"]}}))
    with pytest.raises(InputError, match="map.json"):
        load_question_map(edited)


def test_parser():
    assert parse_answer("Evaluation Result: 2\nEvaluation Reason: She says she sleeps badly most nights.").score == 2
    assert parse_answer("evaluation result: **3** Evaluation Reason: daily low mood reported by her").well_formed
    assert parse_answer("Evaluation Result: 4\nEvaluation Reason: out of range value here").score is None
    assert parse_answer("Evaluation Result: 2.5\nEvaluation Reason: a b c d").score is None
    assert not parse_answer("I think the score is 2").well_formed
    # a range or a hedge is no score (it read as its lower bound: "0-3", echoing the prompt, became a 0)
    for hedged in ("0-3", "1 - 2", "2 or 3", "2/3", "1 to 2", "0–3", "**1**-**2**", "2 and 3", "2, or 3", "1 (or 2)",
                   "2‐3", "2−3", "2－3", "2～3", "2或3", "2 ‒ 3", "1, maybe 2", "1 perhaps 2", "2,5"):
        for order, text in (("result-first", f"Evaluation Result: {hedged}\nEvaluation Reason: she sleeps badly most nights."),
                            ("reason-first", f"Evaluation Reason: she sleeps badly most nights.\nEvaluation Result: {hedged}")):
            assert parse_answer(text, order).score is None, (hedged, order)
    assert parse_answer("Evaluation Result: 2, as she sleeps badly\nEvaluation Reason: she sleeps badly most nights.").score == 2
    assert parse_answer("Evaluation Result: 1 (mild)\nEvaluation Reason: tired on some days, she says.").score == 1
    # session 42 (a scoring review): a score ending its sentence ("2.") fell back to the regression head
    assert parse_answer("Evaluation Reason: The participant sleeps badly most nights.\nEvaluation Result: 2.",
                        "reason-first").score == 2
    assert parse_answer("Evaluation Result: 3.\nEvaluation Reason: low mood nearly every day, she says.").well_formed


def test_the_regression_heads_fallback_rounds_half_up_into_the_item_range():
    """Session 42 (a scoring review): round() sent 2.5 to 2 and 0.5 to 0 beside "regression head score 2.50
    used", while the item figures (metrics.round_half_up) counted 2.5 as 3."""
    from mllm_dr.scoring import fallback_score

    assert [fallback_score(x) for x in (-0.7, 0.49, 0.5, 1.5, 2.5, 3.4, 9.0)] == [0, 0, 1, 2, 3, 3, 3]


def test_validate():
    dialogue = "Participant: i can't sleep at night"
    assert validate("Evaluation Result: 2\nEvaluation Reason: The participant cannot sleep at night often.", 2, dialogue) is None
    assert "differs" in validate("Evaluation Result: 1\nEvaluation Reason: cannot sleep at night often.", 2, dialogue)
    assert "echoes" in validate("Evaluation Result: 2\nEvaluation Reason: A concise and logical description.", 2)
    assert "ungrounded" in validate("Evaluation Result: 2\nEvaluation Reason: generally fine overall person here.", 2, dialogue)


class _Teacher(BaseHTTPRequestHandler):
    calls: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Teacher.calls.append(body)
        label = body["messages"][1]["content"].split("self-rating score of ")[1][0]
        # first attempt: wrong format; retries: a good answer
        text = "no idea" if body["temperature"] == 0.0 else f"Evaluation Result: {label}\nEvaluation Reason: The participant said i sleep badly some nights."
        out = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_openai_compatible_teacher_retries_and_records_rejects():
    server = HTTPServer(("127.0.0.1", 0), _Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        c = read_corpus(FIXTURES / "edaic")
        insts = [i for i in build_instances(c, c.get("300")) if i.label is not None][:2]
        teacher = OpenAICompatibleTeacher(f"http://127.0.0.1:{server.server_port}/v1", "local-model")
        res = build_rationales(teacher, insts, retries=1)
    finally:
        server.shutdown()
    assert res.total == 2 and len(res.accepted) == 2 and res.first_try_accepted == 0
    assert len(res.rejects) == 2 and all("Evaluation Result" in r["why"] for r in res.rejects)
    assert {a["attempts"] for a in res.accepted} == {2}
    assert all(call["model"] == "local-model" for call in _Teacher.calls)


def test_cmdc_items_without_an_answered_question_and_over_long_answers_never_train_on_an_empty_dialogue(tmp_path):
    """An item none of whose mapped questions the participant answered, CMDC files named `Q01.txt` (the map
    says Q1), and one answer longer than the context budget each gave an instance with an empty dialogue,
    trained on as if it were the interview. Now the unanswered item reads the whole interview (said in its
    dialogue), `Q08` answers the map's Q8, and an over-long answer is cut to the budget, marked."""
    import shutil

    c = read_corpus(FIXTURES / "cmdc")
    insts = {i.item: i for i in build_instances(c, c.get("MDD01"))}
    assert insts["Sleep"].dialogue.strip() and "Q2" in insts["Sleep"].dialogue       # answered: its own
    assert insts["Moving"].dialogue.startswith("[no answer to this item's questions (Q12)")
    assert "Q8" in insts["Moving"].dialogue and "Q4" in insts["Moving"].dialogue      # the whole interview
    assert insts["Moving"].evidence is None            # but no quote: another item's answer is not its evidence
    edited = tmp_path / "map.json"                      # a site's map written with zero-padded names
    edited.write_text(json.dumps({"items": {"SelfHarm": ["Q08"]}}))
    assert load_question_map(edited) == {"SelfHarm": ["Q8"]}
    padded = tmp_path / "cmdc"
    shutil.copytree(FIXTURES / "cmdc", padded)
    folder = padded / "part1" / "MDD01"
    (folder / "Q8.txt").rename(folder / "Q08.txt")
    c = read_corpus(padded)
    insts = {i.item: i for i in build_instances(c, c.get("MDD01"))}
    assert insts["SelfHarm"].dialogue.startswith("Q8: ") and insts["SelfHarm"].turns_kept == 1
    long = "我很难过 " * 400                                            # one answer far over 64 tokens
    (folder / "Q08.txt").write_text(long, encoding="utf-8")
    c = read_corpus(padded)
    one = {i.item: i for i in build_instances(c, c.get("MDD01"), max_context_tokens=64)}["SelfHarm"]
    assert one.turns_kept == 1 and one.dialogue.startswith("Q8: ") and "[cut]" in one.dialogue
    assert approx_tokens(one.dialogue.split("\n")[0]) <= 64
