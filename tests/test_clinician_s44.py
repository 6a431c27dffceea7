"""Session 44, a review of what clinicians see: a fallback score agrees with the figure shown beside it, hedged or
self-contradicting answers fall back, `review --corrections` is never silently kept at a prompt, `evaluate` audits
before it writes and counts the head's total as its item scores, `audit show` shows any line, and a kept score is
vouched for only by the log as it was verified."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import run_cli
from mllm_dr import audit, phq
from mllm_dr.metrics import round_half_up
from mllm_dr.workspace import Workspace

ITEMS = list(phq.PHQ8_ITEMS)
REASON = "The participant says they sleep badly on several nights of the week."


class StubEngine:
    """An engine (``generate``, as onnx_engine's) whose answers break the format (nothing generated) and whose
    regression head gives ``values`` in turn: the fallback path, without the model's randomness."""

    def __init__(self, values: list[float]):
        self.values = values

    def generate(self, batch, max_new_tokens, eos_token_id, pad_token_id, choose=None):
        b = batch.attention_mask.shape[0]
        end = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id   # scoring passes a list
        return torch.full((b, 1), end, dtype=torch.long), torch.tensor(self.values[:b])


@pytest.fixture(scope="module")
def model_ws(scored_ws):
    """conftest's ``scored_ws`` (features, zero-shot local adapters on the test model), and that model
    loaded."""
    from mllm_dr.local_run import load_trained

    return scored_ws, load_trained(scored_ws, None, "cpu")


# ----------------------------------------------------------------------------- 1: the score is the figure shown
def test_a_fallback_score_is_the_regression_figure_shown_beside_it(model_ws, capsys, monkeypatch):
    """A fallback item's score was floor(r + 0.5) of the raw value while "2.50" was shown: r = 2.4963 read
    "2.50" beside a 2. Now the score is the shown figure's, in the rationale, the HTML page and the terminal."""
    from cli.common import console
    from cli.site_model import _print_score
    from mllm_dr.clinician import annotate, render_participant_html
    from mllm_dr.dataset import examples, load_corpus
    from mllm_dr.evaluation import participant_instances
    from mllm_dr.scoring import score_examples, summarize

    ws, sm = model_ws
    corpus = load_corpus(ws)
    participant = corpus.participants[0].id
    insts = participant_instances(ws, participant, corpus)
    values = [2.4963, 1.49996, 0.4951, 2.4963, 1.49996, 0.4951, 2.4963, 1.49996][:len(insts)]
    scored = score_examples(sm, examples(ws, insts, 2, with_answers=False, corpus=corpus), 8, StubEngine(values))
    view = annotate(summarize(participant, scored, sm), {"in_training_data": False, "split": "test", "note": "n"})
    page = render_participant_html(view, {}, {"site": "s", "adapters_kind": "local"})
    monkeypatch.setattr(console, "width", 250)
    _print_score(view)
    terminal = capsys.readouterr().out
    for it, r in zip(view["items"], values):
        shown = f"{r:.2f}"
        assert it["source"] == "regression" and it["score"] == round_half_up(float(shown)), (r, it)
        assert f"regression head score {shown} used" in it["rationale"], it["rationale"]
        assert (f"<span class=score>{it['score']}</span> / 3<br><span class=small>{phq.RESPONSES[it['score']]}"
                f"</span><br><span class=small>the generated text broke the answer format; the regression "
                f"head&#x27;s score {shown} was used") in page
    assert "regression head (2.50)" in terminal and "regression head (1.50)" in terminal, terminal
    assert [it["score"] for it in view["items"]][:3] == [3, 2, 1]
    from mllm_dr.scoring import fallback_score, regression_text

    for r in (1.49496, 2.49496, 0.004999, -0.3, 3.7):    # the raw value and the 4 decimals kept show alike
        assert regression_text(r) == regression_text(round(r, 4))
        assert fallback_score(r) == min(max(round_half_up(float(regression_text(r))), 0), 3)


# ----------------------------------------------------------------------------- 2: --corrections needs --ratings
def test_corrections_without_ratings_are_refused_never_kept_at_a_prompt(tmp_path):
    """Interactive `review --corrections Sleep=3`: pressing Enter at "corrected score (Enter keeps the model's)"
    kept the command line's 3 as the clinician's correction. --corrections is non-interactive: it now needs
    --ratings, and alone it is refused in one line (exit 2) before anything is read or recorded."""
    ws = Workspace.init(tmp_path / "ws", "site1")
    proc = run_cli("mllmdr-site", "review", "303", "--corrections", "Sleep=3", "--workspace", ws.root, check=False)
    assert proc.returncode == 2 and "--corrections goes with --ratings" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (ws.root / "reviews" / "reviews.jsonl").exists()


# ----------------------------------------------------------------------------- 3, 8: the parser
@pytest.mark.parametrize("result", ["1, 2", "1 and/or 2", "1 or perhaps 2", "1; 2", "1 , maybe 2", "1，2"])
@pytest.mark.parametrize("order", ["result-first", "reason-first"])
def test_a_hedged_result_is_a_format_break(result, order):
    """"Evaluation Result: 1, 2" (or "1 and/or 2", "1 or perhaps 2") parsed as a well-formed 1: the hedge
    lookahead knew one word or dash only. A chain of hedge tokens before a digit is a hedge now."""
    from mllm_dr.parsing import format_answer, parse_answer

    text = format_answer(0, REASON, order).replace("Evaluation Result: 0", f"Evaluation Result: {result}")
    assert not parse_answer(text, order).well_formed, text
    plain = parse_answer(format_answer(2, REASON, order), order)          # what stays well formed
    assert plain.well_formed and plain.score == 2 and plain.reason == REASON
    for ok in ("2", "**2**", "2.", "2 (3 days a week)", "2, 3 nights a week", "2; 4 nights of 7"):   # details
        kept = parse_answer(format_answer(0, REASON, order).replace("Result: 0", f"Result: {ok}"), order)
        assert kept.well_formed and kept.score == 2, ok


@pytest.mark.parametrize("order", ["reason-first", "result-first"])
def test_a_reason_stating_another_score_is_a_format_break(order):
    """A reason ending "which fits a score of 2" (as the training rationales do) beside "Evaluation Result: 3"
    was shown as a well-formed 3 with a rationale arguing for 2. Now it falls back; a matching one does not."""
    from mllm_dr.parsing import format_answer, parse_answer

    reason = 'The participant said "I wake up at three most nights", which fits a score of {}.'
    wrong = parse_answer(format_answer(3, reason.format(2), order), order)
    assert wrong.score == 3 and not wrong.well_formed
    right = parse_answer(format_answer(3, reason.format(3), order), order)
    assert right.well_formed and right.score == 3 and right.reason == reason.format(3)
    # only the training rationales' own commitment counts: a reason reciting the scale (as the system prompt
    # does) or comparing scores states none (a second read of this session's change: both fell back)
    from mllm_dr.rationales import validate

    for text, score in (("A score of 0 means not at all and 1 means several days; here it fits a score of 1.", 1),
                        ("She reports more than a score of 1 but short of a score of 3 would suggest.", 2)):
        answer = parse_answer(format_answer(score, text, order), order)
        assert answer.well_formed and answer.score == score, text
    # the teacher's validator and the scorer share the rule: a contradicted answer is never trained on
    wrong_text = format_answer(3, reason.format(2), "result-first")
    assert validate(wrong_text, 3) == "the reason commits to another score than its result"
    assert validate(format_answer(3, reason.format(3), "result-first"), 3) is None


# ----------------------------------------------------------------------------- 4, 5, 9: evaluate
def _evaluate(ws, report=None):
    """`mllmdr-site evaluate --split test --json`, in this process (every option given)."""
    from cli.site_model import Adapters, Device, Engine, evaluate

    evaluate(workspace=ws.root, split="test", base_model=None, device=Device.cpu, max_new_tokens=8,
             adapters=Adapters.auto, report=report, engine=Engine.torch, json_out=True)


def test_evaluate_writes_nothing_when_its_audit_entry_fails(model_ws, monkeypatch, capsys):
    """`evaluate` wrote the report, its plot and the per-participant rows, then appended its audit entry: an
    append that failed left them with no entry. Now the entry (naming their hashes) comes first."""
    import errno

    ws, _ = model_ws
    reports = ws.root / "reports"
    before = set(reports.iterdir()) if reports.exists() else set()

    real = audit.append

    def full_disk_at_evaluate(path, event, *args, **kw):      # only evaluate's own entry fails
        if event == "evaluate":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, event, *args, **kw)

    monkeypatch.setattr(audit, "append", full_disk_at_evaluate)
    with pytest.raises(OSError):
        _evaluate(ws)
    after = set(reports.iterdir()) if reports.exists() else set()
    assert not [p.name for p in after - before if p.name.startswith("evaluate")], after
    monkeypatch.undo()
    _evaluate(ws)
    out = json.loads(capsys.readouterr().out)
    entry = audit.read(ws.audit_path)[-1]
    assert entry["event"] == "evaluate"
    for key, path in (("report_sha256", out["report"]), ("rows_sha256", out["rows"]),
                      ("plot_sha256", out["report"].removesuffix(".md") + ".png")):
        assert entry[key] == hashlib.sha256(open(path, "rb").read()).hexdigest(), key


