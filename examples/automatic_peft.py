"""Automatic PEFT (docs/peft.md): Hi-DLR measures each group's influence and freezes the negligible ones.

    python examples/automatic_peft.py [--epochs 8] [--budget 0.5]

An MLP on scikit-learn's digits, one group per layer (and the biases as a group of their own, tiny and
usually influential); ``HiDLR(freeze=FreezePolicy(budget=...))`` keeps training at most that fraction of
the parameters, chosen greedily by the measured loss decrease per parameter, and really freezes the rest
(``requires_grad`` off, no gradient, no optimizer state, skipped by the probes).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hidlr_hpo import FreezePolicy, HiDLR, group_parameters
from hidlr_hpo.tasks import get_task


def by_layer_biases_apart(name: str, param: nn.Parameter) -> str:
    return "biases" if name.endswith("bias") else f"layer_{name.split('.')[0]}"  # 0.weight -> layer_0


def main(epochs: int = 8, budget: float = 0.5, verbose: bool = True) -> HiDLR:
    torch.manual_seed(0)
    task = get_task("digits")
    train_loader = DataLoader(TensorDataset(task.train.x, task.train.y), batch_size=64, shuffle=True)
    val_loader = DataLoader(TensorDataset(task.val.x, task.val.y), batch_size=128, shuffle=True)
    model = task.make_model(0)
    base = torch.optim.AdamW(group_parameters(model, by_layer_biases_apart), lr=1e-3)
    policy = FreezePolicy(budget=budget, warmup=0.25, min_refits=2)  # decide after a quarter of the run
    hidlr = HiDLR(base, model, task.loss_fn, probes=val_loader, total_steps=epochs * len(train_loader),
                  freeze=policy)  # fmt: skip
    for epoch in range(epochs):
        for batch in train_loader:
            task.loss_fn(model, batch).backward()
            hidlr.step()
            hidlr.zero_grad()
        with torch.no_grad():
            model.eval()
            val_loss = float(task.loss_fn(model, (task.val.x, task.val.y)))
            model.train()
        hidlr.report_validation(val_loss)
        if verbose:
            print(f"epoch {epoch + 1}: val loss {val_loss:.3f}, frozen {hidlr.frozen_groups}, "
                  f"trainable {hidlr.trainable_fraction:.0%}")  # fmt: skip
    return hidlr


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()
    main(args.epochs, args.budget)
