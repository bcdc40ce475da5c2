"""Which optimizers HiDLR may wrap: those whose step is linear in the learning rate.

HiDLR probes w(t) + c_k u_k as "the step group k would have taken at rate c_k eta_k", and after a refit it
rescales the step just taken, w(t+1) <- w(t) + (eta*_k / eta_k) u_k, as the step at the new rate. Both are
exact only when the update u is proportional to lr and the optimizer's state does not depend on lr. The
optimizers below were checked (tests/test_rate_linear.py): the rescaled step equals the optimizer's own
step at the new rate to round-off. Others are refused with the reason:

- ``ASGD`` keeps an average whose weight depends on lr; ``Rprop`` ignores lr after its first step (its
  step sizes live in its state); ``LBFGS`` runs a line search; ``Adafactor`` scales by the parameter's
  RMS and a relative step; the learning-rate-free peers (Prodigy, D-Adaptation, Schedule-Free) estimate
  their own step size.

AdamW-SAGE is rate-linear only without weight decay (it decays theta by (1 - eta wd) *after* its step,
a term in eta^2). A user's own optimizer opts in with the attribute ``hidlr_rate_linear = True`` (as the
SAGE optimizers do), or per instance with ``HiDLR(..., assume_rate_linear=True)``.
"""

from __future__ import annotations

import torch

__all__ = ["RATE_LINEAR_OPTIMIZERS", "check_rate_linear"]

#: torch optimizers whose step is exactly linear in lr (exact classes: a subclass may change the step).
RATE_LINEAR_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adadelta,
)


def is_rate_linear(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) in RATE_LINEAR_OPTIMIZERS or bool(getattr(optimizer, "hidlr_rate_linear", False))


def check_rate_linear(optimizer: torch.optim.Optimizer, assume_rate_linear: bool = False) -> None:
    """Raise a ValueError saying why, unless the optimizer's step is known (or declared) to be linear in lr."""
    if assume_rate_linear or is_rate_linear(optimizer):
        return
    known = ", ".join(c.__name__ for c in RATE_LINEAR_OPTIMIZERS)
    raise ValueError(
        f"HiDLR cannot wrap {type(optimizer).__name__}: its step is not known to be linear in the learning rate, "
        "and HiDLR's probes and rescaled step are exact only for such optimizers (the update proportional to lr, "
        f"the state independent of it). Known rate-linear: {known}, AdamaxSAGE and AdamWSAGE without weight decay. "
        "If yours is, pass "
        "assume_rate_linear=True (or set the class attribute hidlr_rate_linear = True)."
    )
