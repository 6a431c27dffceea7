"""Metrics on participant totals (CCC with population moments, as AVEC 2019; RMSE, MAE, P/R/F1)
and on item scores (ItemStats: item MAE, exact-item accuracy, within-participant spread).

Everything is computed from sufficient statistics, so a federation can pool sites exactly
without any per-patient value leaving a site.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from mllm_dr import phq
from mllm_dr.phq import BINARY_CUTOFF, PHQ9_ITEMS, max_total


@dataclass
class SufficientStats:
    n: int = 0
    sx: float = 0.0    # sum of true totals
    sy: float = 0.0    # sum of predicted totals
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0
    sae: float = 0.0   # sum of absolute errors
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, true: float, pred: float) -> None:
        self.n += 1
        self.sx += true
        self.sy += pred
        self.sxx += true * true
        self.syy += pred * pred
        self.sxy += true * pred
        self.sae += abs(true - pred)
        t, p = true >= BINARY_CUTOFF, pred >= BINARY_CUTOFF
        self.tp += t and p
        self.fp += (not t) and p
        self.fn += t and not p
        self.tn += (not t) and not p

    def merge(self, other: "SufficientStats") -> "SufficientStats":
        return SufficientStats(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def to_dict(self) -> dict:
        return asdict(self)

    def problem(self) -> str | None:
        """Why these cannot be one party's statistics (a site's reply is its own say), else None: every
        value finite, the counts whole and >= 0, the four binary cells summing to n, the sums of squares
        and of absolute errors >= 0."""
        values = asdict(self)
        if not all(math.isfinite(v) for v in values.values()):
            return "a value is not finite"
        counts = ("n", "tp", "fp", "fn", "tn")
        if any(values[k] < 0 or values[k] != int(values[k]) for k in counts):
            return "a count is negative or not whole"
        if self.tp + self.fp + self.fn + self.tn != self.n:
            return f"tp + fp + fn + tn = {self.tp + self.fp + self.fn + self.tn}, not n = {self.n}"
        if min(self.sxx, self.syy, self.sae) < 0:
            return "a sum of squares or of absolute errors is negative"
        top = max_total(len(PHQ9_ITEMS))          # a true total lies in 0..27 whatever the questionnaire
        if not 0 <= self.sx <= top * self.n or self.sxx > top * top * self.n:
            return f"the true totals' sums are outside what {self.n} totals of 0-{top} can give"
        # a predicted total is a sum of item scores 0..3 too: unbounded predicted sums let a 2-participant
        # site move a pooled CCC from 0.91 to 0.00 (a review, session 45)
        if not 0 <= self.sy <= top * self.n or self.syy > top * top * self.n:
            return f"the predicted totals' sums are outside what {self.n} totals of 0-{top} can give"
        # the binary cells against the sums: a total counted positive is cutoff..top, a negative one
        # 0..cutoff-1 (totals are whole: sums of whole item scores)
        cut = BINARY_CUTOFF
        for what, pos, s1, s2 in (("true", self.tp + self.fn, self.sx, self.sxx),
                                  ("predicted", self.tp + self.fp, self.sy, self.syy)):
            low, high = cut * pos, (cut - 1) * (self.n - pos) + top * pos
            if not (low - 1e-9 * (low + 1) <= s1 <= high + 1e-9 * (high + 1)) or s2 < cut * cut * pos * (1 - 1e-12):
                return (f"{pos} of {self.n} {what} totals counted >= {cut}, but their sums cannot give that "
                        f"(sum {s1:g}, sum of squares {s2:g})")
        # what any real numbers satisfy (Cauchy-Schwarz), up to float round-off: a forged block breaking
        # them made a pooled CCC of 80 (a review, session 42)
        def at_most(a: float, b: float) -> bool:
            return a <= b + 1e-9 * (abs(b) + 1.0)

        sse = self.sxx - 2 * self.sxy + self.syy       # sum of squared errors
        round_off = 1e-9 * (self.sxx + self.syy + 1.0)
        if not (at_most(self.sx ** 2, self.n * self.sxx) and at_most(self.sy ** 2, self.n * self.syy)
                and at_most(self.sxy ** 2, self.sxx * self.syy) and sse >= -round_off
                and at_most(self.sae ** 2, self.n * (max(sse, 0.0) + round_off))):
            return "the sums are impossible together (no set of totals gives them)"
        return None


def compute(stats: SufficientStats) -> dict[str, float | int]:
    n = stats.n
    if n == 0:
        return {"n": 0, "ccc": float("nan"), "rmse": float("nan"), "mae": float("nan"),
                "precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    mx, my = stats.sx / n, stats.sy / n
    vx, vy = stats.sxx / n - mx * mx, stats.syy / n - my * my
    cov = stats.sxy / n - mx * my
    denom = vx + vy + (mx - my) ** 2
    ccc = 2 * cov / denom if denom > 0 else float("nan")
    mse = (stats.syy - 2 * stats.sxy + stats.sxx) / n
    # undefined is NaN (JSON null, "n/a" in reports), never 0.0: a site with no predicted positive has no
    # precision, one with no true positive no recall (a review, session 45). F1 is 2tp / (2tp + fp + fn), the
    # harmonic mean where both are defined and 0 where positives exist and none is found: a model that calls
    # no one depressed among depressed participants scores F1 0, not n/a. NaN only without any positive.
    nan = float("nan")
    precision = stats.tp / (stats.tp + stats.fp) if stats.tp + stats.fp else nan
    recall = stats.tp / (stats.tp + stats.fn) if stats.tp + stats.fn else nan
    f1_den = 2 * stats.tp + stats.fp + stats.fn
    f1 = 2 * stats.tp / f1_den if f1_den else nan
    return {"n": n, "ccc": ccc, "rmse": math.sqrt(max(mse, 0.0)), "mae": stats.sae / n,
            "precision": precision, "recall": recall, "f1": f1}


def evaluate_totals(true: list[float], pred: list[float]) -> dict[str, float | int]:
    stats = SufficientStats()
    for t, p in zip(true, pred, strict=True):
        stats.add(float(t), float(p))
    return compute(stats)


class PooledCounts:
    """Sums and counts in dataclass fields: sites pool them by adding field by field. Every field is
    >= 0 (counts, and sums of absolute/squared errors or of spreads); ``PARTS`` names the counts that
    cannot exceed another (part, whole)."""

    PARTS: ClassVar[tuple[tuple[str, str], ...]] = ()

    def merge(self, other):
        return type(self)(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{k: d[k] for k in asdict(cls())})

    @classmethod
    def from_record(cls, record: dict[str, float]):
        """Counts from a site's reply (floats on the wire); ValueError naming what is missing or
        impossible, so the center leaves that reply out instead of pooling it."""
        missing = [f.name for f in fields(cls) if f.name not in record]
        if missing:
            raise ValueError(f"{cls.__name__} without {', '.join(missing)}")
        values = {f.name: float(record[f.name]) for f in fields(cls)}
        if not all(math.isfinite(v) and v >= 0 for v in values.values()):
            raise ValueError(f"impossible {cls.__name__}: a value is negative or not finite")
        counts = [f.name for f in fields(cls) if f.type in (int, "int")]
        if any(values[k] != int(values[k]) for k in counts):
            raise ValueError(f"impossible {cls.__name__}: a count is not whole")
        counted = cls(**{k: int(v) if k in counts else v for k, v in values.items()})
        over = [f"{part} {values[part]:g} > {whole} {values[whole]:g}" for part, whole in cls.PARTS
                if values[part] > values[whole]]
        if over:
            raise ValueError(f"impossible {cls.__name__}: {'; '.join(over)}")
        why = counted.problem()
        if why:
            raise ValueError(f"impossible {cls.__name__}: {why}")
        return counted

    def problem(self) -> str | None:
        """What no set of real values gives, beyond >= 0 and ``PARTS`` (checked by ``from_record``), else None."""
        return None


@dataclass
class ItemStats(PooledCounts):
    """Item-level sufficient statistics: item MAE/RMSE, exact-item accuracy, within-participant spread.

    Counts and sums only, so a federation pools sites exactly with :meth:`merge` and no
    per-patient value leaves a site. :meth:`add` takes one participant's true and predicted
    item scores (dicts keyed by item, or equal-length sequences); items whose true or
    predicted score is unknown (None) are left out. Definitions (``compute``):

    - ``item_mae`` / ``item_rmse``: over all items with a known true score;
    - ``item_exact``: share of items whose prediction rounded half up to an integer equals
      the true score (regression-head values like 1.64 count as 2, 1.5 as 2);
    - ``pred_item_spread`` / ``true_item_spread``: mean over participants (with >= 2 known
      items) of the population standard deviation of their predicted / true item scores;
    - ``flat_pred_share``: among participants whose true items are not all equal, the share
      whose rounded predicted items are all equal (a model that scores who is severe, not
      what each item says, gets 1.0); NaN when no participant's true items vary.
    """

    PARTS: ClassVar[tuple[tuple[str, str], ...]] = (("exact", "n_items"), ("n_participants", "n_items"),
                                                     ("n_true_varies", "n_participants"), ("n_flat_pred", "n_true_varies"))
    n_items: int = 0
    sae: float = 0.0            # sum of absolute item errors
    sse: float = 0.0            # sum of squared item errors
    exact: int = 0              # items with round(pred) == true
    n_participants: int = 0     # participants with >= 2 known items
    sum_std_true: float = 0.0
    sum_std_pred: float = 0.0
    n_true_varies: int = 0      # participants whose true items are not all equal
    n_flat_pred: int = 0        # ... of which the rounded predictions are all equal

    def problem(self) -> str | None:
        """Item scores lie in 0..3 (true and predicted: generated or the head's fallback, both whole 0..3), so
        each absolute error is <= 3 and each squared one <= 9, their sums obey Cauchy-Schwarz, and a
        participant's spread (population standard deviation of values in 0..3) is <= 1.5. A forged
        2-participant site moved a pooled item MAE from 0.25 to 31,250 (a review, session 45)."""
        n, m, top = self.n_items, self.n_participants, phq.MAX_ITEM - phq.MIN_ITEM
        slack = 1e-9
        if self.sae > top * n * (1 + slack) or self.sse > top * top * n * (1 + slack):
            return f"item error sums (abs {self.sae:g}, squared {self.sse:g}) beyond {n} items of 0-{top}"
        if self.sae ** 2 > n * self.sse * (1 + slack) + slack:
            return "item error sums impossible together (sum of absolute errors squared > n x sum of squares)"
        if 2 * m > n:
            return f"{m} participants with >= 2 items, but only {n} items"
        if max(self.sum_std_true, self.sum_std_pred) > top / 2 * m * (1 + slack) + slack:
            return f"item spreads beyond {top / 2:g} for each of {m} participants"
        return None

    def add(self, true_items, pred_items) -> None:
        if isinstance(true_items, dict):
            keys = [k for k in true_items if k in pred_items]
            pairs = [(true_items[k], pred_items[k]) for k in keys]
        else:
            pairs = list(zip(true_items, pred_items, strict=True))
        pairs = [(float(t), float(p)) for t, p in pairs if t is not None and p is not None]
        for t, p in pairs:
            self.n_items += 1
            self.sae += abs(t - p)
            self.sse += (t - p) ** 2
            self.exact += int(round_half_up(p) == t)
        if len(pairs) < 2:
            return
        trues, preds = [t for t, _ in pairs], [p for _, p in pairs]
        self.n_participants += 1
        self.sum_std_true += _pstd(trues)
        self.sum_std_pred += _pstd(preds)
        if len(set(trues)) > 1:
            self.n_true_varies += 1
            self.n_flat_pred += int(len({round_half_up(p) for p in preds}) == 1)

    def compute(self) -> dict[str, float | int]:
        nan = float("nan")
        n, m = self.n_items, self.n_participants
        return {"n_items": n, "item_mae": self.sae / n if n else nan,
                "item_rmse": math.sqrt(self.sse / n) if n else nan, "item_exact": self.exact / n if n else nan,
                "n_participants": m, "pred_item_spread": self.sum_std_pred / m if m else nan,
                "true_item_spread": self.sum_std_true / m if m else nan,
                "flat_pred_share": self.n_flat_pred / self.n_true_varies if self.n_true_varies else nan}


def round_half_up(value: float) -> int:
    """Round half up (Python's round() sends 2.5 to 2)."""
    return math.floor(value + 0.5)


def _pstd(values: list[float]) -> float:
    """Population standard deviation."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
