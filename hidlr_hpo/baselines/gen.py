"""GeN, the generalised-Newton learning rate: Hi-DLR with one parameter group, with GeN's own defaults.

Bu & Xu, "Automatic gradient descent with generalized Newton's method" (GeN), 2024. GeN fits the loss along
the optimizer's update at the multipliers -1, 0, +1 of the current rate (three forward passes), sets the rate
to the parabola's minimiser eta* = G^T d / d^T H d, and guards it with a fit-quality threshold, a trust
ratio and smoothing. It is exactly :class:`~hidlr_hpo.HiDLR` with K = 1 and these settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..controller import HiDLR
from ..probe import LossFn

__all__ = ["GEN_DEFAULTS", "GeN"]

#: GeN's published defaults, as HiDLR keyword arguments. With the 3-point design the fit is exact, so the
#: R^2 threshold only rejects non-finite fits; pass ``design=5`` (random) to make it bite.
GEN_DEFAULTS: dict[str, Any] = {
    "interval": 4,  # refit every 4 steps
    "max_interval": None,  # always
    "mode": "diag",
    "design": "axial",  # K = 1: multipliers {0, +1, -1} of the current rate
    "delta": 1.0,
    "min_r2": 0.99,
    "trust_ratio": 2.0,
    "smoothing": 0.9,
    "smooth_decreases": True,  # GeN smooths both ways
    "believable_ratio": None,  # every proposal smoothed, and no plateau guard: neither is GeN's
    "plateau_factor": None,
}


def GeN(optimizer: torch.optim.Optimizer, model: nn.Module, loss_fn: LossFn, **overrides: Any) -> HiDLR:  # noqa: N802
    """A :class:`HiDLR` with GeN's defaults around an optimizer with exactly one param group.

    Example:
        >>> import torch
        >>> from hidlr_hpo.baselines import GeN
        >>> model = torch.nn.Linear(3, 1)
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> gen = GeN(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_fn, probes=None, total_steps=None)
        >>> gen.interval, gen.guards.min_r2
        (4, 0.99)

    Args:
        overrides: :class:`HiDLR`'s keyword arguments: ``probes`` and ``total_steps`` (required, as for HiDLR),
            and any other, replacing GeN's default.
    """
    if len(optimizer.param_groups) != 1:
        raise ValueError(
            f"GeN tunes one learning rate, but the optimizer has {len(optimizer.param_groups)} param groups; "
            "build it from model.parameters() or group_parameters(model, 'single'), or use HiDLR for several"
        )
    return HiDLR(optimizer, model, loss_fn, **{**GEN_DEFAULTS, **overrides})
