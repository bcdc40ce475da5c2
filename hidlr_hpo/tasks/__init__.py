"""Offline tasks: a dataset already on the machine, a model factory and a default grouping."""

from __future__ import annotations

from .base import Split, Task
from .digits import digits_task
from .synthetic import multitask_task, nam_task

__all__ = ["Split", "Task", "digits_task", "get_task", "multitask_task", "nam_task"]


def _sentiment(**kwargs):
    from .text import sentiment_task  # optional extra: transformers, peft, the MiniLM wheel

    return sentiment_task(**kwargs)


TASKS = {"digits": digits_task, "nam": nam_task, "multitask": multitask_task, "sentiment": _sentiment}


def get_task(name: str, **kwargs):
    """Build a task by name (``"digits"``, ``"nam"``, ``"multitask"``, ``"sentiment"``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
