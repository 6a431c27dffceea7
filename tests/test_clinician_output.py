"""Output a clinician can read: wording, caveats, the evaluation plot, the HTML report in a real browser."""

import hashlib
import json
import shutil
import subprocess

import pytest
from conftest import run_cli

from mllm_dr import phq
from mllm_dr.corpus.model import Participant

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


def result(items=phq.PHQ8_ITEMS, scores=(2, 2, 1, 2, 1, 1, 2, 1), regression_at=2):
    its = [{"item": i, "score": s, "rationale": f"rationale for {i} <b>not markup</b>",
            "source": "regression" if k == regression_at else "generated", "regression_score": 1.26}
           for k, (i, s) in enumerate(zip(items, scores))]
    total = sum(scores)
    return {"participant": "303", "base_model": "smollm2-135m", "adapters": "ab12cd34ef56ab78", "items": its,
            "total": total, "band": phq.band(total), "binary": phq.binary(total)}


def person(split, labelled=True):
    return Participant("303", split, {i: (1 if labelled else None) for i in phq.PHQ8_ITEMS}, 8, 0)


def test_item_wording_is_the_questionnaires():
    assert set(phq.ITEM_WORDING) == set(phq.PHQ9_ITEMS)
    assert phq.ITEM_WORDING["NoInterest"] == "Little interest or pleasure in doing things"
    assert phq.max_total(8) == 24 and phq.max_total(9) == 27


def test_training_data_rule():
    from mllm_dr.clinician import training_data_note

    assert training_data_note(person("train"), "local", {})["in_training_data"] is True
    fed = training_data_note(person("dev"), "federated", {"run": "run-7"})
    assert fed["in_training_data"] and "run-7" in fed["note"] and "this site's included" in fed["note"]
    assert training_data_note(person("test"), "local", {})["in_training_data"] is False
    assert training_data_note(person("train", labelled=False), "local", {})["in_training_data"] is False
    assert training_data_note(person("train"), "local", {"zero_shot": True})["in_training_data"] is False
    # session 42 (a clinician-path review): adapters record who they were trained on, and that answers, not
    # today's split (a split file edited after training made a patient the model learned "not in the data")
    from mllm_dr.adapters import participant_keys

    learned = {"trained_on": participant_keys(["303", "304"])}
    moved = training_data_note(person("test"), "local", learned)
    assert moved["in_training_data"] is True
    other = training_data_note(person("train"), "federated", {"trained_on": participant_keys(["304"])})
    assert other["in_training_data"] is False and "as recorded when they were made" in other["note"]


def test_annotated_score_explains_itself():
    from mllm_dr.clinician import annotate, binary_explanation, training_data_note

    view = annotate(result(), training_data_note(person("train"), "local", {}), stale="trained on /old")
    assert view["disclaimer"].startswith("Decision support, not a diagnosis")
    assert view["items"][0]["wording"] == phq.ITEM_WORDING["NoInterest"] and view["items"][0]["response"] == \
        "More than half the days"
    assert "Screens positive" in view["binary_explanation"] and ">= " not in view["binary_explanation"]
    assert "12 (of 24)" in view["binary_explanation"] and "Screens negative" in binary_explanation(9, 9)
    assert any("stale" in w for w in view["warnings"]) and any("In the training data" in w for w in view["warnings"])


def test_evaluation_plot_uses_the_full_range_and_labels_the_cutoff():
    from mllm_dr.reports import evaluation_figure

    rows = [{"true": 0, "pred": 24}, {"true": 24, "pred": 0}, {"true": 10, "pred": 9}]
    for top in (24, 27):
        fig = evaluation_figure(rows, top, "site: test split\nn = 3; adapters ab12")
        ax = fig.axes[0]
        assert ax.get_xlim()[0] < 0 and top < ax.get_xlim()[1] < top + 1 and ax.get_ylim()[1] < top + 1
        assert not ax.collections[0].get_clip_on()                              # points at 0 and 24 drawn whole
        assert any("cut-off" in t.get_text() and "10" in t.get_text() for t in ax.get_legend().get_texts())
        assert "n = 3" in ax.get_title() and "ab12" in ax.get_title()


def test_markdown_report_warns_on_small_n_and_the_test_model(tmp_path):
    from mllm_dr.reports import write_report

    m = {"ccc": 0.5, "precision": 1.0, "recall": 0.5, "f1": 0.67, "rmse": 3.0, "mae": 2.0,
         "format_violation_rate": 0.1, "n": 3}
    rows = [{"participant": "1", "true": 3, "pred": 4, "regression_total": 3.5}]
    text = write_report(tmp_path / "r.md", m, rows, "t", max_total=24, model="tiny-random",
                        adapters="v1", test_model=True).read_text()
    assert "Only n = 3 participants" in text and "TEST model" in text and "adapters v1" in text
    big = write_report(tmp_path / "s.md", m | {"n": 40}, rows, "t", max_total=24, model="smollm2").read_text()
    assert "Warning" not in big and (tmp_path / "s.png").stat().st_size > 1000


