"""Clinician reviews against the audit log: a review rates the score it names, a deleted or edited review shows
and leaves the Table 7 figures, and what a review prints from the kept score is text, never terminal controls."""

from __future__ import annotations

import pytest

from conftest import cli_json, run_cli
from mllm_dr import audit, phq
from mllm_dr.workspace import Workspace

ITEMS = list(phq.PHQ8_ITEMS)


def _kept_score(ws, participant="303", rationale="sleeps badly", dialogue="Ellie: how do you sleep?") -> str:
    """What `score` keeps and audits for a participant, without a model: returns the kept score's sha256."""
    from mllm_dr import clinician

    result = {"participant": participant, "base_model": "tiny-random", "adapters": "ab12cd34ef56ab78",
              "items": [{"item": i, "score": 1, "rationale": rationale, "source": "generated",
                         "regression_score": 1.0} for i in ITEMS],
              "total": 8, "band": phq.band(8), "binary": 0}
    training = {"in_training_data": False, "split": "test", "note": "Not in the training data."}
    view = clinician.annotate(result, training)
    excerpts = {i: ("I sleep badly", dialogue) for i in ITEMS}
    data, sha = clinician.kept_score_record(view, excerpts, "torch", "local", "dr.s")
    audit.append(ws.audit_path, "score", participant=participant, kept_score_sha256=sha)
    clinician.keep_score(ws, participant, data)
    return sha


@pytest.fixture
def ws(tmp_path):
    return Workspace.init(tmp_path / "ws", "site1")


def test_ratings_without_the_score_they_rate_are_refused(ws):
    """`review --ratings` without `--score` rated whatever score was kept now: a colleague's later scoring of the
    same participant, shown to nobody reviewing, was rated without a word. `--score` is now required with it."""
    sha = _kept_score(ws)
    env = {"MLLMDR_WORKSPACE": str(ws.root)}
    ratings = ",".join("3" * len(ITEMS))
    bare = run_cli("mllmdr-site", "review", "303", "--ratings", ratings, "--json", check=False, env=env)
    assert bare.returncode == 2 and "--ratings needs --score" in bare.stderr, bare.stderr
    assert len(bare.stderr.strip().splitlines()) == 1 and not (ws.root / "reviews" / "reviews.jsonl").exists()
    rv = cli_json("mllmdr-site", "review", "303", "--ratings", ratings, "--score", sha[:12], env=env)
    assert rv["model_total"] == 8 and audit.read(ws.audit_path)[-1]["kept_score_sha256"] == sha
    helptext = run_cli("mllmdr-site", "review", "--help", env={"COLUMNS": "200"}).stdout
    assert "--ratings needs --score" in helptext and "--score 3f2a9c1d0b7e --ratings" in helptext


def _review(ws, participant: str, rating: int, correction: int | None = None):
    from mllm_dr.review import ItemReview, Review, record_review

    items = [ItemReview(item=i, model_score=1, source="generated", rating=rating,
                        corrected_score=correction if k == 0 else None) for k, i in enumerate(ITEMS)]
    record_review(ws, Review(participant=participant, reviewer="dr.a", adapters="v", score_sha256="s" + participant,
                             items=items))


def test_a_deleted_review_is_reported_and_an_edited_one_left_out_of_the_figures(ws):
    """Only review lines no audit entry hashes were counted: deleting a review the clinician disagreed with (an
    audited entry whose line is gone) went unseen and the figures silently improved. Now `missing_reviews` names
    it, and an edited review (its line matches no entry) is left out of the figures and flagged."""
    _review(ws, "301", 3)
    _review(ws, "302", 1, correction=3)
    _review(ws, "303", 3)
    env = {"MLLMDR_WORKSPACE": str(ws.root)}
    before = cli_json("mllmdr-site", "review", "stats", env=env)
    assert before["reviews"] == 3 and before["missing_reviews"] == 0 and before["unaudited_reviews"] == 0
    path = ws.root / "reviews" / "reviews.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")       # the disagreeing review deleted
    after = cli_json("mllmdr-site", "review", "stats", env=env)
    assert after["missing_reviews"] == 1 and after["reviews"] == 2
    assert [(e["participant"], e["actor"]) for e in after["missing_review_entries"]] == [("302", "dr.a")]
    text = run_cli("mllmdr-site", "review", "stats", env={**env, "COLUMNS": "200"}).stdout
    assert "1 review the audit log records is missing" in text and "participant 302" in text, text
    # an edited review: its line matches no entry (so its original is missing) and it is not counted
    path.write_text("\n".join([lines[0], lines[2].replace('"rating":3', '"rating":1')]) + "\n")
    edited = cli_json("mllmdr-site", "review", "stats", env=env)
    assert edited["unaudited_reviews"] == 1 and edited["missing_reviews"] == 2 and edited["reviews"] == 1
    assert edited["IV_ratings_3_2_1"]["3 fully agree"] == 1.0                 # the edited ratings are not in it
    text = run_cli("mllmdr-site", "review", "stats", env={**env, "COLUMNS": "200"}).stdout
    assert "1 stored review matches no audit entry" in text and "left out of the figures" in text, text


