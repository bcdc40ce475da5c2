"""What a task is: train / validation / test splits, a model factory, a loss and a default grouping."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Split:
    """Inputs and targets of one split, as tensors."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches in a random order (``generator`` given) or in order, the last one possibly short."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            idx = order[i : i + batch_size].to(self.x.device)
            yield self.x[idx], self.y[idx]

    def to(self, device: str | torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Task:
    """A supervised task with fixed splits. ``loss_fn(model, (x, y))`` is the training loss."""

    name: str
    train: Split
    val: Split
    test: Split
    make_model: Callable[[int], nn.Module]  # seed -> freshly initialised model
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    grouping: str | Callable[[str, nn.Parameter], str] = "layer"  # a group_parameters strategy
    classification: bool = True

    def to(self, device: str | torch.device) -> Task:
        return Task(
            self.name,
            self.train.to(device),
            self.val.to(device),
            self.test.to(device),
            self.make_model,
            self.loss_fn,
            self.grouping,
            self.classification,
        )
