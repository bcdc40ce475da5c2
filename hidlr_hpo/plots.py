"""Figures of one training run (for its MLflow child run): group rates over training, loss against compute."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .training import TrainResult  # noqa: E402

__all__ = ["plt", "trial_figures"]


def trial_figures(result: TrainResult) -> list[tuple[str, Figure]]:
    """``[(artifact file, figure)]``: the group rates over training and the validation loss against compute.

    The caller closes the figures (``plt.close``) once logged.
    """
    figures = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    h = result.hidlr
    if h is not None and h.history:  # Hi-DLR: the applied rates at every refit
        steps = [r.step for r in h.history]
        for k, name in enumerate(h.group_names):
            ax.plot(steps, [r.applied_lrs[k] for r in h.history], label=f"group {name}")
        ax.set_xlabel("optimizer step")
    else:  # others: the rate each group stepped with at every epoch's end
        names = result.epochs[0].groups if result.epochs else []
        for k, name in enumerate(names):
            ax.plot([e.step for e in result.epochs], [e.effective_lrs[k] for e in result.epochs], label=f"group {name}")
        ax.set_xlabel("optimizer step (epoch ends)")
    ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    ax.set_title("Group learning rates over training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.append(("plots/learning_rates.png", fig))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([e.compute for e in result.epochs], [e.val_loss for e in result.epochs], marker=".", label="validation")
    ax.plot([e.compute for e in result.epochs], [e.train_loss for e in result.epochs], marker=".", label="train")
    ax.set_yscale("log")
    ax.set_xlabel("compute (forward-equivalents per example)")
    ax.set_ylabel("loss")
    ax.set_title("Loss against compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.append(("plots/loss_vs_compute.png", fig))
    return figures
