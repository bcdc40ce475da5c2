"""The five-minute tutorial (docs/tutorial.md) as one script: Hi-DLR in a plain PyTorch loop, nothing else.

    python examples/quickstart.py [--epochs 10]

An MLP on scikit-learn's bundled digits (offline), AdamW underneath, one learning rate per layer fitted by
Hi-DLR from probes on held-out batches; prints each epoch's validation loss and the rates Hi-DLR chose.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hidlr_hpo import HiDLR, group_parameters


def loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=batch_size, shuffle=True)
    return train_loader, val_loader


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    total = sum(float(loss_fn(model, batch)) * len(batch[1]) for batch in loader)
    model.train()
    return total / len(loader.dataset)


def main(epochs: int = 10, verbose: bool = True) -> HiDLR:
    torch.manual_seed(0)
    train_loader, val_loader = loaders()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    base = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(base, model, loss_fn, probes=val_loader, total_steps=epochs * len(train_loader))
    for epoch in range(epochs):
        for batch in train_loader:
            loss_fn(model, batch).backward()
            hidlr.step()
            hidlr.zero_grad()
        val_loss = evaluate(model, val_loader)
        hidlr.report_validation(val_loss)
        if verbose:
            rates = "  ".join(f"{name} {lr:.1e}" for name, lr in zip(hidlr.group_names, hidlr.lrs(), strict=True))
            print(f"epoch {epoch + 1:>2}  val loss {val_loss:.3f}  rates {rates}")
    return hidlr


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    main(parser.parse_args().epochs)
