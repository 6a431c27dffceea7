"""Session 45 (a metrics review): impossible site statistics, undefined P/R/F1, strict history JSON, negation in
the severity check, the fallback score of a shown value, a non-finite head value, and maa_* pooled over a subset."""

import json
import math
import random

import pytest
import torch


def _strict(text: str):
    """json.loads refusing bare NaN / Infinity (what strict parsers do)."""
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


# 1. impossible statistics ------------------------------------------------------------------------------------

def _forged_predicted_sums():
    """Two participants, both true 10, predicted 10**4 each: every sum consistent with *some* real numbers."""
    from mllm_dr.metrics import SufficientStats

    s = SufficientStats()
    for _ in range(2):
        s.add(10.0, 1e4)
    return s


def test_predicted_sums_outside_0_27_are_refused():
    from mllm_dr.metrics import SufficientStats, compute
    from mllm_dr.protocol import stats_from_record, stats_record

    honest = SufficientStats()
    for t, p in ((0, 1), (5, 4), (12, 14), (20, 18), (15, 15), (3, 5)):
        honest.add(t, p)
    forged = _forged_predicted_sums()
    assert compute(honest)["ccc"] > 0.9 and abs(compute(honest.merge(forged))["ccc"]) < 0.01   # what was pooled
    with pytest.raises(ValueError, match="predicted totals' sums"):
        stats_from_record(stats_record(forged))
    for bad in ({"sy": -1.0}, {"syy": 729 * 6 + 1.0}):
        with pytest.raises(ValueError, match="impossible statistics"):
            stats_from_record(stats_record(SufficientStats(**(honest.to_dict() | bad))))


def test_binary_cells_must_agree_with_the_sums():
    from mllm_dr.metrics import SufficientStats
    from mllm_dr.protocol import stats_from_record, stats_record

    # two participants counted true and predicted positive (>= 10) while every total is 0
    zero_positive = SufficientStats(n=2, tp=2)
    # three true negatives (<= 9 each) whose true totals sum to 30
    heavy_negatives = SufficientStats(n=3, sx=30, sy=0, sxx=300, syy=0, sxy=0, sae=30, tn=3)
    # two predicted positives whose squares are too small: syy = 150 < 2 x 10^2 (consistent otherwise)
    light = SufficientStats(n=3, sx=20, sy=20, sxx=200, syy=150, sxy=150, sae=10, tp=2, tn=1)
    for forged in (zero_positive, heavy_negatives, light):
        with pytest.raises(ValueError, match="counted >= 10"):
            stats_from_record(stats_record(forged))


def test_honest_whole_totals_always_pass():
    from mllm_dr.metrics import ItemStats, SufficientStats
    from mllm_dr.protocol import stats_from_record, stats_record

    rng = random.Random(1)
    merged, items = SufficientStats(), ItemStats()
    for trial in range(300):
        block, ib = SufficientStats(), ItemStats()
        for _ in range(rng.choice([1, 2, 3, 7, 20])):
            true = [rng.randint(0, 3) for _ in range(9)]
            pred = list(true) if trial % 7 == 0 else [rng.randint(0, 3) for _ in range(9)]
            block.add(float(sum(true)), float(sum(pred)))
            known = rng.choice([9, 8, 1])                     # items with a known true score (the rest None)
            ib.add(true[:known] + [None] * (9 - known), pred)
        assert stats_from_record(stats_record(block)) == block
        assert ItemStats.from_record(ib.to_dict()) == ib
        merged, items = merged.merge(block), items.merge(ib)
    assert merged.problem() is None and items.problem() is None
    extremes = SufficientStats()
    for t, p in ((0, 27), (27, 0), (9, 10), (10, 9), (27, 27), (0, 0)):
        extremes.add(t, p)
    assert stats_from_record(stats_record(extremes)) == extremes
    wide = ItemStats()
    wide.add([0, 3, 0, 3], [3, 0, 3, 0])
    assert ItemStats.from_record(wide.to_dict()) == wide


@pytest.mark.parametrize("bad", [
    {"sae": 1e5, "sse": 2.5e9},                      # item MAE 25,000 (each item error is <= 3)
    {"sse": 9 * 6 + 1.0},                            # squared errors beyond 9 per item
    {"sae": 6.0, "sse": 1.0},                        # sae^2 > n x sse (no set of errors gives both)
    {"sum_std_pred": 100.0},                         # a spread beyond 1.5 per participant
    {"sum_std_true": 3.5},
    {"n_participants": 4},                           # participants with >= 2 items, more than items / 2
])
def test_impossible_item_statistics_are_refused(bad):
    from mllm_dr.metrics import ItemStats

    honest = ItemStats()
    honest.add([3, 2, 1], [3, 2, 2])
    honest.add([0, 0, 1], [1, 1, 1])
    assert ItemStats.from_record(honest.to_dict()) == honest
    with pytest.raises(ValueError, match="impossible ItemStats"):
        ItemStats.from_record(honest.to_dict() | bad)