def test_the_report_counts_the_head_total_as_its_item_scores(model_ws, tmp_path):
    """The report's regression-head column was the raw sum (8 x 1.45 = 11.6) beside "MAA head alone" figures made
    from the rounded item scores (8 x 1). Now the column is the sum of the head's item scores."""
    from mllm_dr.evaluation import evaluate_split
    from mllm_dr.reports import write_report

    ws, sm = model_ws
    result = evaluate_split(ws, sm, "test", 8, engine=StubEngine([1.45] * 8))
    assert result.rows and all(len(r["items"]) == 8 for r in result.rows)
    for row in result.rows:
        assert row["regression_total"] == 8 and row["pred"] == 8 and row["regression_raw_sum"] == 11.6, row
    text = write_report(tmp_path / "r.md", result.metrics(), result.rows, "t", max_total=24).read_text()
    assert "| MAA head total (its item scores) |" in text
    assert f"| {result.rows[0]['participant']} | {result.rows[0]['true']} | 8 | 8 |" in text, text
    assert result.metrics()["maa_mae"] == result.metrics()["mae"]       # the same item scores, the same figures


def test_a_report_path_ending_in_png_is_refused(tmp_path):
    """`evaluate --report x.png` wrote the plot at x.png, then the markdown over it. Refused now, in one line."""
    ws = Workspace.init(tmp_path / "ws", "site1")
    proc = run_cli("mllmdr-site", "evaluate", "--workspace", ws.root, "--report", tmp_path / "x.png", check=False)
    assert proc.returncode == 2 and "--report is the markdown report" in proc.stderr, proc.stderr
    assert "as .png" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.glob("x.*"))
    from mllm_dr.errors import InputError          # the rule itself, any case of the suffix
    from mllm_dr.reports import check_report_path

    with pytest.raises(InputError, match="as .png"):
        check_report_path(tmp_path / "x.PNG")
    check_report_path(tmp_path / "x.md")


