"""``HiDLRSampler``: a quadratic response-surface sampler for Optuna (trust-region rounds).

Each *round* evaluates a probe design around a centre c with radius r (in coordinates normalised to the unit
cube; log-scaled parameters in log space). When a round is complete, the quadratic model of
:mod:`hidlr_hpo.curvature` is fitted to it and the next centre is the model's minimiser within the round's
box [c - r, c + r]; the radius halves when that minimiser lies inside the box (zoom in) and doubles when it
lies on its boundary (the minimum is further out). On an exactly quadratic objective the second round is
centred on the minimum.

The round state lives in the trials' system attributes, so several workers on one storage cooperate: each
asks for the first design point of the current round that no running or finished trial holds; when all are
held but some still run, it adds a random point inside the round's box (more data for the same fit).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from .curvature import QuadraticFit, check_mode, fit_quadratic, make_design, n_unknowns, solve

__all__ = ["HiDLRSampler"]

_logger = optuna.logging.get_logger(__name__)

_PREFIX = "hidlr:"
# A design point is taken while a trial holds it, and used up once its trial has finished in any way: a
# failed or pruned point is scored as bad (see _scores) instead of asked again, so a region that always
# fails cannot stall the rounds.
_HELD = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
_FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
_MIN_RADIUS = 1e-8
_MAX_RADIUS = 0.5


def _is_continuous(dist: BaseDistribution) -> bool:
    return isinstance(dist, FloatDistribution) and dist.step is None and dist.high > dist.low


class HiDLRSampler(BaseSampler):
    """Quadratic response-surface sampler over an Optuna study's continuous parameters.

    Example:
        >>> import optuna
        >>> from hidlr_hpo import HiDLRSampler
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> def objective(trial):
        ...     x = trial.suggest_float("x", -5, 5)
        ...     y = trial.suggest_float("y", -5, 5)
        ...     return (x - 1) ** 2 + 3 * (y + 2) ** 2 + x * y
        >>> space = {"x": optuna.distributions.FloatDistribution(-5, 5),
        ...          "y": optuna.distributions.FloatDistribution(-5, 5)}
        >>> study = optuna.create_study(sampler=HiDLRSampler(search_space=space, seed=0))
        >>> study.optimize(objective, n_trials=7)  # a pairwise design (6 points), then the exact minimiser
        >>> round(study.best_value, 6)
        -3.363636

    Integer, stepped and categorical parameters are sampled by ``independent_sampler`` (random by default),
    as Optuna's own relative samplers do. A failed or pruned trial (a NaN objective fails a trial) uses up
    its design point and enters the next round's choice as worse than every finished one, so the rounds move
    away from a region that fails. A trial that does not suggest every modelled parameter (a conditional
    space) is left out of the fit.

    Args:
        search_space: the continuous parameters to model. None infers them as the intersection of the
            finished trials' spaces (then the first trial is sampled independently).
        mode: ``"full"`` (cross terms; ``"pairwise"`` design) or ``"diag"`` (``"axial"`` design).
        design: ``"axial"``, ``"pairwise"`` or an int (a random design of that many points).
        x0: the first round's centre, in parameter units (default: the middle of each range; the
            geometric middle for log-scaled parameters).
        radius: the first round's radius as a fraction of each normalised range.
        seed: seeds the random points and the independent sampler.
        independent_sampler: samples what the model does not cover.
        warn_independent_sampling: warn, once per parameter, when a parameter goes to the independent
            sampler (as Optuna's CMA-ES and GP samplers do).
    """

    def __init__(
        self,
        search_space: Mapping[str, BaseDistribution] | None = None,
        *,
        mode: str = "full",
        design: str | int | None = None,
        x0: Mapping[str, float] | None = None,
        radius: float = 0.25,
        seed: int | None = None,
        independent_sampler: BaseSampler | None = None,
        warn_independent_sampling: bool = True,
    ) -> None:
        self._lock = threading.Lock()  # study.optimize(n_jobs=...): one thread claims a design point at a time
        self._warn_independent = warn_independent_sampling
        self._warned: set[str] = set()
        self._mode = check_mode(mode)
        self._design = design if design is not None else ("pairwise" if mode == "full" else "axial")
        if not (0 < radius <= _MAX_RADIUS):
            raise ValueError(f"radius must be in (0, {_MAX_RADIUS}] (a fraction of each range), got {radius}")
        self._radius0 = radius
        self._x0 = dict(x0) if x0 is not None else {}
        self._search_space = None
        if search_space is not None:
            self._search_space = {k: search_space[k] for k in sorted(search_space)}
            bad = [k for k, d in self._search_space.items() if not _is_continuous(d)]
            if bad:
                raise ValueError(
                    f"search_space holds parameters {bad} that are not continuous FloatDistributions; "
                    "leave them out (the independent sampler takes them)"
                )
            for name, value in self._x0.items():
                if name not in self._search_space:
                    raise ValueError(f"x0 names {name!r}, which is not in search_space")
                d = self._search_space[name]
                if not d.low <= value <= d.high:
                    raise ValueError(f"x0[{name!r}]={value} is outside [{d.low}, {d.high}]")
        self._rng = np.random.RandomState(seed)
        self._independent = independent_sampler or RandomSampler(seed=seed)
        self._intersection = IntersectionSearchSpace()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]  # a lock does not pickle; a copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._independent.reseed_rng()

    # -- Optuna's sampler interface ---------------------------------------------------------------------
    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._search_space is not None:
            return dict(self._search_space)
        inferred = self._intersection.calculate(study)
        return {k: d for k, d in sorted(inferred.items()) if _is_continuous(d)}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._raise_if_multi_objective(study)
        params: dict[str, Any] = {}
        space = {k: d for k, d in sorted(search_space.items()) if _is_continuous(d)}
        for name, dist in search_space.items():
            if name not in space:  # not modelled: delegated, as Optuna's relative samplers do
                params[name] = self._independent.sample_independent(study, trial, name, dist)
        if not space:
            return params

        names = list(space)
        # Choosing a design point and recording the choice is one step, so threads never take the same one.
        with self._lock:
            trials = [t for t in study._get_trials(deepcopy=False, use_cache=False) if self._in_space(t, names)]
            round_, center, radius = self._current_round(study, trials, space)
            design = self._design_points(len(names))
            for _ in range(1000):  # a few rounds at most: each one moves on or stops
                members = [t for t in trials if t.system_attrs[_PREFIX + "round"] == round_]
                # Design points that clipping to the unit cube makes equal are one point: asked once.
                points = np.clip(center + radius * design, 0.0, 1.0)
                same = [
                    next(j for j in range(i + 1) if np.allclose(points[j], p, rtol=0.0, atol=1e-12))
                    for i, p in enumerate(points)
                ]

                def point(index: int, same: list[int] = same) -> int:
                    return same[index] if index < len(same) else index  # beyond the design: an added random point

                held = {
                    point(t.system_attrs[_PREFIX + "index"])
                    for t in members
                    if t.state in _HELD and t.number != trial.number
                }
                finished = {point(t.system_attrs[_PREFIX + "index"]) for t in members if t.state in _FINISHED}
                # A point an earlier round already evaluated (the best point becomes the next centre; a clipped point
                # recurs at the cube's edge) is not asked again: its trial joins this round's fit.
                borrowed = []
                for t in trials:
                    if t.state not in _FINISHED or t.system_attrs[_PREFIX + "round"] == round_:
                        continue
                    if not all(n in t.params for n in names):
                        continue
                    u_t = np.array([self._to_unit(space[n], t.params[n]) for n in names])
                    for i in range(len(design)):
                        if same[i] == i and i not in finished and np.allclose(points[i], u_t, rtol=0.0, atol=1e-12):
                            held.add(i)
                            finished.add(i)
                            borrowed.append(t)
                free = [i for i in range(len(design)) if same[i] == i and i not in held]
                if free:
                    index, offset = free[0], design[free[0]]
                elif all(same[i] in finished for i in range(len(design))):
                    round_, center, radius = self._next_round(
                        study, [*members, *borrowed], space, round_, center, radius
                    )
                    continue  # the new round's points, checked against what earlier rounds evaluated
                else:  # every design point is held, some still running: add a random point to this round's fit
                    index = len(design) + len(members)
                    offset = self._rng.uniform(-1.0, 1.0, size=len(names))
                break
            else:  # every round's points were known already (a collapsed box): a random point in it
                index = len(design) + len(members)
                offset = self._rng.uniform(-1.0, 1.0, size=len(names))
            u = np.clip(center + radius * np.asarray(offset, dtype=float), 0.0, 1.0)

            storage = study._storage
            storage.set_trial_system_attr(trial._trial_id, _PREFIX + "round", round_)
            storage.set_trial_system_attr(trial._trial_id, _PREFIX + "index", int(index))
            storage.set_trial_system_attr(trial._trial_id, _PREFIX + "center", [float(c) for c in center])
            storage.set_trial_system_attr(trial._trial_id, _PREFIX + "radius", float(radius))
            storage.set_trial_system_attr(trial._trial_id, _PREFIX + "names", names)
        for name, ui in zip(names, u, strict=True):
            params[name] = self._from_unit(space[name], float(ui))
        return params

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        self._raise_if_multi_objective(study)
        if self._warn_independent and param_name not in self._warned and self._modelled_before(study):
            self._warned.add(param_name)
            _logger.warning(
                f"HiDLRSampler samples {param_name!r} with its independent sampler "
                f"({type(self._independent).__name__}): it is not a continuous parameter in every trial's "
                "space. Pass search_space= to fix what is modelled, or warn_independent_sampling=False."
            )
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    @staticmethod
    def _modelled_before(study: Study) -> bool:
        """Whether the study has finished trials (the first trial's parameters are all independent)."""
        return any(t.state.is_finished() for t in study._get_trials(deepcopy=False, use_cache=True))

    # -- the model ----------------------------------------------------------------------------------------
    def fit(self, study: Study, round_: int | None = None) -> QuadraticFit:
        """The quadratic model fitted to a round's finished trials (default: the latest round with enough
        of them), in the study's parameter units (log-scaled parameters: natural log units), with the
        objective as minimised (negated for a maximising study).
        """
        modelled = [t for t in study._get_trials(deepcopy=False, use_cache=True) if _PREFIX + "names" in t.system_attrs]
        if not modelled:
            raise ValueError("no trial of this study was sampled by HiDLRSampler yet")
        names = modelled[-1].system_attrs[_PREFIX + "names"]
        trials = [t for t in modelled if self._in_space(t, names)]
        space = {n: trials[-1].distributions[n] for n in names if n in trials[-1].distributions}
        if len(space) != len(names):
            raise ValueError("the latest modelled trial has not suggested every modelled parameter yet")
        rounds = sorted({t.system_attrs[_PREFIX + "round"] for t in trials}, reverse=True)
        for r in rounds if round_ is None else [round_]:
            members = [t for t in trials if t.system_attrs[_PREFIX + "round"] == r]
            done = [t for t in members if t.state == TrialState.COMPLETE and all(n in t.params for n in names)]
            if len(done) >= n_unknowns(len(names), self._mode):
                x = np.array([[self._to_unit(space[n], t.params[n]) for n in names] for t in done])
                y = self._minimised(study, done)
                scale = np.array([self._unit_scale(space[n]) for n in names])
                shift = np.array([self._unit_shift(space[n]) for n in names])
                # Fit in unit coordinates (well conditioned), report in parameter units: p = shift + scale * u.
                fit = fit_quadratic(torch.as_tensor(x), torch.as_tensor(y), self._mode)
                return _translate(fit.rescale(torch.as_tensor(scale)), torch.as_tensor(shift))
        raise ValueError("no round has enough finished trials to fit the quadratic model yet")

    def _next_round(
        self,
        study: Study,
        members: Sequence[FrozenTrial],
        space: Mapping[str, BaseDistribution],
        round_: int,
        center: np.ndarray,
        radius: float,
    ) -> tuple[int, np.ndarray, float]:
        """Centre the next round on the model's minimiser within this round's box."""
        names = list(space)
        done = [t for t in members if t.state == TrialState.COMPLETE and all(n in t.params for n in names)]
        if not done:
            # The whole round failed: nothing says where to go but away. Restart at a random centre.
            return round_ + 1, self._rng.uniform(0.0, 1.0, size=len(names)), self._radius0
        offsets = np.array(
            [
                [(self._to_unit(space[n], t.params[n]) - c) / radius for n, c in zip(names, center, strict=True)]
                for t in done
            ]
        )
        y = self._minimised(study, done)
        step = offsets[int(np.argmin(y))]  # the best point seen, unless the model predicts better
        if len(done) < n_unknowns(len(names), self._mode):  # too few points for the model: go to the best
            fit = None
        else:
            fit = fit_quadratic(torch.as_tensor(offsets), torch.as_tensor(y), self._mode)
        if fit is not None and fit.is_finite:
            # Candidates in the box: the clipped model minimiser, the probed points, the box's corners.
            minimiser = solve(fit)
            candidates = [np.clip(minimiser.numpy(), -1.0, 1.0)] if torch.isfinite(minimiser).all() else []
            candidates += list(offsets)
            if len(names) <= 10:
                candidates += [np.array(v, dtype=float) for v in itertools.product((-1.0, 1.0), repeat=len(names))]
            cand = np.array(candidates)
            predicted = fit.predict(torch.as_tensor(cand)).numpy()
            best = int(np.argmin(predicted))
            if predicted[best] < float(np.min(y)):
                step = cand[best]
        on_boundary = bool(np.max(np.abs(step)) >= 1.0 - 1e-9)
        new_radius = min(radius * 2.0, _MAX_RADIUS) if on_boundary else max(radius * 0.5, _MIN_RADIUS)
        new_center = np.clip(center + radius * step, 0.0, 1.0)
        return round_ + 1, new_center, new_radius

    def _current_round(
        self, study: Study, trials: Sequence[FrozenTrial], space: Mapping[str, BaseDistribution]
    ) -> tuple[int, np.ndarray, float]:
        if trials:
            latest = max(trials, key=lambda t: (t.system_attrs[_PREFIX + "round"], -t.number))
            return (
                latest.system_attrs[_PREFIX + "round"],
                np.array(latest.system_attrs[_PREFIX + "center"]),
                float(latest.system_attrs[_PREFIX + "radius"]),
            )
        center = np.array([self._to_unit(d, self._x0[n]) if n in self._x0 else 0.5 for n, d in space.items()])
        return 0, center, self._radius0

    def _design_points(self, k: int) -> np.ndarray:
        # A random design must be the same for every worker and every call: seed it from the design size.
        gen = torch.Generator().manual_seed(self._design) if isinstance(self._design, int) else None
        return make_design(self._design, k, self._mode, 1.0, generator=gen).numpy()

    @staticmethod
    def _in_space(t: FrozenTrial, names: list[str]) -> bool:
        return t.system_attrs.get(_PREFIX + "names") == names

    @staticmethod
    def _minimised(study: Study, trials: Sequence[FrozenTrial]) -> np.ndarray:
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        return np.array([sign * float(t.value) for t in trials])  # type: ignore[arg-type]

    @staticmethod
    def _raise_if_multi_objective(study: Study) -> None:
        if len(study.directions) > 1:
            raise ValueError("HiDLRSampler supports single-objective studies only; use NSGAIISampler or TPESampler")

    # -- unit-cube coordinates ------------------------------------------------------------------------------
    @staticmethod
    def _to_unit(d: FloatDistribution, value: float) -> float:
        if d.log:
            return (math.log(value) - math.log(d.low)) / (math.log(d.high) - math.log(d.low))
        return (value - d.low) / (d.high - d.low)

    @staticmethod
    def _from_unit(d: FloatDistribution, u: float) -> float:
        if d.log:
            value = math.exp(math.log(d.low) + u * (math.log(d.high) - math.log(d.low)))
        else:
            value = d.low + u * (d.high - d.low)
        return float(min(max(value, d.low), d.high))

    @staticmethod
    def _unit_scale(d: FloatDistribution) -> float:
        return (math.log(d.high) - math.log(d.low)) if d.log else (d.high - d.low)

    @staticmethod
    def _unit_shift(d: FloatDistribution) -> float:
        return math.log(d.low) if d.log else d.low


def _translate(fit: QuadraticFit, shift: torch.Tensor) -> QuadraticFit:
    """The model L(x) written around the origin of p = x + shift: L(p) = L0' - b'^T p + 1/2 p^T A p."""
    s = shift.to(torch.float64)
    # L(x) with x = p - s:  L0 - b^T (p - s) + 1/2 (p - s)^T A (p - s)
    b_new = fit.b + fit.A @ s
    L0_new = fit.L0 + float(fit.b @ s) + 0.5 * float(s @ fit.A @ s)
    return QuadraticFit(fit.mode, L0_new, b_new, fit.A, fit.r2, fit.residuals, fit.n_points)