def test_center_leaves_out_a_site_with_impossible_predicted_or_item_sums(tmp_path, flower_task):
    from test_federation_units import pooled_evaluation

    from mllm_dr.evaluation import Evaluation
    from mllm_dr.protocol import EvaluateReply

    def site(pairs):
        e = Evaluation()
        for true, pred in pairs:
            e.stats.add(sum(true), sum(pred))
            e.item_stats.add(true, pred)
            e.head_stats.add(sum(true), sum(pred))
            e.head_item_stats.add(true, pred)
            e.items += len(true)
        return EvaluateReply.of(e).to_record()

    honest = site([([3, 3, 3, 2], [3, 3, 2, 2]), ([0, 0, 1, 0], [0, 1, 1, 0]), ([2, 3, 2, 3], [2, 2, 2, 3]),
                   ([1, 1, 0, 0], [1, 1, 0, 0])])
    small = site([([3, 3, 3, 3], [3, 3, 3, 3]), ([0, 0, 0, 0], [0, 0, 0, 0])])
    forged = {"sums": small | {"ss-sy": 2e4, "ss-syy": 2e8, "ss-sxy": 6e4 * 2},
              "items": small | {"is-sae": 1e5, "is-sse": 2.5e9},
              "head": small | {"ss-maa-sy": 0.0, "ss-maa-syy": 0.0, "ss-maa-sxy": 0.0}}
    evaluation = pooled_evaluation(tmp_path, honest, list(forged.values()))
    assert list(evaluation["sites"]) == ["site-11"]
    assert sorted(evaluation["failed"]) == ["site-12", "site-13", "site-14"]
    assert "predicted totals' sums" in evaluation["failed"]["site-12"]
    assert "impossible ItemStats" in evaluation["failed"]["site-13"]
    assert "counted >= 10" in evaluation["failed"]["site-14"]
    assert evaluation["pooled"]["n"] == 4 and evaluation["pooled"]["item_mae"] == pytest.approx(3 / 16)


# 2. undefined precision / recall / F1 -----------------------------------------------------------------------

def test_undefined_precision_recall_f1_are_nan_null_and_n_a(tmp_path):
    from mllm_dr.atomic import json_text
    from mllm_dr.evaluation import Evaluation
    from mllm_dr.metrics import evaluate_totals
    from mllm_dr.reports import render_report

    none_called = evaluate_totals([12, 15, 3], [4, 5, 3])      # positives, none predicted: no precision
    assert math.isnan(none_called["precision"]) and none_called["recall"] == 0.0 and none_called["f1"] == 0.0
    no_positive = evaluate_totals([2, 3], [1, 4])             # no positive anywhere: nothing defined
    assert all(math.isnan(no_positive[k]) for k in ("precision", "recall", "f1"))
    only_predicted = evaluate_totals([2, 3], [12, 4])         # a false positive, no true positive: no recall
    assert only_predicted["precision"] == 0.0 and math.isnan(only_predicted["recall"]) and only_predicted["f1"] == 0.0
    assert _strict(json_text(no_positive))["f1"] is None

    e = Evaluation()
    for t, p in ((2, 1), (3, 4)):
        e.stats.add(t, p)
    rows = [{"participant": f"p{i}", "true": t, "pred": p, "regression_total": p} for i, (t, p) in
            enumerate(((2, 1), (3, 4)))]
    text, _ = render_report(tmp_path / "r.md", e.metrics(), rows, "t", max_total=27)
    line = next(x for x in text.splitlines() if x.startswith("| MLlm-DR"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:5] == ["n/a", "n/a", "n/a"] and cells[7] == "n/a"        # P, R, F1; no item: no rate
    assert "nan" not in text.lower()


# 3. strict history JSON, format_violation_rate of no item ---------------------------------------------------

def test_history_is_strict_json_and_no_item_has_no_violation_rate(tmp_path):
    from mllm_dr.evaluation import Evaluation
    from mllm_dr.reports import global_checks
    from mllm_dr.run_folder import RunFolder

    m = Evaluation().metrics()
    assert math.isnan(m["format_violation_rate"])              # not a perfect 0.0 over no item
    folder = RunFolder(tmp_path, "r")
    folder.start()
    folder.update(evaluation={"round": 2, "pooled": m | {"maa_ccc": float("nan")}, "sites": {}, "failed": {}})
    hist = _strict(folder.history_path.read_text())
    assert hist["evaluation"]["pooled"]["format_violation_rate"] is None and hist["evaluation"]["pooled"]["ccc"] is None
    hist["rounds"] = [{"round": 1, "validation": {"global_round": 0, "ccc": 0.5, "mae": 3.0}}]
    assert list(global_checks(hist)) == [0]                    # a null head figure is no curve point
    hist["evaluation"]["pooled"]["maa_ccc"] = float("nan")
    assert list(global_checks(hist)) == [0]


# 5. negation in the severity check ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,claim", [
    ("The participant can barely enjoy anything.", "severe"),
    ("Not feeling good most days.", "severe"),
    ("I'm not feeling good at all lately", "severe"),
    ("I don't really feel happy", "severe"),
    ("not sleeping well", "severe"),
    ("Not tired, feeling good.", "mild"),                       # the negator stops at a content word
    ("feeling good", "mild"),
    ("hardly ever feels fine", None),                           # two skipped words max: "ever" is not one
])
def test_severity_claim_reads_negation_on_the_original_words(text, claim):
    from mllm_dr.grounding import severity_claim

    assert severity_claim(text) == claim