# ----------------------------------------------------------------------------- 6, 7: the audit log as read


def test_audit_show_shows_a_line_without_seq_time_or_event_as_tampered(logged):
    """A JSON line lacking seq, time and event crashed `audit show` (KeyError 'seq', exit 3). It is shown now,
    marked TAMPERED, and `--event` filters around it."""
    with open(logged.audit_path, "a") as fh:
        fh.write(json.dumps({"note": "x"}) + "\n")
    env = {"COLUMNS": "300"}
    shown = run_cli("mllmdr-site", "audit", "show", "--workspace", logged.root, check=False, env=env)
    assert shown.returncode == 0 and "TAMPERED" in shown.stdout and "note=x" in shown.stdout, shown.stderr
    only = run_cli("mllmdr-site", "audit", "show", "--event", "score", "--workspace", logged.root, check=False, env=env)
    assert only.returncode == 0 and "marked TAMPERED" in only.stderr and "30" in only.stdout, only.stderr
    as_json = run_cli("mllmdr-site", "audit", "show", "--since", "2020-01-01", "--json", "--workspace", logged.root,
                      check=False)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)[-1] == {"note": "x", "seq": None, "time": "", "event": "(no event)",
                                              "actor": None, "tampered": True}


def _kept_score(ws, participant="303") -> None:
    """What `score` keeps and audits for a participant, without a model."""
    from mllm_dr import clinician

    result = {"participant": participant, "base_model": "tiny-random", "adapters": "ab12cd34ef56ab78",
              "items": [{"item": i, "score": 1, "rationale": REASON, "source": "generated", "regression_score": 1.0}
                        for i in ITEMS], "total": 8, "band": phq.band(8), "binary": 0}
    view = clinician.annotate(result, {"in_training_data": False, "split": "test", "note": "n"})
    data, sha = clinician.kept_score_record(view, {}, "torch", "local", "dr.s")
    audit.append(ws.audit_path, "score", participant=participant, kept_score_sha256=sha)
    clinician.keep_score(ws, participant, data)


def test_a_line_appended_between_the_check_and_the_read_vouches_for_nothing(logged, monkeypatch):
    """read_checked verified the log, then read it again: an unsigned entry appended in between came back
    unmarked, and `kept_score` took it as vouching for an edited kept score. The lines verified are now the
    lines returned."""
    from mllm_dr import clinician
    from mllm_dr.errors import InputError

    _kept_score(logged)
    path = clinician.kept_score_path(logged, "303")
    path.write_bytes(path.read_bytes().replace(b'"total": 8', b'"total": 2'))     # edited after it was shown
    edited = hashlib.sha256(path.read_bytes()).hexdigest()
    real = audit._check

    def check_then_forge(*args, **kw):
        out = real(*args, **kw)
        lines = logged.audit_path.read_text().splitlines()
        forged = dict(json.loads(lines[-1]), seq=len(lines) + 1, kept_score_sha256=edited,
                      prev=hashlib.sha256(lines[-1].encode()).hexdigest())
        forged.pop("sig")
        with open(logged.audit_path, "a") as fh:
            fh.write(json.dumps(forged) + "\n")
        return out

    monkeypatch.setattr(audit, "_check", check_then_forge)
    with pytest.raises(InputError, match="no 'score' audit entry names this kept score"):
        clinician.kept_score(logged, "303")
