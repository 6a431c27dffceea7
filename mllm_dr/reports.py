"""Reports a site keeps: the evaluation table (markdown) with its predicted-vs-true plot.

Reports hold per-participant rows: they stay in the workspace's ``reports/``.
"""

from __future__ import annotations

import math
from pathlib import Path

from mllm_dr import phq
from mllm_dr.atomic import atomic_write_text

SMALL_N = 30   # below this, one participant moves CCC/F1 a lot


def report_warnings(n: int, test_model: bool) -> list[str]:
    """What a reader of the metrics must know first."""
    out = []
    if n < SMALL_N:
        out.append(f"Only n = {n} participants: one participant can move CCC, F1 and RMSE a lot; "
                   "read these figures as indicative, not as the model's accuracy.")
    if test_model:
        out.append("The base model is the tiny-random TEST model: these figures are meaningless.")
    return out


def evaluation_figure(rows: list[dict], max_total: int, title: str):
    """Predicted vs true totals on the full PHQ range, the cut-off lines labelled, nothing clipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cut = phq.BINARY_CUTOFF
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter([r["true"] for r in rows], [r["pred"] for r in rows], s=22, alpha=0.8, clip_on=False,
               zorder=3, label="participant")
    ax.plot([0, max_total], [0, max_total], "k--", lw=0.8, label="prediction = truth")
    ax.axvline(cut - 0.5, color="tab:red", lw=0.8, label=f"cut-off: total >= {cut} is depressed")
    ax.axhline(cut - 0.5, color="tab:red", lw=0.8)
    margin = 0.5
    ax.set(xlim=(-margin, max_total + margin), ylim=(-margin, max_total + margin),
           xlabel=f"true PHQ total (0-{max_total})", ylabel=f"predicted PHQ total (0-{max_total})", title=title)
    ax.set_xticks(range(0, max_total + 1, 3))
    ax.set_yticks(range(0, max_total + 1, 3))
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig


REPORT_SUFFIXES_REFUSED = {".json": "its rows are written beside it as .json",
                           ".png": "its predicted-vs-true plot is written beside it as .png"}


def check_report_path(path: Path) -> None:
    """A markdown report path whose name a file written beside it would take is refused in one line: the rows
    (.json) or the plot (.png; ``evaluate --report x.png`` wrote the plot, then the markdown over it: session
    44)."""
    from mllm_dr.errors import InputError

    if why := REPORT_SUFFIXES_REFUSED.get(Path(path).suffix.lower()):
        raise InputError(f"--report is the markdown report (e.g. evaluate-test.md); {why}", path)


def figure_text(value, spec: str = ".2f") -> str:
    """A report figure; "n/a" where it is undefined (NaN, or null once read back from JSON): a precision with no
    predicted positive is not 0.00 (a review, session 45)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def render_report(path: Path, metrics: dict, rows: list[dict], title: str, *, max_total: int | None = None,
                  model: str | None = None, adapters: str | None = None, test_model: bool = False,
                  warnings: list[str] | None = None, engine: str | None = None) -> tuple[str, bytes]:
    """(markdown, PNG bytes) of the report ``write_report`` writes at ``path``, nothing written yet: ``evaluate``
    audits their hashes first, so no report exists without its entry (session 44).

    Markdown in the paper's table layout; the PNG is the predicted-vs-true plot it links to.
    ``max_total``: 24 for PHQ-8, 27 for PHQ-9 (callers should pass it; else guessed from the values).
    ``engine``: the one that scored (onnx_engine.ENGINES), named with its weights' precision.
    """
    import io

    import matplotlib.pyplot as plt

    from mllm_dr.onnx_engine import engine_label

    if max_total is None:
        max_total = 24 if all(max(r["true"], r["pred"]) <= 24 for r in rows) else 27
    m = metrics
    who = ", ".join(x for x in (model and f"base {model}", adapters and f"adapters {adapters}",
                                engine and f"engine {engine_label(engine)}") if x)
    plot_title = f"{title}\nn = {m['n']}" + (f"; {who}" if who else "")
    fig = evaluation_figure(rows, max_total, plot_title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    f = figure_text                  # "n/a" for an undefined figure (session 45)
    notes = report_warnings(m["n"], test_model) + list(warnings or [])
    text = (f"# {title}\n\n" + "".join(f"> **Warning:** {w}\n>\n" for w in notes) + ("\n" if notes else "")
            + (f"Model: {who}.\n\n" if who else "")
            + "| Model | CCC | Pre | Rec | F1 | RMSE | MAE | format violations |\n|---|---|---|---|---|---|---|---|\n"
            f"| MLlm-DR | {f(m['ccc'])} | {f(m['precision'])} | {f(m['recall'])} | {f(m['f1'])} | {f(m['rmse'])} | "
            f"{f(m['mae'])} | {f(m['format_violation_rate'], '.1%')} |\n"
            + (f"| MAA head alone (every item its fallback score) | {f(m['maa_ccc'])} | - | - | {f(m['maa_f1'])} | "
               f"{f(m['maa_rmse'])} | {f(m['maa_mae'])} | - |\n" if "maa_ccc" in m else "")
            + f"\nn = {m['n']} participants. CCC uses population "
            f"moments (AVEC 2019). Binary call: total >= {phq.BINARY_CUTOFF}.\n\n"
            f"![predicted vs true]({Path(path).with_suffix('.png').name})\n\n"
            # the head's total is the sum of its item scores, as in the "MAA head alone" row (session 44)
            "| participant | true | predicted | MAA head total (its item scores) |\n|---|---|---|---|\n"
            + "".join(f"| {r['participant']} | {r['true']} | {r['pred']} | {r['regression_total']} |\n" for r in rows))
    return text, buf.getvalue()


def save_report(path: Path, text: str, png: bytes) -> Path:
    """Write ``render_report``'s markdown at ``path`` and its plot beside it (.png), each whole or not at all;
    per-participant rows: owner only, in a folder made owner-only when it is made here (never re-mode a folder
    the user chose)."""
    from mllm_dr.atomic import atomic_write_bytes
    from mllm_dr.private import make_private, private_dir

    path = Path(path)
    if not path.parent.exists():
        private_dir(path.parent)
    png_path = path.with_suffix(".png")
    atomic_write_bytes(png_path, png)
    make_private(png_path)
    atomic_write_text(path, text)
    return path


def write_report(path: Path, metrics: dict, rows: list[dict], title: str, **how) -> Path:
    """Markdown in the paper's table layout plus a predicted-vs-true PNG beside it (``render_report``'s
    keyword arguments: max_total, model, adapters, test_model, warnings, engine), written now."""
    return save_report(path, *render_report(path, metrics, rows, title, **how))


def global_checks(history: dict) -> dict[int, dict]:
    """The held-out check of each global a federated run produced, by round (0 = the initial one):
    round r's sites check the global they receive before training (``--round-validation``), and the
    last global's is the final evaluation's MAA-head figure (the same totals, see evaluation.py)."""
    out = {r["validation"]["global_round"]: r["validation"] for r in history.get("rounds", [])
           if r.get("validation") and "global_round" in r["validation"]}
    final = history.get("evaluation") or {}
    head_ccc = (final.get("pooled") or {}).get("maa_ccc")
    if out and isinstance(head_ccc, (int, float)) and math.isfinite(head_ccc):   # null/NaN: not every site's head
        out[final["round"]] = {"ccc": final["pooled"]["maa_ccc"], "mae": final["pooled"]["maa_mae"]}
    return dict(sorted(out.items()))


def run_curves(history: dict, path: Path) -> Path:
    """A federated run's learning curves from its history: pooled train loss per round and, when
    the run asked for it (``--round-validation``), the pooled held-out check of each global."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllm_dr.private import make_private

    rounds = history.get("rounds", [])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["round"] for r in rounds], [r["train_loss"] for r in rounds], "o-", label="train loss (pooled)")
    ax.set(xlabel="round", ylabel="train loss", title=f"run {history.get('run')}: {history.get('base_model')}")
    checked = global_checks(history)
    if checked:
        right = ax.twinx()
        right.plot(list(checked), [c["ccc"] for c in checked.values()], "s--", color="tab:green",
                   label="held-out CCC of the global (regression head)")
        right.set_ylabel("held-out CCC")
        right.legend(loc="lower right", fontsize=8)
    ax.set_xticks(sorted({r["round"] for r in rounds} | set(checked)))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    make_private(path)
    return path