def test_negated_good_at_a_high_score_is_not_opposite():
    from mllm_dr.grounding import states_opposite

    assert not states_opposite("Not feeling good most days.", 2)
    assert not states_opposite("She says she can barely enjoy anything.", 3)
    assert states_opposite("She can barely enjoy anything.", 0)
    assert states_opposite("Feeling good and sleeping well.", 3)


# 6, 7. the fallback score of the shown value; a non-finite head value ---------------------------------------

class _HeadEngine:
    """The tiny model's own answers (format broken), its head value replaced by ``value``."""

    def __init__(self, model, value):
        self.model, self.value = model, value

    def generate(self, batch, *args):
        ids, reg = self.model.generate(batch, *args)
        return ids, torch.full_like(reg, self.value)


@pytest.mark.parametrize("value,score", [(2.5, 3), (2.4963, 3), (2.4949, 2), (-0.7, 0), (3.6, 3)])
def test_fallback_is_the_shown_value_rounded_half_up(tiny, value, score):
    from test_model import _example, _model

    from mllm_dr.scoring import fallback_score, regression_text, score_examples

    sm = _model(tiny)
    item = score_examples(sm, [_example(answer=None)], 4, engine=_HeadEngine(sm.model, value))[0]
    assert item.source == "regression" and item.score == score == fallback_score(item.regression_score)
    assert regression_text(value) in item.rationale


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_head_value_is_a_named_error(tiny, value):
    from test_model import _example, _model

    from mllm_dr.errors import MllmDrError
    from mllm_dr.scoring import HeadValueError, score_examples

    sm = _model(tiny)
    with pytest.raises(HeadValueError, match=r"participant p1, item Sleep: the regression head gave") as err:
        score_examples(sm, [_example(answer=None)], 4, engine=_HeadEngine(sm.model, value))
    assert isinstance(err.value, MllmDrError) and "\n" not in str(err.value)


# 8. maa_* pooled only when every site sent head statistics --------------------------------------------------

def _site_eval(pairs, head=True):
    from mllm_dr.evaluation import Evaluation

    e = Evaluation()
    for true, pred in pairs:
        e.stats.add(sum(true), sum(pred))
        e.item_stats.add(true, pred)
        if head:
            e.head_stats.add(sum(true), sum(pred))
            e.head_item_stats.add(true, pred)
        e.items += len(true)
    return e


def test_maa_figures_only_over_every_site():
    from mllm_dr.evaluation import Evaluation

    a = _site_eval([([3, 3, 2], [3, 2, 2]), ([0, 1, 0], [0, 1, 1])])
    b = _site_eval([([2, 2, 2], [1, 1, 1]), ([1, 0, 0], [1, 0, 1])], head=False)
    assert math.isfinite(a.metrics()["maa_mae"])
    pooled = Evaluation()
    pooled.merge(a)
    pooled.merge(b)
    m = pooled.metrics()
    assert m["n"] == 4 and math.isfinite(m["mae"])
    assert all(math.isnan(v) for k, v in m.items() if k.startswith("maa_"))


def test_center_names_the_sites_without_head_statistics(tmp_path, flower_task):
    from flwr.app import MetricRecord
    from test_federation_units import _reply, _strategy

    from mllm_dr.protocol import EvaluateReply

    with_head = EvaluateReply.of(_site_eval([([3, 3, 2], [3, 2, 2]), ([0, 1, 0], [0, 1, 1])])).to_record()
    without = EvaluateReply.of(_site_eval([([2, 2, 2], [1, 1, 1])], head=False)).to_record()
    strat = _strategy(tmp_path, min_sites=2)
    nodes = {11: with_head, 12: without}
    strat.sites = {n: f"site-{n}" for n in nodes}
    strat._sent = list(nodes)
    strat.aggregate_evaluate(2, [_reply(n, {"metrics": MetricRecord(r)}, "evaluate") for n, r in nodes.items()])
    evaluation = _strict(strat.folder.history_path.read_text())["evaluation"]
    assert sorted(evaluation["sites"]) == ["site-11", "site-12"] and evaluation["pooled"]["n"] == 3
    assert evaluation["pooled"]["maa_ccc"] is None and evaluation["pooled"]["maa_item_mae"] is None
    assert evaluation["maa_not_pooled"]["sites"] == ["site-12"]

