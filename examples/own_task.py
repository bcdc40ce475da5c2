"""Your own task in a study file: a factory that returns a ``hidlr_hpo.tasks.Task``.

A study file names it by import string (the module must be importable, e.g. from the working folder):

    [task]
    name = "own_task:wine_task"      # package.module:factory
    options = { hidden = 32 }         # keyword arguments of the factory, checked when the file is loaded

The splits may come from any map-style ``Dataset`` (or ``DataLoader``) of (input, target) pairs:
``Split.from_dataset`` loads each once into tensors, so that every method in a study sees the same seeded
batches. Here: scikit-learn's wine data (178 samples, 13 features, 3 classes), bundled with scikit-learn.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_wine
from torch import nn
from torch.utils.data import TensorDataset

from hidlr_hpo.tasks import Split, Task


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def wine_task(hidden: int = 32, split_seed: int = 0) -> Task:
    x, y = load_wine(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    parts = order[:106], order[106:142], order[142:]  # 60 / 20 / 20 %
    train, val, test = (Split.from_dataset(TensorDataset(x[i], y[i])) for i in parts)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(13, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    return Task("wine", train, val, test, make_model, cross_entropy, grouping="layer")