def test_html_report_is_self_contained_and_escaped(tmp_path):
    from mllm_dr.clinician import annotate, render_participant_html, training_data_note

    view = annotate(result(), training_data_note(person("test"), "local", {}))
    page = render_participant_html(view, {"Sleep": ("I sleep <badly>", "Ellie: how do you sleep?")},
                                   {"site": "hospital-a", "adapters_kind": "local"})
    for banned in ("<script", "<link", "http://", "https://", "@import", "url(", "<img"):
        assert banned not in page.lower()
    assert "&lt;b&gt;not markup&lt;/b&gt;" in page and "I sleep &lt;badly&gt;" in page
    assert "default-src 'none'" in page


def test_the_engine_that_scored_is_named_wherever_the_scores_are_read(tmp_path, capsys):
    """int8 weights change about 1 item score in 16 against fp32 (README), yet the page, the printed summary,
    `score --json` and the evaluate report named the base and adapters only, never the engine."""
    from cli.site_model import _print_score
    from mllm_dr.clinician import annotate, render_participant_html, training_data_note
    from mllm_dr.reports import write_report

    training = training_data_note(person("test"), "local", {})
    assert annotate(result(), training)["engine"] == "torch"                # the default engine
    view = annotate(result(), training, engine="onnx-int8")
    assert view["engine"] == "onnx-int8"                                    # `score --json` is the view
    page = render_participant_html(view, {}, {"site": "hospital-a", "adapters_kind": "local"})
    assert "scored with engine onnx-int8 (int8 weights)" in page
    _print_score(view)
    assert "scored with engine onnx-int8 (int8 weights)" in capsys.readouterr().out
    m = {"ccc": 0.5, "precision": 1.0, "recall": 0.5, "f1": 0.67, "rmse": 3.0, "mae": 2.0,
         "format_violation_rate": 0.1, "n": 40}
    rows = [{"participant": "1", "true": 3, "pred": 4, "regression_total": 3.5}]
    text = write_report(tmp_path / "r.md", m, rows, "t", max_total=24, model="smollm2", adapters="v1",
                        engine="onnx").read_text()
    assert "Model: base smollm2, adapters v1, engine onnx (fp32 weights)." in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it "
                                               "where apt-get is available)")
def test_score_html_renders_in_a_headless_browser(tmp_path, synth_site):
    """The real path: extract, zero-shot adapters on the test model, `score --html`, then Chromium."""
    ws = tmp_path / "ws"
    run_cli("mllmdr-site", "init", "-w", ws, "--site-id", "hospital-a")
    run_cli("mllmdr-site", "extract", "-w", ws, "--corpus", synth_site[0])
    run_cli("mllmdr-site", "train", "-w", ws, "--local", "--zero-shot", "--base-model", "tiny-random")
    test_id = next(p["id"] for p in json.loads(run_cli("mllmdr-site", "data", "check", synth_site[0], "--json")
                                                .stdout)["participants"] if p["split"] == "test")
    from mllm_dr.workspace import Workspace

    Workspace(ws).mark_adapters_stale("trained on the corpus /old")    # what --replace-corpus leaves behind
    page = tmp_path / "report.html"
    proc = run_cli("mllmdr-site", "score", test_id, "-w", ws, "--max-new-tokens", "8", "--html", page,
                   "--user", "dr.a", "--json")
    out = json.loads(proc.stdout)
    assert "loading model" in proc.stderr and "scoring 8 items" in proc.stderr          # progress, not silence
    assert out["disclaimer"].startswith("Decision support") and out["items"][0]["wording"]
    assert out["training_data"]["in_training_data"] is False and out["html"] == str(page)
    assert "stale adapters: trained on the corpus /old" in out["warnings"]
    # the page is audited, by its hash, before it is written (a report never exists without its entry)
    from mllm_dr import audit

    entry = [e for e in audit.read(ws / "audit" / "audit.jsonl") if e["event"] == "score"][-1]
    assert entry["html_sha256"] == hashlib.sha256(page.read_bytes()).hexdigest() and entry["actor"] == "dr.a"
    dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    for text in (f"participant {test_id}", "Decision support, not a diagnosis", phq.ITEM_WORDING["Sleep"],
                 f"Total {out['total']} of 24", out["items"][0]["rationale"][:20], out["adapters"], "tiny-random",
                 "stale adapters"):
        assert text in dom, text
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                   capture_output=True, timeout=120)
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[:2] == (1400, 1000) and img[..., :3].std() > 0.05 and (img[..., :3] < 0.3).mean() > 0.005


def test_review_and_score_share_the_clinician_option():
    for cmd in ("review", "score"):
        assert "--user" in run_cli("mllmdr-site", cmd, "--help").stdout
    assert "--reviewer" not in run_cli("mllmdr-site", "review", "--help").stdout      # hidden alias


