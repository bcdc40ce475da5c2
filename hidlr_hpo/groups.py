"""Split a model's trainable parameters into named groups, as the ``param_groups`` a torch optimizer takes.

Each group is a dict ``{"params": [...], "name": str, "param_names": [...]}`` plus any per-group options
(e.g. ``lr``); torch optimizers keep the extra keys, so the names survive ``optimizer.state_dict()``.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> groups = group_parameters(model, "layer")
    >>> [g["name"] for g in groups]  # a bare Sequential's children are numbered: their type makes them readable
    ['Linear_0', 'Linear_2']
    >>> [g["name"] for g in group_parameters(model, "type")]
    ['weight', 'bias']
    >>> opt = torch.optim.AdamW(groups, lr=1e-3)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["STRATEGIES", "check_param_groups", "group_names", "group_parameters"]

STRATEGIES = ("layer", "type", "regex", "callable", "single")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    nn.RMSNorm,
)


def group_parameters(
    model: nn.Module,
    strategy: str | Callable[[str, nn.Parameter], str] = "layer",
    *,
    depth: int | None = None,
    patterns: Mapping[str, str] | None = None,
    rest: str | None = "rest",
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Group the trainable parameters of ``model``.

    Args:
        model: the module whose ``requires_grad`` parameters are grouped (frozen ones are left out).
        strategy: ``"layer"`` (one group per module owning parameters, named by its module path; ``depth``
            truncates the path, so ``depth=2`` groups ``encoder.layer.3.attn.q`` under ``encoder.layer``; a
            path that starts with a number, as in a bare ``nn.Sequential``, gets its module's type in front:
            ``Linear_0``, not ``0``), ``"type"`` (weight,
            bias, norm, embedding), ``"regex"`` (``patterns`` maps a group name to a regular expression
            searched in the parameter name), ``"single"`` (one group: GeN), or a callable
            ``fn(name, param) -> group name``.
        depth: for ``"layer"``: keep this many leading components of the module path.
        patterns: for ``"regex"``: ``{group_name: regex}``; a parameter matching two patterns is an error.
        rest: for ``"regex"``: the group that takes parameters no pattern matches (None: they are an error).
        **group_options: copied into every group (e.g. ``lr=1e-3``).

    Returns:
        Groups in order of first appearance in ``model.named_parameters()``.
    """
    # torch.compile wraps the model as `_orig_mod`: its groups keep the model's own names.
    named = [(n.removeprefix("_orig_mod."), p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")

    if callable(strategy):
        assign = strategy
    elif strategy == "layer":
        if depth is not None and depth < 1:
            raise ValueError(f"depth must be >= 1 or None, got {depth}")
        assign = _by_layer(depth, model)
    elif strategy == "type":
        assign = _by_type(model)
    elif strategy == "regex":
        if not patterns:
            raise ValueError("strategy='regex' needs patterns={group_name: regex, ...}")
        assign = _by_regex(patterns, rest)
    elif strategy == "single":

        def assign(name: str, param: nn.Parameter) -> str:
            return "all"
    else:
        raise ValueError(f"unknown grouping strategy {strategy!r}; use one of {STRATEGIES[:-1]} or a callable")

    groups: dict[str, dict[str, Any]] = {}
    for name, param in named:
        group = assign(name, param)
        if not isinstance(group, str) or not group:
            raise ValueError(f"the grouping gave {group!r} for parameter {name!r}; it must give a non-empty str")
        entry = groups.setdefault(group, {"params": [], "name": group, "param_names": [], **group_options})
        entry["params"].append(param)
        entry["param_names"].append(name)

    if strategy == "regex" and patterns:
        empty = [g for g in patterns if g not in groups]
        if empty:
            raise ValueError(
                f"regex groups {empty} matched no trainable parameter; check the patterns {dict(patterns)}"
            )
    result = list(groups.values())
    check_param_groups(result)
    return result


def check_param_groups(param_groups: Iterable[Mapping[str, Any]]) -> None:
    """Reject empty groups and parameters that appear in two groups (or twice in one)."""
    seen: dict[int, str] = {}
    for i, group in enumerate(param_groups):
        label = group.get("name", f"#{i}")
        params = list(group["params"])
        if not params:
            raise ValueError(f"parameter group {label!r} is empty; drop it or change the grouping")
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"parameter group {label!r} holds a {type(p).__name__}, not a tensor")
            if id(p) in seen:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in group {seen[id(p)]!r} and again in {label!r}; "
                    "each parameter must belong to exactly one group"
                )
            seen[id(p)] = label


def group_names(param_groups: Iterable[Mapping[str, Any]]) -> list[str]:
    """The ``name`` of each group, or ``group0``, ``group1``, ... where a group has none."""
    return [str(g.get("name", f"group{i}")) for i, g in enumerate(param_groups)]


def _by_layer(depth: int | None, model: nn.Module) -> Callable[[str, nn.Parameter], str]:
    modules = {n.removeprefix("_orig_mod."): m for n, m in model.named_modules()}

    def assign(name: str, param: nn.Parameter) -> str:
        parts = name.split(".")[:-1] or [name]  # a parameter registered on the root module is its own layer
        path = ".".join(parts[:depth] if depth else parts)
        if parts[0].isdigit() and path in modules:  # "0", "2" in charts say nothing: "Linear_0", "Linear_2"
            return f"{type(modules[path]).__name__}_{path}"
        return path

    return assign


def _by_type(model: nn.Module) -> Callable[[str, nn.Parameter], str]:
    owner = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{module_name}.{pname}" if module_name else pname] = module

    def assign(name: str, param: nn.Parameter) -> str:
        module = owner.get(name)
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            return "embedding"
        if isinstance(module, _NORM_TYPES):
            return "norm"
        return "bias" if name.rsplit(".", 1)[-1] == "bias" else "weight"

    return assign


def _by_regex(patterns: Mapping[str, str], rest: str | None) -> Callable[[str, nn.Parameter], str]:
    compiled = {}
    for group, pattern in patterns.items():
        try:
            compiled[group] = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex {pattern!r} for group {group!r}: {exc}") from exc

    def assign(name: str, param: nn.Parameter) -> str:
        hits = [g for g, rx in compiled.items() if rx.search(name)]
        if len(hits) > 1:
            raise ValueError(f"parameter {name!r} matches the patterns of groups {hits}; it would be in two groups")
        if hits:
            return hits[0]
        if rest is None:
            raise ValueError(f"parameter {name!r} matches no pattern; add one or pass rest='<group name>'")
        return rest

    return assign
