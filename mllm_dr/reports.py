"""Reports a site keeps: the evaluation table (markdown) with its predicted-vs-true plot.

Reports hold per-participant rows: they stay in the workspace's ``reports/``.
"""

from __future__ import annotations

from pathlib import Path

from mllm_dr import phq
from mllm_dr.atomic import atomic_write_text


def write_report(path: Path, metrics: dict, rows: list[dict], title: str) -> Path:
    """Markdown in the paper's table layout plus a predicted-vs-true PNG beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllm_dr.private import make_private, private_dir

    if not path.parent.exists():                      # per-participant rows: owner only (never re-mode a
        private_dir(path.parent)                      # folder the user chose)
    png = path.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter([r["true"] for r in rows], [r["pred"] for r in rows], s=18)
    ax.plot([0, 27], [0, 27], "k--", lw=0.8)
    ax.axhline(phq.BINARY_CUTOFF, color="grey", lw=0.5)
    ax.axvline(phq.BINARY_CUTOFF, color="grey", lw=0.5)
    ax.set(xlabel="true PHQ total", ylabel="predicted PHQ total", title=title, xlim=(0, 27), ylim=(0, 27))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    make_private(png)
    m = metrics
    text = (f"# {title}\n\n| Model | CCC | Pre | Rec | F1 | RMSE | MAE | format violations |\n|---|---|---|---|---|---|---|---|\n"
            f"| MLlm-DR | {m['ccc']:.2f} | {m['precision']:.2f} | {m['recall']:.2f} | {m['f1']:.2f} | {m['rmse']:.2f} | "
            f"{m['mae']:.2f} | {m['format_violation_rate']:.1%} |\n\nn = {m['n']} participants. CCC uses population "
            f"moments (AVEC 2019). Binary call: total >= {phq.BINARY_CUTOFF}.\n\n![predicted vs true]({png.name})\n\n"
            "| participant | true | predicted | regression-head total |\n|---|---|---|---|\n"
            + "".join(f"| {r['participant']} | {r['true']} | {r['pred']} | {r['regression_total']} |\n" for r in rows))
    atomic_write_text(path, text)
    return path