def test_review_stats_labels_follow_table_7():
    from mllm_dr.review import ItemReview, Review, review_stats

    items = [ItemReview(item=i, model_score=1, source="generated" if k else "regression", rating=3 - (k % 3),
                        corrected_score=2 if k == 1 else None) for k, i in enumerate(phq.PHQ8_ITEMS)]
    stats = review_stats([Review(participant="303", reviewer="dr.a", adapters="v", items=items)])
    assert stats["I_format_violations"] == 1 / 8 and stats["II_agreement"] == 7 / 8
    assert stats["III_rmse"] == 1.0 and stats["III_mae"] == 1.0
    assert list(stats["IV_ratings_3_2_1"]) == ["3 fully agree", "2 reasonable", "1 disagree"]
    # IV is over rationales: the regression item showed a placeholder (its rating 3 is not counted)
    assert stats["IV_rationales_rated"] == 7 and stats["IV_ratings_3_2_1"]["3 fully agree"] == 2 / 7
    # the same clinician reviewing the same shown score again replaces the earlier review (counted once)
    again = Review(participant="303", reviewer="dr.a", adapters="v", items=[i.model_copy(update={"rating": 1})
                                                                             for i in items])
    twice = review_stats([Review(participant="303", reviewer="dr.a", adapters="v", items=items), again])
    assert twice["reviews"] == 1 and twice["reviews_replaced"] == 1 and twice["IV_ratings_3_2_1"]["1 disagree"] == 1.0
    other = review_stats([Review(participant="303", reviewer="dr.a", adapters="v", items=items),
                          again.model_copy(update={"reviewer": "dr.b"})])
    assert other["reviews"] == 2 and other["reviews_replaced"] == 0


def test_an_interactive_correction_that_is_no_score_is_asked_again_never_dropped(monkeypatch):
    """A typo at 'corrected score' ('4', 'two') used to be taken as 'keep the model's score': the clinician's
    correction was lost without a word. Now only 0-3 or Enter are accepted; anything else asks again."""
    import io

    from cli.site_review import _ask

    monkeypatch.setattr("sys.stdin", io.StringIO("3\n4\ntwo\n2\n2\n\n"))
    fixes = {}
    assert _ask("Sleep", fixes) == 3 and fixes == {"Sleep": 2}
    assert _ask("Tired", fixes) == 2 and fixes == {"Sleep": 2}           # Enter keeps the model's score


def test_review_json_without_ratings_and_an_unknown_evaluate_split_are_refused_before_any_model_loads(tmp_path):
    """--json shows no scores or rationales, so an interactive rating under --json would rate unseen text."""
    run_cli("mllmdr-site", "init", "--workspace", tmp_path / "ws", "--site-id", "s1")
    proc = run_cli("mllmdr-site", "review", "303", "--json", "--workspace", tmp_path / "ws", check=False)
    assert proc.returncode == 2 and "--json shows no scores or rationales" in proc.stderr, proc.stderr
    # and evaluate names its split (it names the report file too): anything but train/dev/test is refused
    proc = run_cli("mllmdr-site", "evaluate", "--split", "../x", "--workspace", tmp_path / "ws", check=False)
    assert proc.returncode == 2 and "--split '../x': one of train, dev, test" in proc.stderr, proc.stderr


def test_json_output_is_strict_json_with_null_for_figures_that_do_not_exist(tmp_path, capsys):
    """Item figures without item labels (DAIC-WOZ's test split) are NaN; --json and the report's JSON used to
    carry bare NaN tokens, which JSON.parse, Go and jq < 1.7 refuse."""
    from cli.common import emit_json
    from mllm_dr.evaluation import Evaluation, rows_text

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    import numpy as np
    import torch

    emit_json({"ccc": float("nan"), "rows": [{"x": float("inf")}], "n": 3, "np": np.float32("nan"),
               "t": torch.tensor(float("nan")), "k": np.int64(4)})
    assert strict(capsys.readouterr().out) == {"ccc": None, "rows": [{"x": None}], "n": 3, "np": None, "t": None,
                                               "k": 4}
    metrics = strict(rows_text(Evaluation(), {"run": "r"}))["metrics"]    # what save_evaluation writes
    assert metrics["item_mae"] is None and metrics["n"] == 0


def test_the_excerpt_beside_an_item_is_the_dialogue_around_its_quote():
    """The 'interview excerpt it rests on' was the last 600 characters of the item's dialogue: for a whole
    transcript (E-DAIC) that is the interview's end, the same for every item, and may not hold the quote."""
    from types import SimpleNamespace

    from mllm_dr.review import EXCERPT_CHARS, excerpt

    dialogue = "Ellie: how are you. Participant: fine. " * 40 + "Participant: i cannot sleep at night. " + \
        "Ellie: okay. Participant: yes. " * 40
    quote, shown = excerpt(SimpleNamespace(evidence="i cannot sleep at night.", dialogue=dialogue))
    assert "i cannot sleep at night" in shown and len(shown) == EXCERPT_CHARS and shown != dialogue[-EXCERPT_CHARS:]
    assert excerpt(SimpleNamespace(evidence="", dialogue=dialogue))[1] == dialogue[-EXCERPT_CHARS:]
