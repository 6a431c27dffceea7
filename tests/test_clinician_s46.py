"""A review of the clinician path, session 46: the excerpt beside an item is its own question and answer, an item
scored on no statement says so, a self-harm score raises an alert whatever the total, the latest review is the
audit log's, the reports never land on the workspace's own records, and a short --score prefix is named."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mllm_dr import phq
from mllm_dr.errors import InputError
from mllm_dr.workspace import Workspace

TRAINING = {"in_training_data": False, "split": "test", "note": "Not in the training data."}


@pytest.fixture
def ws(tmp_path):
    return Workspace.init(tmp_path / "ws", "site1")


def _result(items=phq.PHQ8_ITEMS, scores=None, evidence=None):
    scores = scores or {}
    out = []
    for i in items:
        it = {"item": i, "score": scores.get(i, 0), "rationale": "r", "source": "generated", "regression_score": 0.0}
        if evidence is not None:
            it["has_evidence"] = i not in evidence
        out.append(it)
    total = sum(it["score"] for it in out)
    return {"participant": "303", "base_model": "smollm2", "adapters": "v1", "items": out, "total": total,
            "band": phq.band(total), "binary": phq.binary(total)}


# ----------------------------------------------------------------------------- 1. the excerpt is the item's own turn
def _sleep_dialogue() -> tuple[str, int]:
    """~1500 characters opening on "yesterday", the sleep question and its answer "yes." near the end."""
    lines = ["Ellie: what did you do yesterday", "Participant: yesterday i went to the shops with my sister"]
    filler = [("Ellie: how was the weather there", "Participant: it was cold and grey all day long honestly"),
              ("Ellie: what do you like to do for fun", "Participant: i watch films and sometimes i cook dinner"),
              ("Ellie: tell me about your family", "Participant: my parents live nearby and we talk a lot")]
    while len("\n".join(lines)) < 1300:
        lines += filler[len(lines) % 3]
    lines += ["Ellie: have you been having trouble sleeping", "Participant: yes."]
    at = len(lines) - 1
    lines += ["Ellie: okay thank you", "Participant: you are welcome"]
    return "\n".join(lines), at


def test_the_excerpt_is_centred_on_the_evidence_turn_not_the_first_match_of_its_words():
    """`excerpt` found the quote with `text.find("yes")`: "yes." landed on "yesterday" at the start, and the page
    showed "yes." above an excerpt without the sleep question or its answer."""
    from mllm_dr.review import excerpt

    dialogue, at = _sleep_dialogue()
    assert len(dialogue) > 1400 and dialogue.startswith("Ellie: what did you do yesterday")
    quote, shown = excerpt(SimpleNamespace(evidence="yes.", dialogue=dialogue, evidence_turns=[at], reduced=False))
    assert quote == "yes." and "Ellie: have you been having trouble sleeping\nParticipant: yes." in shown
    assert "what did you do yesterday" not in shown
    # without the turn's index (an older instance) the rendered line finds it all the same
    assert "trouble sleeping" in excerpt(SimpleNamespace(evidence="yes.", dialogue=dialogue))[1]


def test_of_several_alike_answers_the_excerpt_shows_the_evidence_turns_own():
    from mllm_dr.review import EXCERPT_CHARS, excerpt

    dialogue, at = _sleep_dialogue()
    early = "Ellie: do you like your job\nParticipant: yes.\n"
    dialogue = early + dialogue
    shown = excerpt(SimpleNamespace(evidence="yes.", dialogue=dialogue, evidence_turns=[at + 2], reduced=False))[1]
    assert "trouble sleeping\nParticipant: yes." in shown and "like your job" not in shown
    assert len(shown) <= EXCERPT_CHARS


def test_a_quote_cut_to_fit_is_found_and_a_quote_not_in_the_dialogue_says_so():
    from mllm_dr.review import NOT_IN_DIALOGUE, excerpt

    dialogue, _ = _sleep_dialogue()
    cut = dialogue.replace("Participant: yes.", "Participant: i lie awake until three [cut]")
    quote = "i lie awake until three every single night and then i am exhausted"
    assert "trouble sleeping\nParticipant: i lie awake" in excerpt(SimpleNamespace(evidence=quote, dialogue=cut))[1]
    missing = excerpt(SimpleNamespace(evidence="i never sleep.", dialogue=dialogue))[1]
    assert missing.startswith(NOT_IN_DIALOGUE) and missing.endswith(dialogue[-100:])


# ----------------------------------------------------------------------------- 2. scores on no statement
def test_the_no_answer_note_reaches_the_excerpt_and_items_without_a_statement_are_counted_and_marked():
    """The note "[no answer to this item's questions ...]" opens the dialogue, but the excerpt kept its last 600
    characters only; and nothing counted the item scores that rest on no statement in the interview."""
    from mllm_dr.clinician import annotate, render_participant_html
    from mllm_dr.review import excerpt

    dialogue, _ = _sleep_dialogue()
    note = "[no answer to this item's questions (Q7, Q8): the whole interview is shown]"
    shown = excerpt(SimpleNamespace(evidence=None, dialogue=f"{note}\n{dialogue}"))[1]
    assert shown.startswith(note + "\n") and shown.endswith(dialogue[-200:])

    view = annotate(_result(scores={"Sleep": 2}, evidence={"Appetite", "Moving"}), TRAINING)
    warning = ("2 of 8 item scores rest on no statement in the interview (Appetite, Moving): the total may be "
               "over- or under-stated")
    assert warning in view["warnings"] and view["items_without_statement"] == ["Appetite", "Moving"]
    assert view["total"] == 2 and [i["score"] for i in view["items"]] == [0, 0, 2, 0, 0, 0, 0, 0]   # unchanged
    page = render_participant_html(view, {}, {"site": "a", "adapters_kind": "local"})
    assert page.count("<tr class=nostatement>") == 2 and warning in page
    # a result scored before session 46 does not say: no warning, no row marked
    old = annotate(_result(), TRAINING)
    assert not any("no statement" in w for w in old["warnings"]) and old["items_without_statement"] == []


def test_an_item_score_carries_whether_its_dialogue_had_a_statement():
    from mllm_dr.scoring import ItemScore, summarize

    sm = SimpleNamespace(info=SimpleNamespace(name="b", is_test_model=False), version="v")
    items = [ItemScore("Sleep", 1, "r", "generated", 1.0, "t", has_evidence=False),
             ItemScore("Tired", 2, "r", "regression", 2.0, "t", has_evidence=True)]
    out = summarize("303", items, sm)
    assert [i["has_evidence"] for i in out["items"]] == [False, True] and out["total"] == 3
    assert "has_evidence" not in ItemScore("Sleep", 1, "r", "generated", 1.0, "t").to_dict()


# ----------------------------------------------------------------------------- 3. self-harm
def test_a_self_harm_score_raises_an_alert_whatever_the_total(capsys):
    """A CMDC (PHQ-9) result with SelfHarm 3 and every other item 0 said "Screens negative", and warned of nothing."""
    from mllm_dr.clinician import annotate, render_participant_html

    view = annotate(_result(phq.PHQ9_ITEMS, {"SelfHarm": 3}), TRAINING, stale="trained on /old")
    alert = view["safety_alert"]
    assert alert and alert.startswith("PHQ-9 item 9 (thoughts of self-harm) scored 3") and "assess risk now" in alert
    assert view["warnings"][0] == alert and view["binary"] == 0          # the first warning; the call unchanged
    assert json.loads(json.dumps(view))["safety_alert"] == alert         # --json
    page = render_participant_html(view, {}, {"site": "a", "adapters_kind": "local"})
    head = page[page.index("<header>"):page.index("</header>")]
    assert f"<p class=alert role=alert>Safety alert: {alert}" in head and head.count(alert) == 1
    assert head.index("class=alert") < head.index("class=disclaimer")
    for quiet in (annotate(_result(phq.PHQ9_ITEMS), TRAINING), annotate(_result(scores={"Sleep": 3}), TRAINING)):
        assert quiet["safety_alert"] is None and "class=alert" not in render_participant_html(quiet, {}, {})


def _keep(ws, result) -> str:
    from mllm_dr import audit, clinician

    view = clinician.annotate(result, TRAINING)
    data, sha = clinician.kept_score_record(view, {}, "torch", "local", "dr.s")
    audit.append(ws.audit_path, "score", participant=result["participant"], kept_score_sha256=sha)
    clinician.keep_score(ws, result["participant"], data)
    return sha


def _review_cli(ws, **kw):
    from cli.site_review import review

    args = dict(participant="303", workspace=ws.root, user="dr.a", reviewer=None, ratings=None, corrections=None,
                adapters=None, engine=None, score_sha256=None, json_out=False) | kw
    return review(**args)


def test_the_review_shows_the_self_harm_alert_first(ws, capsys):
    sha = _keep(ws, _result(phq.PHQ9_ITEMS, {"SelfHarm": 2}))
    _review_cli(ws, ratings=",".join("3" * 9), score_sha256=sha[:12])
    out = capsys.readouterr().out
    assert out.index("SAFETY ALERT") < out.index("participant 303: score")             # heads the review
    assert "warning:" not in out and "safety_alert=PHQ-9 item 9" in out                  # and closes it
    _review_cli(ws, ratings=",".join("3" * 9), score_sha256=sha[:12], json_out=True)
    assert json.loads(capsys.readouterr().out)["safety_alert"].startswith("PHQ-9 item 9")


# ----------------------------------------------------------------------------- 4. the latest review is the log's
def test_swapped_review_lines_keep_the_latest_review_and_are_flagged(ws):
    """review_stats kept the last review of each key in file order, and the file was checked against the log as a
    multiset only: swapping two lines made a replaced review count (Table 7 agreement 1.0 -> 0.875), unflagged."""
    from cli.site_review import _integrity_warnings
    from mllm_dr.review import ItemReview, Review, checked_reviews, record_review, reviews_path, review_stats

    for fix in (2, None):            # a correction, then the same clinician's review of the same score without one
        items = [ItemReview(item=i, model_score=1, source="generated", rating=3,
                            corrected_score=fix if k == 0 else None) for k, i in enumerate(phq.PHQ8_ITEMS)]
        record_review(ws, Review(participant="303", reviewer="dr.a", adapters="v", score_sha256="s1", items=items))
    reviews, checked = checked_reviews(ws)
    assert review_stats(reviews)["II_agreement"] == 1.0 and checked["reviews_out_of_audit_order"] == 0
    assert _integrity_warnings(checked) == []
    path = reviews_path(ws.root)
    first, second = path.read_text().splitlines()
    path.write_text(f"{second}\n{first}\n")
    reviews, checked = checked_reviews(ws)
    stats = review_stats(reviews)
    assert stats["II_agreement"] == 1.0 and stats["reviews_replaced"] == 1 and checked["unaudited_reviews"] == 0
    assert checked["reviews_out_of_audit_order"] == 2
    assert any("another order" in w for w in _integrity_warnings(checked))


# ----------------------------------------------------------------------------- 5. never over the workspace's records
def test_a_report_path_inside_the_workspaces_records_is_refused(ws, tmp_path):
    """`score --html WS/scores/303.json` replaced the kept score with a page; WS/audit/audit.jsonl the signed log."""
    from cli.site_model import check_writable

    for path in (ws.root / "scores" / "303.json", ws.audit_path, ws.root / "keys" / "x.html",
                 ws.root / "checkpoints" / "local" / "p.html", ws.root / "reviews" / "r.html",
                 ws.root / "workspace.json", ws.root / "reports" / ".." / "audit" / "p.html"):
        with pytest.raises(InputError, match="--html is (inside the workspace's|the workspace's own)"):
            check_writable(path, "--html", workspace=ws, suffixes=(".html", ".htm"))
    link = tmp_path / "page.html"
    link.symlink_to(ws.audit_path)
    with pytest.raises(InputError, match="inside the workspace's audit/"):
        check_writable(link, "--html", workspace=ws, suffixes=(".html", ".htm"))
    with pytest.raises(InputError, match=r"--report writes workspace\.json beside it"):
        check_writable(ws.root / "workspace.md", "--report", creates_folder=True, workspace=ws, beside=(".json",))
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="existing file that is not a .html/.htm page"):
        check_writable(tmp_path / "notes.txt", "--html", workspace=ws, suffixes=(".html", ".htm"))
    (tmp_path / "old.HTML").write_text("<p>")
    check_writable(tmp_path / "old.HTML", "--html", workspace=ws, suffixes=(".html", ".htm"))   # a page: replaced
    check_writable(ws.root / "reports" / "303.html", "--html", workspace=ws, suffixes=(".html", ".htm"))
    check_writable(ws.root / "reports" / "evaluate-x.md", "--report", creates_folder=True, workspace=ws,
                   beside=(".json", ".png"))


def test_score_html_into_the_kept_scores_is_refused_in_one_line(ws):
    from conftest import run_cli

    kept = ws.root / "scores" / "303.json"
    _keep(ws, _result())
    before = kept.read_bytes()
    proc = run_cli("mllmdr-site", "score", "303", "--workspace", ws.root, "--html", ws.root / "scores" / "303.json",
                   check=False)
    assert proc.returncode == 2 and "inside the workspace's scores/" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and kept.read_bytes() == before


# ----------------------------------------------------------------------------- 6. a short --score prefix
def test_a_short_score_prefix_is_named_as_such(ws):
    """A correct 7-character prefix read "the kept score ... is 3f2a9c1d0b7e (...), not 3f2a9c1: review that one"."""
    sha = _keep(ws, _result())
    with pytest.raises(InputError, match="--score needs at least 8 characters of the id") as err:
        _review_cli(ws, ratings=",".join("3" * 8), score_sha256=sha[:7], json_out=True)
    assert "review that one" not in str(err.value)
    with pytest.raises(InputError, match="the kept score of participant 303 is"):
        _review_cli(ws, ratings=",".join("3" * 8), score_sha256="0" * 12 if not sha.startswith("0") else "1" * 12,
                    json_out=True)
