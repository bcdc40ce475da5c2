"""Lightning: return a :class:`~hidlr_hpo.HiDLR` from ``configure_optimizers``; :class:`HiDLRCallback` logs it.

Lightning's automatic optimization calls ``optimizer.step(closure)``; HiDLR passes the closure to its base
optimizer, so forward, backward and step run as with any optimizer, and a refit happens after the step
when one is due (with a batch from HiDLR's ``probes``). ``self.trainer.estimated_stepping_batches`` is the
``total_steps`` to give it. Checkpoints carry HiDLR's state in the optimizer's ``state_dict``.

Install with ``pip install 'hidlr-hpo[lightning]'``.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl

from ..controller import HiDLR

__all__ = ["HiDLRCallback"]


class HiDLRCallback(pl.Callback):
    """Logs each group's learning rate (``lr/<group>``) after every step, and refit counts, to Lightning's loggers;
    after each validation, reports the logged ``monitor`` metric to :meth:`HiDLR.report_validation` (the
    plateau guard; ``monitor=None``: not reported), as Lightning does for ReduceLROnPlateau.

    Example:
        >>> from hidlr_hpo.integrations.lightning import HiDLRCallback
        >>> callback = HiDLRCallback(every_n_steps=10)  # pass to Trainer(callbacks=[...])
    """

    def __init__(self, every_n_steps: int = 1, monitor: str | None = "val_loss") -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.monitor = monitor
        self._warned = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(isinstance(o, HiDLR) for o in trainer.optimizers):
            raise ValueError(
                "HiDLRCallback found no HiDLR among the trainer's optimizers: return HiDLR(...) from "
                "configure_optimizers"
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"HiDLRCallback: no {self.monitor!r} was logged in validation (logged: "
                    f"{sorted(trainer.callback_metrics)}), so HiDLR's plateau guard gets no validation loss; "
                    "log it with self.log or pass HiDLRCallback(monitor=...) or monitor=None",
                    stacklevel=2,
                )
            return
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, HiDLR):
                optimizer.report_validation(float(value))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, HiDLR):
                metrics = {f"lr/{name}": lr for name, lr in zip(optimizer.group_names, optimizer.lrs(), strict=True)}
                metrics.update(
                    {"hidlr/refits": float(optimizer.n_refits), "hidlr/rejected": float(optimizer.n_rejected)}
                )
                pl_module.log_dict(metrics, on_step=True, on_epoch=False)
