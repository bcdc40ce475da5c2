"""Base optimizers by name, for study files: torch's own, SAGE, and the learning-rate-free peers.

The peers are optional (``pip install 'hidlr-hpo[peers]'``) and used as their packages ship them:

- ``prodigy``: Prodigy (``prodigyopt``), lr 1.0 means "trust the estimate of the distance to the solution";
- ``dadapt-adam``: D-Adaptation's Adam (``dadaptation``), lr 1.0 likewise;
- ``schedulefree-adamw``: Schedule-Free AdamW (``schedulefree``); it keeps two sequences and must be switched
  to ``eval()`` before evaluation and back to ``train()``: :func:`set_eval_mode` does that.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .sage import AdamaxSAGE, AdamWSAGE

__all__ = ["OPTIMIZERS", "make_optimizer", "set_eval_mode"]

# name -> a torch optimizer class, or (module, class, extra) of an optional package
OPTIMIZERS: dict[str, type[torch.optim.Optimizer] | tuple[str, str, str]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "sgd": torch.optim.SGD,
    "adamw-sage": AdamWSAGE,
    "adamax-sage": AdamaxSAGE,
    "prodigy": ("prodigyopt", "Prodigy", "peers"),
    "dadapt-adam": ("dadaptation", "DAdaptAdam", "peers"),
    "schedulefree-adamw": ("schedulefree", "AdamWScheduleFree", "peers"),
}


def optimizer_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    entry = OPTIMIZERS[name]
    if not isinstance(entry, tuple):
        return entry
    module, cls, extra = entry
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ImportError(f"optimizer {name!r} needs the package {module!r}: pip install 'hidlr-hpo[{extra}]'") from exc


def make_optimizer(
    name: str,
    param_groups: list[dict[str, Any]],
    lr: float,
    *,
    plain_groups: Sequence[str] = (),
    **options: Any,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over named param groups (see :func:`~hidlr_hpo.group_parameters`).

    Example:
        >>> import torch
        >>> from hidlr_hpo import group_parameters
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> opt = make_optimizer("adamw-sage", group_parameters(model, "layer"), 1e-3, plain_groups=["Linear_2"])
        >>> [(g["name"], g["sensitivity"]) for g in opt.param_groups]
        [('Linear_0', True), ('Linear_2', False)]

    Args:
        plain_groups: for the SAGE optimizers, the groups trained without the sensitivity scaling (SAGE's
            reference trains heads, embeddings and norms plainly).
        options: more keyword arguments of the optimizer (``weight_decay=...``, ``beta3=...``).
    """
    cls = optimizer_class(name)
    if plain_groups:
        if cls not in (AdamWSAGE, AdamaxSAGE):
            raise ValueError(f"plain_groups applies to the SAGE optimizers only, not to {name!r}")
        names = [g.get("name") for g in param_groups]
        unknown = sorted(set(plain_groups) - set(names))
        if unknown:
            raise ValueError(f"plain_groups names unknown groups {unknown}; the groups are {names}")
        for group in param_groups:
            group["sensitivity"] = group.get("name") not in set(plain_groups)
    return cls(param_groups, lr=lr, **options)


def set_eval_mode(optimizer: torch.optim.Optimizer, evaluating: bool) -> None:
    """Switch optimizers that keep a separate evaluation point (Schedule-Free) to it, or back; others: no-op."""
    method = getattr(optimizer, "eval" if evaluating else "train", None)
    if callable(method):
        method()