def test_review_prints_transcripts_and_rationales_as_text(ws):
    """A rationale or transcript holding terminal escape sequences (a title change, a screen clear) reached the
    clinician's terminal unchanged; now they are shown as \\x1b, and markup in them stays text."""
    sha = _kept_score(ws, rationale="sleeps \x1b]0;owned\x07badly [/] [red]x[/red]",
                      dialogue="Participant: fine\x1b[2J\x9b really")
    proc = run_cli("mllmdr-site", "review", "303", "--ratings", ",".join("3" * len(ITEMS)), "--score", sha,
                   env={"MLLMDR_WORKSPACE": str(ws.root), "COLUMNS": "250"})
    out = proc.stdout
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out, repr(out)
    assert "sleeps \\x1b]0;owned\\x07badly [/] [red]x[/red]" in out and "fine\\x1b[2J\\x9b really" in out, out


def test_score_prints_rationales_and_wording_as_text(capsys, monkeypatch):
    from cli.common import console
    from cli.site_model import _print_score
    from mllm_dr import clinician

    monkeypatch.setattr(console, "width", 250)

    result = {"participant": "303", "base_model": "tiny-random", "adapters": "v",
              "items": [{"item": i, "score": 1, "rationale": "a\x1b[2Jb [/]", "source": "generated",
                         "regression_score": 1.0} for i in ITEMS], "total": 8, "band": phq.band(8), "binary": 0,
              "warning": "test model \x1b]0;t\x07"}
    view = clinician.annotate(result, {"in_training_data": False, "split": "test", "note": "note \x1b[1m"})
    _print_score(view | {"kept_score_sha256": "ab" * 32})
    out = capsys.readouterr().out
    assert "\x1b" not in out and "a\\x1b[2Jb [/]" in out and "test model \\x1b]0;t\\x07" in out, out


def test_an_unsigned_entry_cannot_vouch_for_an_edited_review(ws):
    """A second read of session 42: `review stats` read the audit log unchecked, so editing a review line and the
    last entry's record_sha256 to match (its signature dropped) counted the edited ratings with no warning. Now
    only entries that verify vouch, and the figures say where the log stops verifying."""
    import hashlib
    import json

    from mllm_dr import review

    _review(ws, "301", 1)
    path = ws.root / "reviews" / "reviews.jsonl"
    edited = path.read_text().splitlines()[0].replace('"rating":1', '"rating":3')
    path.write_text(edited + "\n")
    log = ws.audit_path.read_text().splitlines()
    last = json.loads(log[-1])
    last.pop("sig")
    last["record_sha256"] = hashlib.sha256(edited.encode()).hexdigest()
    ws.audit_path.write_text("\n".join(log[:-1] + [json.dumps(last)]) + "\n")
    kept, checked = review.checked_reviews(ws)
    assert kept == [] and checked["unaudited_reviews"] == 1
    assert "signature does not verify" in checked["audit_log_problem"]


def test_a_kept_score_after_a_break_in_the_audit_log_names_the_log_not_score_again(ws):
    """A second read of session 42: once only verified entries vouch, a log that stops verifying (say its key
    file was lost and a new one made) refused every kept score with "run score again", which cannot help: the
    new entry sits after the break too. Now the refusal names the audit log and where it stops verifying."""
    from mllm_dr import clinician
    from mllm_dr.errors import InputError

    _kept_score(ws, "303")
    lines = ws.audit_path.read_text().splitlines()
    ws.audit_path.write_text("\n".join([lines[0].replace('"sig": "', '"sig": "00')] + lines[1:]) + "\n")
    _kept_score(ws, "303")
    with pytest.raises(InputError, match="the audit log does not verify .*line 1"):
        clinician.kept_score(ws, "303")
