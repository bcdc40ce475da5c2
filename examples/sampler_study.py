"""HiDLRSampler in your own Optuna study (docs/sampler.md): tune AdamW's learning rate and weight decay.

    python examples/sampler_study.py [--trials 20] [--epochs 4] [--storage sqlite:///sampler-study.db]

Each trial trains a small MLP on scikit-learn's wine data (bundled, offline) and returns its final
validation loss. Both parameters are continuous and log-scaled, so HiDLRSampler models both (in log space);
with a storage URL the study resumes and other processes can share it.
"""

from __future__ import annotations

import argparse

import optuna
import torch
from sklearn.datasets import load_wine
from torch import nn

from hidlr_hpo import HiDLRSampler


def data(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_wine(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return (x[order[:120]], y[order[:120]]), (x[order[120:]], y[order[120:]])


def make_objective(epochs: int = 4):
    (x, y), (x_val, y_val) = data()

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        weight_decay = trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)
        torch.manual_seed(0)  # the same initialisation and batches for every trial: a smooth objective
        model = nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        for epoch in range(epochs):
            for i in range(0, len(y), 30):
                nn.functional.cross_entropy(model(x[i : i + 30]), y[i : i + 30]).backward()
                opt.step()
                opt.zero_grad()
            with torch.no_grad():
                val_loss = float(nn.functional.cross_entropy(model(x_val), y_val))
            trial.report(val_loss, epoch)  # a pruner, if the study has one, sees every epoch
        return val_loss

    return objective


def main(trials: int = 20, epochs: int = 4, storage: str | None = None, verbose: bool = True) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="wine-adamw", storage=storage, load_if_exists=True, sampler=HiDLRSampler(seed=0)
    )
    study.optimize(make_objective(epochs), n_trials=trials)
    if verbose:
        print(f"best validation loss {study.best_value:.4f} at {study.best_params} ({len(study.trials)} trials)")
    return study


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--storage", default=None, help="an Optuna storage URL (default: in memory)")
    args = parser.parse_args()
    main(args.trials, args.epochs, args.storage)
