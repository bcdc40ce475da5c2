"""Hugging Face ``transformers.Trainer``: an optimizer factory and a callback that logs the group rates.

    optimizer = hidlr_optimizer(model, base, probe_dataset=eval_dataset, data_collator=collator,
                                total_steps=None)  # the Trainer's own schedule gives the shape
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=eval_dataset,
                      optimizers=(optimizer, None), callbacks=[HiDLRCallback()])

The Trainer then builds its LR scheduler on the HiDLR (linear decay by default): the schedule gives the shape
over training and HiDLR fits a multiplier per group on top of it (docs/method.md). Probes evaluate the model's
own loss (``model(**batch).loss``, or ``outputs["loss"]``) on batches of ``probe_dataset``, drawn only when a
refit is due and moved to the model's device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..controller import HiDLR

__all__ = ["HiDLRCallback", "hidlr_optimizer", "model_loss"]


def model_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The loss a Trainer model returns for a batch (``labels`` included), on the model's device."""
    device = next(model.parameters()).device
    outputs = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return outputs["loss"] if isinstance(outputs, dict) else outputs[0]


def hidlr_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    probe_dataset: Any,
    data_collator: Callable[[list[Any]], Any],
    total_steps: int | None,
    batch_size: int = 32,
    seed: int = 0,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = model_loss,
    **hidlr_options: Any,
) -> HiDLR:
    """A :class:`HiDLR` around ``optimizer`` whose probes are shuffled batches of ``probe_dataset``.

    Args:
        total_steps: None with the Trainer's decaying schedule (the default), which gives the shape; the
            planned steps with ``lr_scheduler_type="constant"``.
        hidlr_options: more :class:`HiDLR` keyword arguments (``interval``, ``mode``, ...).
    """
    loader = torch.utils.data.DataLoader(
        probe_dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=data_collator,
        generator=torch.Generator().manual_seed(seed),
    )
    return HiDLR(optimizer, model, loss_fn, probes=loader, total_steps=total_steps, **hidlr_options)


class HiDLRCallback(TrainerCallback):
    """Adds each group's rate (``lr/<group>``) and the refit count to the Trainer's logs (console, MLflow, ...),
    and reports each evaluation's ``metric`` (``eval_loss``) to :meth:`HiDLR.report_validation`, the plateau
    guard (``metric=None``: not reported).
    """

    def __init__(self, metric: str | None = "eval_loss") -> None:
        self.metric = metric
        self._warned = False

    @staticmethod
    def _hidlr(kwargs: dict[str, Any]) -> HiDLR | None:
        optimizer = kwargs.get("optimizer")
        if not isinstance(optimizer, HiDLR):  # accelerate wraps it; HiDLR's own .optimizer is its base
            optimizer = getattr(optimizer, "optimizer", optimizer)
        return optimizer if isinstance(optimizer, HiDLR) else None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        optimizer = self._hidlr(kwargs)
        if logs is None or optimizer is None:
            return
        rates = {f"lr/{name}": lr for name, lr in zip(optimizer.group_names, optimizer.lrs(), strict=True)}
        rates["hidlr/refits"] = optimizer.n_refits
        rates["hidlr/plateau_cuts"] = len(optimizer.plateau_cuts)
        logs.update(rates)  # for the callbacks after this one (console, MLflow, ...)
        if state.log_history:  # the Trainer recorded the entry before calling back
            state.log_history[-1].update(rates)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        optimizer = self._hidlr(kwargs)
        if self.metric is None or optimizer is None or metrics is None:
            return
        if self.metric not in metrics:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"HiDLRCallback: the evaluation gave no {self.metric!r} (it gave {sorted(metrics)}), so HiDLR's "
                    "plateau guard gets no validation loss; pass HiDLRCallback(metric=...) or metric=None",
                    stacklevel=2,
                )
            return
        optimizer.report_validation(float(metrics[self.metric]))
