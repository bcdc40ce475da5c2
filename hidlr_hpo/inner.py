"""One refit of the group rates, by Hi-DLR's own maths or by an Optuna sampler through ask-and-tell.

The inner solver chooses the probe points and turns their losses into proposed rates:

- ``None`` (the fast path): the design is evaluated and fitted directly (:func:`fit_quadratic`), with no
  Optuna bookkeeping;
- ``"hidlr"``: the same design asked from a :class:`HiDLRSampler` in an in-memory Optuna study, the losses
  told, and the sampler's own fit used. It gives the same rates as the fast path (tested);
- a factory ``fn(search_space) -> optuna.samplers.BaseSampler`` (``GridSampler``, ``TPESampler``,
  ``GPSampler``, ``CmaEsSampler``, ``RandomSampler``, ...): asked for as many probe points as the design
  has (the same probe budget), and the best probed point becomes the proposal. Its search space is the
  multiplier of each group's current rate, ``FloatDistribution(1/4, 4, log=True)`` named ``m0, m1, ...``.

The rate-limiting safeguards (trust region, smoothing, bounds) apply to every solver's proposal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import optuna
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from .curvature import (
    QuadraticFit,
    SafeguardResult,
    Safeguards,
    apply_safeguards,
    fit_quadratic,
    limit_rates,
    n_unknowns,
)
from .sampler import HiDLRSampler

__all__ = ["InnerSolver", "Refit", "multiplier_space", "refit_rates"]

SamplerFactory = Callable[[dict[str, FloatDistribution]], optuna.samplers.BaseSampler]
InnerSolver = Union[None, str, SamplerFactory]  # noqa: UP007 (a runtime alias)
# (points, losses) -> groups that did not move (see unchanged_groups)
DeadGroups = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MULTIPLIER_RANGE = (0.25, 4.0)


@dataclass
class Refit:
    points: torch.Tensor  # (P, K) probe points, multipliers of the current rates
    losses: torch.Tensor  # (P,)
    fit: QuadraticFit  # in learning-rate units (NaN when it could not be fitted)
    result: SafeguardResult


def multiplier_space(k: int) -> dict[str, FloatDistribution]:
    """The search space other Optuna samplers see: one multiplier of the current rate per group."""
    lo, hi = MULTIPLIER_RANGE
    return {f"m{i}": FloatDistribution(lo, hi, log=True) for i in range(k)}


def check_inner(inner: InnerSolver) -> None:
    if inner is None or inner == "hidlr" or (callable(inner) and not isinstance(inner, str)):
        return
    raise ValueError(
        f"inner must be None (fast path), 'hidlr' or a factory search_space -> optuna sampler, got {inner!r}"
    )


def refit_rates(
    design: torch.Tensor,
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    eta0: torch.Tensor,
    mode: str,
    guards: Safeguards,
    n_accepted: int,
    inner: InnerSolver = None,
    dead: DeadGroups | None = None,
    applied_scale: float = 1.0,
    revise: Callable[[QuadraticFit], QuadraticFit] | None = None,
) -> Refit:
    """Probe, fit or pick, and safeguard: the new base rates of one refit.

    Args:
        design: the Hi-DLR probe design (P, K), multipliers of ``eta0``; its size is the probe budget.
        evaluate: losses at probe points given as multipliers of ``eta0`` (forward only).
        eta0: the current base rates.
        dead: finds the groups that did not move; they keep their rate and stay out of the solve.
        applied_scale: the rates the step uses are these times this factor (the horizon's).
        revise: maps the fit (in rate units) to the one the safeguards use (the fast path only; a research
            variant averages it across refits, say). None: the fit itself.
    """
    dead = dead or (lambda points, losses: torch.zeros(points.shape[1], dtype=torch.bool))
    if inner is None:
        losses = evaluate(design)
        fit_x = fit_quadratic(design, losses, mode)
        return _safeguarded(design, losses, fit_x, eta0, guards, n_accepted, dead, applied_scale, revise)
    if inner == "hidlr":
        return _with_hidlr_sampler(design, evaluate, eta0, mode, guards, n_accepted, dead, applied_scale)
    return _with_optuna_sampler(inner, design.shape[0], evaluate, eta0, mode, guards, n_accepted, dead)  # type: ignore[arg-type]


def rate_units(fit_x: QuadraticFit, eta0: torch.Tensor) -> QuadraticFit:
    """The fit in learning-rate units; a group at rate 0 did not move and keeps its multiplier units."""
    return fit_x.rescale(torch.where(eta0 > 0, eta0, torch.ones_like(eta0)))


def _safeguarded(
    points, losses, fit_x: QuadraticFit, eta0, guards, n_accepted, dead, applied_scale, revise=None
) -> Refit:
    fit = rate_units(fit_x, eta0)
    fit = fit if revise is None else revise(fit)
    result = apply_safeguards(eta0, fit, guards, n_accepted, dead(points, losses), applied_scale)
    return Refit(points, losses, fit, result)


def _ask_tell(
    sampler: optuna.samplers.BaseSampler, space, n: int, evaluate
) -> tuple[optuna.Study, torch.Tensor, torch.Tensor]:
    study = optuna.create_study(sampler=sampler)  # in memory: one study per refit
    trials = [study.ask(space) for _ in range(n)]
    points = torch.tensor([[t.params[name] for name in space] for t in trials], dtype=torch.float64)
    losses = evaluate(points)  # the whole design at once
    for trial, loss in zip(trials, losses.tolist(), strict=True):
        if math.isfinite(loss):
            study.tell(trial, loss)
        else:
            study.tell(trial, state=TrialState.FAIL)
    return study, points, losses


def _with_hidlr_sampler(design, evaluate, eta0, mode, guards, n_accepted, dead, applied_scale) -> Refit:
    # A box twice the design's reach, with the sampler's radius a quarter of it: its design points are
    # then exactly the multipliers of the fast path's design.
    reach = float(design.abs().max())
    space = {f"m{i}": FloatDistribution(-2.0 * reach, 2.0 * reach) for i in range(design.shape[1])}
    sampler = HiDLRSampler(search_space=space, mode=mode, design=design / reach, radius=0.25)
    study, points, losses = _ask_tell(sampler, space, design.shape[0], evaluate)
    try:
        fit_x = sampler.fit(study)
    except ValueError:  # failed probes left too few points for the model: reject like a NaN fit
        fit_x = _nan_fit(mode, len(eta0), len(points))
    return _safeguarded(points, losses, fit_x, eta0, guards, n_accepted, dead, applied_scale)


def _with_optuna_sampler(factory, n, evaluate, eta0, mode, guards, n_accepted, dead) -> Refit:
    space = multiplier_space(len(eta0))
    study, points, losses = _ask_tell(factory(space), space, n, evaluate)
    finite = torch.isfinite(losses)
    # The quadratic is fitted for diagnostics only (b, A, influence in the history).
    fit_x = (
        fit_quadratic(points, losses, mode)
        if finite.all() and len(points) >= n_unknowns(len(eta0), mode)
        else _nan_fit(mode, len(eta0), len(points))
    )
    fit = rate_units(fit_x, eta0)
    mask = dead(points, losses)
    k = len(eta0)
    if not finite.any():
        every = list(range(k))
        result = SafeguardResult(
            eta0.clone(), torch.full_like(eta0, math.nan), {"rejected_fit": every, "nonfinite": every}, "best-probe"
        )
        return Refit(points, losses, fit, result)
    best = points[int(torch.where(finite, losses, torch.full_like(losses, math.inf)).argmin())]
    proposed = eta0 * best
    fired: dict[str, list[int]] = {}
    lrs = limit_rates(eta0, proposed, guards, n_accepted, fired)
    if mask.any():  # the loss does not depend on these groups: any probe was "best"
        lrs[mask] = eta0[mask]
        fired["dead"] = torch.nonzero(mask).flatten().tolist()
    return Refit(points, losses, fit, SafeguardResult(lrs, proposed, fired, "best-probe"))


def _nan_fit(mode: str, k: int, p: int) -> QuadraticFit:
    nan = math.nan
    return QuadraticFit(
        mode,
        nan,
        torch.full((k,), nan, dtype=torch.float64),
        torch.full((k, k), nan, dtype=torch.float64),
        nan,
        torch.full((p,), nan, dtype=torch.float64),
        p,
    )
