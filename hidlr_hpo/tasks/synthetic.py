"""Synthetic offline tasks where per-group curvature truly differs.

- ``nam``: NAM-style additive regression, y = sum_j f_j(x_j) + noise, one sub-network per feature plus a
  linear output layer; one group per sub-network and one for the output layer. The shape functions differ
  in scale and wiggliness (and one feature is irrelevant), so the groups need different learning rates.
- ``multitask``: a shared trunk with one linear head per task; the tasks' targets differ in scale by
  100x, so the heads see very different curvature. Groups: the trunk and each head.

Both are generated from a fixed seed (``data_seed``) and split 60 / 20 / 20.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Split, Task

SHAPES = {
    "sin": lambda x: torch.sin(3.0 * x),
    "square": lambda x: 4.0 * x**2 - 4.0 / 3.0,
    "linear": lambda x: 0.2 * x,
    "exp": lambda x: torch.exp(2.0 * x) / 3.0 - 1.2,
    "step": lambda x: 2.0 * torch.tanh(10.0 * x),
    "irrelevant": lambda x: torch.zeros_like(x),
}


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _splits(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[Split, Split, Split]:
    order = torch.randperm(len(x), generator=gen)
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    return Split(x[order[:a]], y[order[:a]]), Split(x[order[a:b]], y[order[a:b]]), Split(x[order[b:]], y[order[b:]])


class AdditiveModel(nn.Module):
    """f(x) = w^T (g_1(x_1), ..., g_d(x_d)) + c with a small MLP g_j per feature (a NAM)."""

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            for _ in range(n_features)
        )
        self.output = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.cat([g(x[:, j : j + 1]) for j, g in enumerate(self.features)], dim=1)
        return self.output(parts)


def _prefix(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def nam_task(n_samples: int = 3000, noise: float = 0.3, hidden: int = 32, data_seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(data_seed)
    shapes = list(SHAPES.values())
    x = torch.rand(n_samples, len(shapes), generator=gen) * 2.0 - 1.0
    y = sum(f(x[:, j]) for j, f in enumerate(shapes)) + noise * torch.randn(n_samples, generator=gen)
    train, val, test = _splits(x, y.unsqueeze(1), gen)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return AdditiveModel(len(shapes), hidden)

    # Groups: features.0 ... features.5 (one sub-network each) and output.
    def grouping(name: str, param: nn.Parameter) -> str:
        return _prefix(name, 2) if name.startswith("features.") else "output"

    return Task("nam", train, val, test, make_model, mse, grouping, classification=False)


class MultiHead(nn.Module):
    def __init__(self, n_in: int, n_tasks: int, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)


def multitask_task(
    n_samples: int = 3000, n_in: int = 10, scales: tuple[float, ...] = (0.1, 1.0, 10.0), data_seed: int = 0
) -> Task:
    """Three regression targets sharing a latent representation, at scales 0.1, 1 and 10.

    The loss is the mean over tasks of each task's MSE divided by its scale squared, so every task weighs the
    same in the objective while the heads' curvature still differs by the scale ratio squared.
    """
    gen = torch.Generator().manual_seed(data_seed)
    x = torch.randn(n_samples, n_in, generator=gen)
    latent = torch.tanh(x @ torch.randn(n_in, 8, generator=gen) / math.sqrt(n_in))
    targets = []
    for s in scales:
        w = torch.randn(8, generator=gen)
        targets.append(s * (latent @ w + 0.1 * torch.randn(n_samples, generator=gen)))
    y = torch.stack(targets, dim=1)
    train, val, test = _splits(x, y, gen)
    weights = torch.tensor([1.0 / s**2 for s in scales])

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, target = batch
        per_task = ((model(inputs) - target) ** 2).mean(dim=0)
        return (per_task * weights.to(per_task.device)).mean()

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return MultiHead(n_in, len(scales))

    def grouping(name: str, param: nn.Parameter) -> str:
        return "trunk" if name.startswith("trunk.") else _prefix(name, 2)

    return Task("multitask", train, val, test, make_model, loss_fn, grouping, classification=False)
