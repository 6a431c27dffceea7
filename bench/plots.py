"""Figures for the benchmarks (matplotlib, Agg): learning curves and predicted-vs-true per arm."""

from __future__ import annotations

from pathlib import Path

ARMS = ("local_only", "federated", "pooled")
COLORS = {"local_only": "tab:orange", "federated": "tab:blue", "pooled": "tab:green"}


def epochs_of(point: dict, epochs_per_round: float | None = None) -> float:
    """Where a learning-curve point goes on the x axis: the local epochs done by then. A local arm's point
    is one epoch (``step``); a federated round carries its epochs (``epochs``: rounds x local epochs, a
    review, session 45: drawn at the round, a run of 3 local epochs a round was squeezed to a third of the
    local arms' axis). A federated point of an older report has no ``epochs``: ``epochs_per_round`` (the
    report's --local-epochs) gives them, else it stays at its round."""
    if "epochs" in point:
        return point["epochs"]
    return point["step"] * (epochs_per_round or 1)


def federation_figure(results: list[dict], path: Path, local_epochs: float | None = None) -> Path:
    """``local_epochs``: the run's epochs per federated round, for reports written before the federated
    curve carried its epochs (``epochs_of``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for r in results:
        for arm in (a for a in ARMS if a in r):
            for name, curve in r[arm]["curves"].items():
                per_round = r[arm].get("epochs_per_round", local_epochs) if arm == "federated" else None
                steps = [epochs_of(p, per_round) for p in curve]
                label = f"{arm} {name} seed {r['seed']}" if arm == "local_only" else f"{arm} seed {r['seed']}"
                axes[0].plot(steps, [p["train_loss"] for p in curve], color=COLORS[arm], alpha=0.6, label=label)
                axes[1].plot(steps, [p["check_ccc"] for p in curve], color=COLORS[arm], alpha=0.6, label=label)
    xlabel = "local epochs (federated: after each round)"
    axes[0].set(title="training loss per epoch / round", xlabel=xlabel, ylabel="loss")
    axes[1].set(title="held-out check (regression head) CCC", xlabel=xlabel, ylabel="CCC")
    axes[1].legend(fontsize=6)
    for arm, marker in zip(ARMS, ("o", "s", "^")):
        if not all(arm in r for r in results):
            continue
        pts = [(row["true"], row["pred"]) for r in results for row in r[arm]["rows"]]
        axes[2 if arm != "local_only" else 3].scatter(*zip(*pts), s=14, marker=marker, color=COLORS[arm], alpha=0.7,
                                                      label=arm)
    for ax in axes[2:]:
        ax.plot([0, 24], [0, 24], "k--", lw=0.8)
        ax.axhline(10, color="grey", lw=0.5)
        ax.axvline(10, color="grey", lw=0.5)
        ax.set(xlim=(-0.5, 24.5), ylim=(-0.5, 24.5), xlabel="true PHQ-8 total", ylabel="predicted total")
        ax.legend(fontsize=7)
    axes[2].set_title("federated and pooled: predicted vs true")
    axes[3].set_title("local-only: predicted vs true")
    fig.suptitle("MLlm-DR on the synthetic multi-site corpus (NOT clinical data)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
