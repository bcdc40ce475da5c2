"""Learning-rate schedules for the uniform-lr baselines: constant, linear decay, cosine with warm-up.

Each is a multiplier of every group's base rate, wrapped in torch's ``LambdaLR`` so that it has
``state_dict()`` and composes with any optimizer:

- ``constant``: 1 (after the warm-up);
- ``linear``: 1 - p, decaying to 0 at the last step;
- ``cosine``: (1 + cos(pi p)) / 2,

where p in [0, 1] is the fraction of the post-warm-up steps done; during the warm-up the multiplier rises
linearly from 1 / (warmup + 1) to 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULES", "make_schedule", "schedule_factor"]

SCHEDULES = ("constant", "linear", "cosine")


def schedule_factor(name: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The multiplier of the base rate at step t (0-based), for ``LambdaLR``.

    Example:
        >>> f = schedule_factor("cosine", total_steps=10, warmup_steps=2)
        >>> [round(f(t), 3) for t in (0, 1, 2, 6, 9)]
        [0.333, 0.667, 1.0, 0.5, 0.038]
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    decay_steps = total_steps - warmup_steps

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / (warmup_steps + 1)
        p = min(1.0, (t - warmup_steps) / decay_steps)
        if name == "linear":
            return 1.0 - p
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0

    return factor


def make_schedule(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """``LambdaLR(optimizer, schedule_factor(...))``; call its ``step()`` after every optimizer step."""
    return LambdaLR(optimizer, schedule_factor(name, total_steps, warmup_steps))
