r"""SAGE: sensitivity-guided adaptive learning rates, in AdamW and Adamax form.

Liang et al., "No Parameters Left Behind: Sensitivity Guided Adaptive Learning Rate for Training Large
Transformer Models", ICLR 2022 (arXiv:2202.02664). Each element's step is scaled by how much its sensitivity
varies over time: parameters whose importance is stable and high take small steps, parameters whose
importance fluctuates (still being learnt) take larger ones.

Per element, at step t, with gradient g and parameter theta:

.. math::

    I_t = |\theta_t \odot g_t|                                  \quad\text{(sensitivity, first-order)}
    \bar I_t = \beta_3 \bar I_{t-1} + (1 - \beta_3) I_t          \quad\text{(its moving average)}
    U_t = |I_t - \hat I_t|, \quad \hat I_t = \bar I_t / (1 - \beta_3^t) \text{ (AdamW form) or } \bar I_t
    \theta_{t+1} = \theta_t - \eta \, \frac{U_t}{\hat I_t + \epsilon_s} \odot \text{update}_t

where update_t is the Adam (bias-corrected, with decoupled weight decay applied after the step) or the
Adamax update (no bias correction; weight decay added to the update), exactly as in the authors' code
(github.com/cliang1453/SAGE, ``module/bert_optim.py``). Two details follow that code rather than the
paper's prose: the sensitivity denominator's epsilon is ``eps ** 2`` unless ``sensitivity_eps`` is given,
and in the AdamW form the first step has U_1 = 0 (the bias-corrected average equals I_1), so it does not move
sensitivity-scaled parameters. The authors' per-parameter gradient clipping (``max_grad_norm=1``) is left to
the caller (``torch.nn.utils.clip_grad_norm_``), as with torch's own optimizers.

Groups opt in or out of the sensitivity scaling with the param-group key ``sensitivity`` (default True); the
reference scales attention and feed-forward weights and trains embeddings, norms and heads plainly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["AdamWSAGE", "AdamaxSAGE"]


def _check(lr: float, betas: tuple[float, float], beta3: float, eps: float, weight_decay: float) -> None:
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"Invalid learning rate: {lr} (must be a finite number >= 0)")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas} (two values in [0, 1))")
    if not 0.0 <= beta3 < 1.0:
        raise ValueError(f"Invalid beta3: {beta3} (in [0, 1); the useful range is 0.6-0.9)")
    if not eps >= 0.0:
        raise ValueError(f"Invalid eps: {eps} (must be >= 0)")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")


class _SAGEBase(torch.optim.Optimizer):
    # The step is linear in lr and the sensitivity state does not depend on it (tests/test_rate_linear.py).
    hidlr_rate_linear = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.75,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        sensitivity_eps: float | None = None,
    ) -> None:
        _check(lr, betas, beta3, eps, weight_decay)
        if sensitivity_eps is not None and not sensitivity_eps >= 0.0:
            raise ValueError(f"Invalid sensitivity_eps: {sensitivity_eps} (must be >= 0, or None for eps**2)")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            beta3=beta3,
            eps=eps,
            weight_decay=weight_decay,
            sensitivity=True,
            sensitivity_eps=sensitivity_eps,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _sensitivity_scale(
        p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], bias_correct: bool
    ) -> torch.Tensor:
        """U_t / (I_hat_t + eps_s): the per-element learning-rate multiplier, in p's dtype.

        The sensitivity and its average are kept in at least float32: eps_s = eps**2 = 1e-12 is 0 in
        float16, where an element with theta = 0 or g = 0 would give 0 / 0.
        """
        beta3 = group["beta3"]
        eps_s = group["eps"] ** 2 if group["sensitivity_eps"] is None else group["sensitivity_eps"]
        work = torch.promote_types(p.dtype, torch.float32)
        if "exp_avg_ipt" not in state:
            state["exp_avg_ipt"] = torch.zeros_like(p, dtype=work)
            if not p.any():
                warnings.warn(
                    f"a sensitivity-scaled parameter of shape {tuple(p.shape)} is all zeros (e.g. LoRA's B): its "
                    "sensitivity |theta * grad| is 0, so SAGE never moves it; put its group in plain_groups",
                    RuntimeWarning,
                    stacklevel=4,
                )
        ipt = (p.to(work) * grad.to(work)).abs()  # I_t = |theta * g|
        state["exp_avg_ipt"].mul_(beta3).add_(ipt, alpha=1.0 - beta3)  # I_bar_t
        ipt_hat = state["exp_avg_ipt"] / (1.0 - beta3 ** state["step"]) if bias_correct else state["exp_avg_ipt"]
        return ((ipt - ipt_hat).abs() / (ipt_hat + eps_s)).to(p.dtype)  # U_t / (I_hat_t + eps_s)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            scale_sum, count = torch.zeros(()), 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                scale = self._update(p, p.grad, state, group)
                if scale is not None:
                    scale_sum, count = scale_sum + scale.sum(dtype=torch.float32), count + scale.numel()
            # lr * the mean multiplier is the group's mean effective rate, which the studies report beside
            # Hi-DLR's group rates (one host sync per group and step).
            group["mean_scale"] = float(scale_sum) / count if count else 1.0
        return loss

    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> torch.Tensor | None:
        """Update one parameter in place; return its sensitivity multiplier (None when the group is plain)."""
        raise NotImplementedError


class AdamWSAGE(_SAGEBase):
    r"""AdamW with SAGE's sensitivity-guided per-element learning rate (AdamW-SAGE).

    Example:
        >>> import torch
        >>> from hidlr_hpo.baselines import AdamWSAGE
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = AdamWSAGE([w], lr=0.1)
        >>> for target in (0.0, 0.5):
        ...     opt.zero_grad()
        ...     ((w - target) ** 2).sum().backward()
        ...     opt.step()
        ...     print(w.detach())  # the first step does not move a sensitivity-scaled element (U_1 = 0)
        tensor([ 1., -2.])
        tensor([ 0.9720, -1.9906])

    Args:
        params: parameters or param groups; a group with ``sensitivity=False`` is plain AdamW.
        lr: the learning rate eta.
        betas: Adam's (beta1, beta2).
        beta3: the sensitivity moving-average coefficient (0.75; useful range 0.6-0.9).
        eps: Adam's epsilon (1e-6, as in the reference).
        weight_decay: decoupled weight decay, theta <- theta - eta * wd * theta after the step.
        sensitivity_eps: epsilon of the sensitivity ratio (None: ``eps ** 2``, as in the reference code).
    """

    @property
    def hidlr_rate_linear(self) -> bool:  # type: ignore[override]
        # theta (1 - eta wd) after a step of -eta u makes the update quadratic in eta when wd > 0.
        return all(group["weight_decay"] == 0.0 for group in self.param_groups)

    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> torch.Tensor | None:
        beta1, beta2 = group["betas"]
        t = state["step"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # m_t
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # v_t
        denom = exp_avg_sq.sqrt().add_(group["eps"])  # sqrt(v_t) + eps
        step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)  # bias corrections
        scale = None
        if group["sensitivity"]:
            scale = self._sensitivity_scale(p, grad, state, group, bias_correct=True)
            p.sub_(exp_avg / denom * scale * step_size)
        else:
            p.addcdiv_(exp_avg, denom, value=-step_size)
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])  # decoupled, after the step
        return scale


class AdamaxSAGE(_SAGEBase):
    r"""Adamax with SAGE's sensitivity-guided per-element learning rate (Adamax-SAGE, the paper's main form).

    Example:
        >>> import torch
        >>> from hidlr_hpo.baselines import AdamaxSAGE
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = AdamaxSAGE([w], lr=0.1)
        >>> (w ** 2).sum().backward()
        >>> opt.step()
        >>> w.detach()  # step 1: U/I_bar = 0.75 I / 0.25 I = 3, update = 0.1 sign(g)
        tensor([ 0.9700, -1.9700])

    Args:
        params: parameters or param groups; a group with ``sensitivity=False`` is plain Adamax.
        lr: the learning rate eta.
        betas: (beta1, beta2) of Adamax's first moment and exponentially weighted infinity norm.
        beta3: the sensitivity moving-average coefficient (0.75; useful range 0.6-0.9).
        eps: Adamax's epsilon (1e-6, as in the reference).
        weight_decay: weight decay added to the update (not to the gradient), theta <- theta - eta (u + wd theta).
        sensitivity_eps: epsilon of the sensitivity ratio (None: ``eps ** 2``, as in the reference code).
    """

    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> torch.Tensor | None:
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_inf"] = torch.zeros_like(p)
        exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # m_t
        torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)  # u_t = max(b2 u, |g| + eps)
        update = exp_avg / (exp_inf + eps)
        if group["weight_decay"] > 0.0:
            update.add_(p, alpha=group["weight_decay"])
        scale = None
        if group["sensitivity"]:
            scale = self._sensitivity_scale(p, grad, state, group, bias_correct=False)
            update.mul_(scale)
        p.sub_(update, alpha=group["lr"])
        return scale
