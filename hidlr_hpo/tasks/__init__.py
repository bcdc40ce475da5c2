"""Offline tasks: a dataset already on the machine, a model factory and a default grouping.

A study file names its task by an import string, ``"package.module:factory"``, whose factory returns a
:class:`Task` (its splits from tensors or from any map-style ``Dataset`` of (input, target) pairs, see
:meth:`Split.from_dataset`). The built-in tasks are the same mechanism under short names.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from .base import Split, Task
from .digits import digits_task
from .synthetic import multitask_task, nam_task
from .tabular import wide_deep_task

__all__ = [
    "TASKS",
    "Split",
    "Task",
    "digits_task",
    "get_task",
    "multitask_task",
    "nam_task",
    "resolve_task",
    "wide_deep_task",
]

#: short names of the built-in tasks, and the factories they stand for
TASKS: dict[str, str] = {
    "digits": "hidlr_hpo.tasks.digits:digits_task",
    "nam": "hidlr_hpo.tasks.synthetic:nam_task",
    "multitask": "hidlr_hpo.tasks.synthetic:multitask_task",
    "wide_deep": "hidlr_hpo.tasks.tabular:wide_deep_task",
    "sentiment": "hidlr_hpo.tasks.text:sentiment_task",  # the [text] extra: transformers, peft, MiniLM
}


def resolve_task(name: str, options: dict[str, Any] | None = None) -> Callable[..., Task]:
    """The factory behind a task name or ``"package.module:factory"``, with ``options`` checked against it.

    Raises a ValueError that says what was wrong (an unknown name, a module that does not import, a missing
    or non-callable factory, an option the factory does not take) without building the task.
    """
    target = TASKS.get(name, name)
    if ":" not in target:
        raise ValueError(
            f"unknown task {name!r}: use one of {sorted(TASKS)} or an import string 'package.module:factory'"
        )
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = " (pip install 'hidlr-hpo[text]')" if name == "sentiment" else ""
        raise ValueError(f"task {name!r}: cannot import {module_name!r}: {exc}{extra}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"task {name!r}: {module_name!r} has no callable {attribute!r}")
    try:
        inspect.signature(factory).bind(**(options or {}))
    except TypeError as exc:
        raise ValueError(f"task {name!r}: options {sorted(options or {})} do not fit {attribute}(): {exc}") from None
    return factory


def get_task(name: str, **kwargs: Any) -> Task:
    """Build a task by short name (``"digits"``, ``"nam"``, ``"multitask"``, ``"sentiment"``) or import string."""
    task = resolve_task(name, kwargs)(**kwargs)
    if not isinstance(task, Task):
        raise TypeError(f"task {name!r}: the factory returned {type(task).__name__}, not a hidlr_hpo.tasks.Task")
    return task
