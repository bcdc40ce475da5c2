"""Forward-only loss evaluations at probe points along the optimizer's proposed update, per group.

After ``optimizer.step()`` the live parameters hold w(t+1) = w(t) + u. A probe point scales each group's
update by its own factor c_k::

    w_k(c) = w_k(t) + c_k * (w_k(t+1) - w_k(t)) = lerp(w_k(t), w_k(t+1), c_k)

so c_k = eta_k / eta0_k for a candidate group rate eta_k when the step used eta0_k. ``torch.lerp`` forms
the point in one fused kernel with no temporary, and returns w(t+1) exactly for c = 1.

The sequential path writes each probe point into the live parameters and restores them afterwards from a
saved copy (``copy_``, never add-and-subtract), so every parameter is bit-identical after probing, even
when a loss raises or is NaN. Probes run under ``torch.no_grad()`` and, by default, with the model in
eval mode (no dropout noise between probes, no batch-norm statistics updated); the mode is restored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["LossFn", "Prober"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Prober:
    """Evaluates ``loss_fn(model, batch)`` at probe points ``lerp(start, live, c)``, group by group.

    Args:
        model: the module ``loss_fn`` calls.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        groups: the parameters of each group, in the optimizer's group order.
        eval_mode: run the probes with ``model.eval()`` (restored afterwards).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        groups: Sequence[Sequence[torch.Tensor]],
        eval_mode: bool = True,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.groups = [list(g) for g in groups]
        self.eval_mode = eval_mode

    def snapshot(self) -> list[list[torch.Tensor]]:
        """An exact copy of every parameter, group by group."""
        return [[p.detach().clone() for p in group] for group in self.groups]

    @torch.no_grad()
    def restore(self, saved: Sequence[Sequence[torch.Tensor]]) -> None:
        for group, copies in zip(self.groups, saved, strict=True):
            for p, s in zip(group, copies, strict=True):
                p.copy_(s)

    @torch.no_grad()
    def losses(self, batch: Any, start: Sequence[Sequence[torch.Tensor]], coeffs: torch.Tensor) -> torch.Tensor:
        """Loss at each probe point: row j of ``coeffs`` (shape (P, K)) holds c_k for every group k.

        Returns a float64 CPU tensor of P losses; the parameters are left exactly as they were.
        """
        if coeffs.ndim != 2 or coeffs.shape[1] != len(self.groups):
            raise ValueError(f"coeffs must have shape (P, {len(self.groups)}), got {tuple(coeffs.shape)}")
        end = self.snapshot()  # w(t+1): the live values, restored bit-for-bit at the end
        was_training = self.model.training
        values = []
        try:
            if self.eval_mode:
                self.model.eval()
            for row in coeffs.tolist():
                for group, g_start, g_end, c in zip(self.groups, start, end, row, strict=True):
                    for p, s, e in zip(group, g_start, g_end, strict=True):
                        torch.lerp(s, e, c, out=p)  # w(c) = w(t) + c * (w(t+1) - w(t))
                loss = self.loss_fn(self.model, batch)
                values.append(loss.detach().reshape(()))
        finally:
            self.restore(end)
            self.model.train(was_training)
        # One device-to-host transfer for the whole design, not one per probe.
        return torch.stack(values).to(device="cpu", dtype=torch.float64)
