"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes) with an MLP; groups by layer."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from .base import Split, Task


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def digits_task(hidden: tuple[int, ...] = (128, 128), split_seed: int = 0) -> Task:
    """60 / 20 / 20 stratified train / validation / test split, standardised on the training split.

    The split is fixed by ``split_seed`` so every method and seed sees the same data; seeds vary the
    model's initialisation and the batch order.
    """
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    train_idx, rest = train_test_split(idx, test_size=0.4, stratify=data.target, random_state=split_seed)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=data.target[rest], random_state=split_seed)
    # Pixels are 0..16; a floor of one intensity unit keeps pixels that are ~constant in the training split
    # from blowing up to huge values in the others.
    mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1.0)
    x = (x - mean) / std

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        sizes = (64, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], 10))
        return nn.Sequential(*layers)

    def split(i) -> Split:
        return Split(x[i], y[i])

    return Task("digits", split(train_idx), split(val_idx), split(test_idx), make_model, cross_entropy, "layer")
