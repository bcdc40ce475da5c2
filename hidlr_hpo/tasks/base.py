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

    @classmethod
    def from_dataset(cls, dataset: torch.utils.data.Dataset, batch_size: int = 1024) -> Split:
        """A split from a map-style ``Dataset`` (or a ``DataLoader`` over one) of (input, target) pairs,
        loaded into memory once: the studies draw seeded batches from the tensors, so that every method sees
        the same batches in the same order.

        Example:
            >>> import torch
            >>> from torch.utils.data import TensorDataset
            >>> split = Split.from_dataset(TensorDataset(torch.randn(10, 3), torch.arange(10)))
            >>> len(split), tuple(split.x.shape)
            (10, (10, 3))
        """
        loader = dataset if isinstance(dataset, torch.utils.data.DataLoader) else None
        if loader is None:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        xs, ys = [], []
        for batch in loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError("Split.from_dataset needs a dataset of (input, target) pairs")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError("Split.from_dataset got an empty dataset")
        return cls(torch.cat(xs), torch.cat(ys))


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
