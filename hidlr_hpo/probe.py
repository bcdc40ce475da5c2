"""Forward-only loss evaluations at probe points along the optimizer's proposed update, per group.

After ``optimizer.step()`` the live parameters hold w(t+1) = w(t) + u. A probe point scales each group's
update by its own factor c_k::

    w_k(c) = w_k(t) + c_k * (w_k(t+1) - w_k(t)) = lerp(w_k(t), w_k(t+1), c_k)

so c_k = eta_k / eta0_k for a candidate group rate eta_k when the step used eta0_k. ``torch.lerp`` forms
the point in one fused kernel with no temporary, and returns w(t+1) exactly for c = 1.

Two paths give the same losses:

- **batched** (``batched=True``): the whole design in one ``torch.func.vmap`` over the probe points, each
  point's parameters passed to ``torch.func.functional_call``, so the live parameters are never written
  and need no restore copy. The points are chunked so that their parameter copies fit ``memory_budget``
  bytes. Where vmap cannot run the model (data-dependent Python control flow, ``.item()``, in-place updates
  of captured tensors, some third-party attention code), the first failure warns once, naming the module,
  and the prober falls back to the sequential path for good.
- **sequential**: writes each probe point into the live parameters and restores them afterwards from a
  saved copy (``copy_``, never add-and-subtract).

Either way probing leaves no trace: every parameter is bit-identical afterwards, even when a loss raises or
is NaN; each sub-module gets back its own ``training`` flag (a BatchNorm the user froze with ``.eval()``
stays frozen); buffers such as BatchNorm running statistics are restored; and the global random state is
forked, so probes draw no numbers from the training run's stream. Probes run under ``torch.no_grad()`` and,
by default, with the model in eval mode (no dropout noise between probes, no batch-norm statistics updated).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
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
        batched: evaluate the design with ``vmap`` + ``functional_call`` (falls back to sequential).
        memory_budget: bytes the batched path may spend on probe points' parameter copies at once.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        groups: Sequence[Sequence[torch.Tensor]],
        eval_mode: bool = True,
        batched: bool = False,
        memory_budget: int = 256 * 2**20,
    ) -> None:
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        self.model = model
        self.loss_fn = loss_fn
        self.groups = [list(g) for g in groups]
        self.eval_mode = eval_mode
        self.batched = batched
        self.memory_budget = memory_budget
        self.fallback_reason: str | None = None  # why the batched path gave up, if it did
        names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        self._names = [[names[id(p)] for p in group] for group in self.groups] if batched else []
        self._point_bytes = sum(p.numel() * p.element_size() for group in self.groups for p in group)

    def snapshot(self, live: Sequence[bool] | None = None) -> list[list[torch.Tensor] | None]:
        """An exact copy of every parameter, group by group; None for a group not ``live`` (a frozen one,
        which the probes leave as it is)."""
        live = [True] * len(self.groups) if live is None else live
        return [
            [p.detach().clone() for p in group] if keep else None for group, keep in zip(self.groups, live, strict=True)
        ]

    @torch.no_grad()
    def restore(self, saved: Sequence[Sequence[torch.Tensor] | None]) -> None:
        for group, copies in zip(self.groups, saved, strict=True):
            for p, s in zip(group, copies or (), strict=False):
                p.copy_(s)

    @torch.no_grad()
    def losses(self, batch: Any, start: Sequence[Sequence[torch.Tensor] | None], coeffs: torch.Tensor) -> torch.Tensor:
        """Loss at each probe point: row j of ``coeffs`` (shape (P, K)) holds c_k for every group k; a group
        whose ``start`` is None (from ``snapshot(live)``) keeps its live values at every point.

        Returns a float64 CPU tensor of P losses; the parameters are left exactly as they were.
        """
        if coeffs.ndim != 2 or coeffs.shape[1] != len(self.groups):
            raise ValueError(f"coeffs must have shape (P, {len(self.groups)}), got {tuple(coeffs.shape)}")
        if self.batched and self.fallback_reason is None:
            try:
                return self._losses_batched(batch, start, coeffs)
            except Exception as exc:  # noqa: BLE001 - any vmap limitation: fall back, once and for all
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                warnings.warn(
                    f"batched probes cannot run {type(self.model).__name__} under vmap "
                    f"({self.fallback_reason}); using the sequential path from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
        # w(t+1): the live values, restored bit-for-bit at the end; a group without a start is not probed.
        end = self.snapshot([g is not None for g in start])
        values = []
        # The coefficient each group's parameters hold now (None: w(t+1)). An axial design changes one group
        # per point, so most groups keep theirs from one point to the next and need no new lerp.
        held: list[float | None] = [None] * len(self.groups)
        try:
            with self._no_trace():
                for row in coeffs.tolist():
                    for k, (group, g_start, g_end, c) in enumerate(zip(self.groups, start, end, row, strict=True)):
                        if g_start is None or held[k] == c:
                            continue
                        for p, s, e in zip(group, g_start, g_end, strict=True):
                            torch.lerp(s, e, c, out=p)  # w(c) = w(t) + c * (w(t+1) - w(t))
                        held[k] = c
                    values.append(_scalar_loss(self.loss_fn(self.model, batch)))
        finally:
            self.restore(end)
        # One device-to-host transfer for the whole design, not one per probe.
        return torch.stack(values).to(device="cpu", dtype=torch.float64)

    @contextlib.contextmanager
    def _no_trace(self) -> Iterator[None]:
        """Eval mode if asked; afterwards every module's own mode, the buffers and the random state as before."""
        modes = [(module, module.training) for module in self.model.modules()]
        buffers = [] if self.eval_mode else [(b, b.detach().clone()) for b in self.model.buffers()]
        devices = sorted({p.device.index or 0 for group in self.groups for p in group if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            try:
                if self.eval_mode:
                    self.model.eval()
                yield
            finally:
                for module, training in modes:
                    module.training = training  # not train(): that would reset every sub-module too
                with torch.no_grad():
                    for live, saved in buffers:
                        live.copy_(saved)

    def _losses_batched(
        self, batch: Any, start: Sequence[Sequence[torch.Tensor] | None], coeffs: torch.Tensor
    ) -> torch.Tensor:
        """vmap over the probe points; each point's parameters go to functional_call, the live ones stay."""
        wrapper = _LossModule(self.model, self.loss_fn)
        first = self.groups[0][0]
        any_double = any(p.dtype == torch.float64 for group in self.groups for p in group)
        coeffs = coeffs.to(device=first.device, dtype=torch.float64 if any_double else torch.float32)
        chunk = max(1, self.memory_budget // max(1, self._point_bytes))

        def loss_at(c: torch.Tensor) -> torch.Tensor:
            params = {}
            for k, (group, g_start, g_names) in enumerate(zip(self.groups, start, self._names, strict=True)):
                if g_start is None:  # not probed: functional_call uses the live parameters
                    continue
                for p, s, name in zip(group, g_start, g_names, strict=True):
                    params[f"model.{name}"] = _lerp(s, p.detach(), c[k])  # w(t) + c_k (w(t+1) - w(t))
            return _scalar_loss(torch.func.functional_call(wrapper, params, (batch,)))

        with self._no_trace(), torch.no_grad():
            losses = torch.func.vmap(loss_at, chunk_size=min(chunk, coeffs.shape[0]))(coeffs)
        return losses.to(device="cpu", dtype=torch.float64)


def _scalar_loss(loss: Any) -> torch.Tensor:
    """The probe's loss as a 0-d tensor, or a clear error naming what loss_fn returned instead."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn(model, batch) must return a scalar tensor (one loss), got {what}")
    return loss.detach().reshape(())


def _lerp(start: torch.Tensor, end: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """lerp with the coefficient kept in at least float32: rounding c to bfloat16 would move the probe point."""
    if start.dtype in (torch.float16, torch.bfloat16):
        return torch.lerp(start.float(), end.float(), c.float()).to(start.dtype)
    return torch.lerp(start, end, c.to(start.dtype))


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)
