"""``HiDLRSampler``: a trust-region quadratic-model sampler for Optuna (derivative-free, as BOBYQA).

The parameters live in the unit cube (log-scaled ones in log space). A *run* starts with a design around a
centre (Hi-DLR's pairwise or axial design, radius r). Then every trial is a *model step*: the quadratic model
of :mod:`hidlr_hpo.curvature`, fitted to the run's points nearest the centre, is minimised within the trust
region [c - r, c + r], and the trial evaluates that minimiser. The ratio rho of the actual to the predicted
improvement sets the radius (rho >= 0.75 on the region's boundary: doubled; rho < 0.25: halved), and the
centre is always the best point the run has evaluated, so a poor model never moves the search away from
it. When the model predicts no improvement, the step probes a random direction at half the radius (the
model is refined there, or the region shrinks). When the radius falls below ``min_radius`` (converged, or a
region the model cannot describe) the run restarts from the next point of a scrambled Halton sequence:
global exploration for multimodal objectives. On an exactly quadratic objective the first model step
lands on the minimum.

The state is replayed from the trials' system attributes (kind, point, the prediction of model steps), so
any number of workers on one storage cooperate: each claims its point under a lock (threads) and writes it,
then reads the other trials' points (processes): a trial that finds its point taken moves to a random point
in the region. Failed and pruned trials score as worse than any point: a model step that
fails shrinks the region, a design point that fails is used up.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from scipy.optimize import minimize
from scipy.stats import qmc

from .curvature import QuadraticFit, check_mode, fit_quadratic, make_design, n_unknowns

__all__ = ["HiDLRSampler"]

_logger = optuna.logging.get_logger(__name__)

_PREFIX = "hidlr:"
_LIVE = (TrialState.RUNNING, TrialState.WAITING)
_FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
_MAX_RADIUS = 0.5
_SAME = 1e-12  # two points closer than this (max-norm, unit cube) are one point


@dataclass
class _Run:
    """The search state replayed from the finished trials."""

    run: int  # restarts so far
    center: np.ndarray  # the best point of the run (unit cube), or its starting centre
    radius: float
    best: float  # the minimised objective at the centre (inf before any success)
    steps: int  # model steps finished in this run


def _is_continuous(dist: BaseDistribution) -> bool:
    return isinstance(dist, FloatDistribution) and dist.step is None and dist.high > dist.low


class HiDLRSampler(BaseSampler):
    """Trust-region quadratic-model sampler over an Optuna study's continuous parameters.

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
    as Optuna's own relative samplers do. A trial that does not suggest every modelled parameter (a
    conditional space) is left out of the model.

    Args:
        search_space: the continuous parameters to model. None infers them as the intersection of the
            finished trials' spaces (then the first trial is sampled independently).
        mode: the model: ``"full"`` (cross terms, which learn rotation and scaling) or ``"diag"``. A model
            with fewer points near the centre than unknowns falls back to diag.
        design: each run's first points: ``"axial"`` (2d + 1), ``"pairwise"`` (the full model's
            (d + 1)(d + 2) / 2: exact on quadratics after one step), an int (a random design) or a (P, d)
            tensor of offsets in radii.
            Default: pairwise for the full model up to 5 parameters, axial otherwise.
        x0: the first run's centre, in parameter units (default: the middle of each range; the geometric
            middle for log-scaled parameters).
        radius: each run's first radius as a fraction of each normalised range.
        min_radius: a run whose radius falls below this restarts elsewhere.
        running_timeout: seconds after which a RUNNING trial no longer holds its point (a dead worker's;
            Optuna's heartbeat, where the storage has one, fails such trials itself). None: never.
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
        min_radius: float = 1e-4,
        running_timeout: float | None = None,
        seed: int | None = None,
        independent_sampler: BaseSampler | None = None,
        warn_independent_sampling: bool = True,
    ) -> None:
        self._lock = threading.Lock()  # study.optimize(n_jobs=...): one thread claims a point at a time
        self._warn_independent = warn_independent_sampling
        self._warned: set[str] = set()
        self._mode = check_mode(mode)
        if design is not None and not (
            isinstance(design, torch.Tensor)
            or design in ("axial", "pairwise")
            or (isinstance(design, int) and not isinstance(design, bool) and design > 0)
        ):
            raise ValueError(f"design must be 'axial', 'pairwise' or a number of random points, got {design!r}")
        self._design = design
        if not (0 < radius <= _MAX_RADIUS):
            raise ValueError(f"radius must be in (0, {_MAX_RADIUS}] (a fraction of each range), got {radius}")
        if not (0 < min_radius < radius):
            raise ValueError(f"min_radius must be in (0, radius={radius}), got {min_radius}")
        if running_timeout is not None and not running_timeout > 0:
            raise ValueError(f"running_timeout must be None or a number of seconds > 0, got {running_timeout}")
        self._radius0, self._min_radius, self._running_timeout = radius, min_radius, running_timeout
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
        with self._lock:  # choosing a point and recording it is one step for the threads of this process
            u = self._claim(study, trial, space, names)
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

    # -- claiming a point ------------------------------------------------------------------------------------
    def _claim(
        self, study: Study, trial: FrozenTrial, space: Mapping[str, BaseDistribution], names: list[str]
    ) -> np.ndarray:
        """Choose this trial's point, record it, and make sure no other live trial holds the same one."""
        storage = study._storage
        for attempt in range(3):
            trials = [
                t
                for t in study._get_trials(deepcopy=False, use_cache=False)
                if self._in_space(t, names) and t.number != trial.number
            ]
            # A retry moves to a random point drawn from the trial's own number, so that two processes that
            # both moved cannot meet again.
            retry = np.random.default_rng([trial.number, attempt]) if attempt else None
            attrs = self._choose(study, trials, space, names, retry)
            # The point last: a trial interrupted while writing (Ctrl-C, a locked database) holds no point and
            # the replay, which reads only trials with one, never sees half of a record.
            for key, value in sorted(attrs.items(), key=lambda item: item[0] == "point"):
                storage.set_trial_system_attr(trial._trial_id, _PREFIX + key, value)
            u = np.array(attrs["point"])
            # Another process may have chosen the same point meanwhile. Whichever of the two reads after the
            # other's write sees it and moves (both, if both wrote before either read): never both stay.
            rivals = [
                t
                for t in study._get_trials(deepcopy=False, use_cache=False)
                if t.number != trial.number
                and self._holds(t)
                and self._in_space(t, names)
                and _PREFIX + "point" in t.system_attrs
                and np.max(np.abs(np.array(t.system_attrs[_PREFIX + "point"]) - u)) < _SAME
            ]
            if not rivals:
                return u
        return u

    def _choose(
        self,
        study: Study,
        trials: Sequence[FrozenTrial],
        space: Mapping[str, BaseDistribution],
        names: list[str],
        retry: np.random.Generator | None = None,
    ) -> dict[str, Any]:
        """The next point (unit cube) and the attributes that let any worker replay the search; on a
        ``retry`` (the point chosen was taken by another process meanwhile) a random point in the region."""
        d = len(names)
        state = self._replay(study, trials, space)
        members = [t for t in trials if t.system_attrs.get(_PREFIX + "run") == state.run]
        taken = [self._point(t, space) for t in trials if self._holds(t)]  # any run's
        record = {"names": names, "run": state.run, "center": state.center.tolist(), "radius": state.radius}
        round_ = state.steps + 1
        index = sum(1 for t in members if t.system_attrs.get(_PREFIX + "round") == round_)
        step = {**record, "round": round_, "index": index}

        def free(u: np.ndarray) -> bool:
            return all(np.max(np.abs(u - v)) >= _SAME for v in taken)

        if retry is not None:
            offset = retry.uniform(-1.0, 1.0, size=d)
            u = np.clip(state.center + state.radius * offset, 0.0, 1.0)
            return {**step, "kind": "explore", "point": u.tolist(), "predicted": None, "base": None}
        if state.steps == 0:  # the run's design around its starting centre: the first point nobody holds
            start = self._start(space, state.run)
            for index, offset in enumerate(self._design_points(d)):
                u = np.clip(start + self._radius0 * offset, 0.0, 1.0)
                if free(u):
                    return {**record, "kind": "design", "round": 0, "index": index, "point": u.tolist()}
        design_running = state.steps == 0 and any(t.state in _LIVE for t in members)
        if not design_running and math.isfinite(state.best):
            done = [
                t
                for t in members
                if t.state == TrialState.COMPLETE and self._complete(t, names) and _PREFIX + "point" in t.system_attrs
            ]
            proposal = self._model_step(study, done, state, d)
            if proposal is None or not free(proposal[0]):
                # The model sees no improvement in the region, or only at a point already evaluated (another
                # run's optimum, another worker's step): probe a random direction at half the radius (inside
                # it where the cube's edge folds that back onto a known point), as a model step predicting a
                # tiny gain, so that no gain there shrinks the region.
                u = self._random_point(state.center, 0.5 * state.radius, d, on_boundary=True)
                while not free(u):
                    u = self._random_point(state.center, 0.5 * state.radius, d)
                return {**step, "kind": "model", "point": u.tolist(), "predicted": 1e-12, "base": state.best}
            u, predicted = proposal
            return {**step, "kind": "model", "point": u.tolist(), "predicted": predicted, "base": state.best}
        # The step is another worker's, or the design still runs: more data for the same model.
        u = self._random_point(state.center, state.radius, d)
        return {**step, "kind": "explore", "point": u.tolist(), "predicted": None, "base": None}

    def _random_point(self, center: np.ndarray, radius: float, d: int, on_boundary: bool = False) -> np.ndarray:
        offset = self._rng.uniform(-1.0, 1.0, size=d)
        if on_boundary:
            offset /= max(float(np.max(np.abs(offset))), 1e-12)
        return np.clip(center + radius * offset, 0.0, 1.0)

    def _point(self, t: FrozenTrial, space: Mapping[str, BaseDistribution]) -> np.ndarray:
        """A trial's point in the unit cube: as recorded, or from its parameters (a trial of an older version)."""
        if _PREFIX + "point" in t.system_attrs:
            return np.array(t.system_attrs[_PREFIX + "point"])
        return np.array([self._to_unit(d, t.params[n]) for n, d in space.items()])

    def _holds(self, t: FrozenTrial) -> bool:
        """Whether a trial holds its point: finished, or live and (with a timeout) recent."""
        if _PREFIX + "point" not in t.system_attrs:
            names = t.system_attrs.get(_PREFIX + "names", [])
            return t.state in _FINISHED and bool(names) and all(n in t.params for n in names)  # an older version's
        if t.state in _FINISHED:
            return True
        if t.state not in _LIVE:
            return False
        if self._running_timeout is None or t.datetime_start is None:
            return True
        return datetime.now() - t.datetime_start < timedelta(seconds=self._running_timeout)

    # -- the search state ------------------------------------------------------------------------------------
    def _start(self, space: Mapping[str, BaseDistribution], run: int) -> np.ndarray:
        """Run 0 starts at x0 (or the middle); a restart at the next point of a scrambled Halton sequence,
        the same in every worker (it depends on nothing but the run's number)."""
        if run == 0:
            return np.array([self._to_unit(d, self._x0[n]) if n in self._x0 else 0.5 for n, d in space.items()])
        return qmc.Halton(len(space), scramble=True, seed=20261202).random(run)[-1]

    def _replay(self, study: Study, trials: Sequence[FrozenTrial], space: Mapping[str, BaseDistribution]) -> _Run:
        """The state after the finished trials, in the order of their numbers."""
        names = list(space)
        n_design = len(self._design_points(len(names)))
        # Restarts are final: a late trial of an earlier run (a slow worker's) cannot take the search back.
        run = max((t.system_attrs.get(_PREFIX + "run", 0) for t in trials), default=0)
        state = _Run(run, self._start(space, run), self._radius0, math.inf, 0)
        designed = 0  # finished design points of this run
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        for t in sorted(trials, key=lambda t: t.number):
            a = t.system_attrs
            if t.state not in _FINISHED or a.get(_PREFIX + "run") != state.run or _PREFIX + "point" not in a:
                continue
            # Failed, pruned, or without every modelled parameter (a conditional space): worse than any point.
            y = sign * float(t.value) if t.state == TrialState.COMPLETE and self._complete(t, names) else math.inf
            u = np.array(a[_PREFIX + "point"])
            kind = a.get(_PREFIX + "kind")
            if kind == "model" and a.get(_PREFIX + "predicted") is not None and a.get(_PREFIX + "base") is not None:
                state.steps += 1
                gain = a[_PREFIX + "base"] - y  # the actual improvement over the centre the step started from
                rho = gain / a[_PREFIX + "predicted"] if math.isfinite(y) else -math.inf
                reach = float(np.max(np.abs(u - np.array(a[_PREFIX + "center"])))) / a[_PREFIX + "radius"]
                if rho >= 0.75 and reach >= 0.9:
                    state.radius = min(2.0 * state.radius, _MAX_RADIUS)  # the model is good: go further
                elif rho < 0.25:
                    state.radius *= 0.5  # the model is poor at this scale
            designed += kind == "design"
            if y < state.best:
                state.best, state.center = y, u
            stuck = state.steps == 0 and designed >= n_design and not math.isfinite(state.best)  # all failed
            if state.radius < self._min_radius or stuck:  # converged, stuck, or failing: restart elsewhere
                state = _Run(state.run + 1, self._start(space, state.run + 1), self._radius0, math.inf, 0)
                designed = 0
        return state

    # -- the model -----------------------------------------------------------------------------------------
    def _model_points(
        self, study: Study, done: Sequence[FrozenTrial], state: _Run, d: int
    ) -> tuple[np.ndarray, np.ndarray, str] | None:
        """The run's points for the model (offsets from the centre in radii) and the model's mode: the points
        within two radii, or the nearest ones when too few are."""
        if not done:
            return None
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        x = np.array([t.system_attrs[_PREFIX + "point"] for t in done])
        y = np.array([sign * float(t.value) for t in done])
        distance = np.max(np.abs(x - state.center), axis=1)
        order = np.argsort(distance, kind="stable")
        need = {"full": n_unknowns(d, "full"), "diag": n_unknowns(d, "diag")}
        mode = self._mode if len(done) >= need[self._mode] else "diag"
        if len(done) < need[mode]:
            return None
        near = int(np.sum(distance <= 2.0 * state.radius))
        keep = order[: max(near, need[mode])]
        # Least squares on at most 3x the unknowns: the nearest describe the region best.
        keep = keep[: max(3 * need[mode], need[mode])]
        return (x[keep] - state.center) / state.radius, y[keep], mode

    def _model_step(
        self, study: Study, done: Sequence[FrozenTrial], state: _Run, d: int
    ) -> tuple[np.ndarray, float] | None:
        """The model's minimiser within the trust region and its predicted improvement over the centre, or
        None when the model predicts none."""
        points = self._model_points(study, done, state, d)
        if points is None or not math.isfinite(state.best):
            return None
        offsets, y, mode = points
        fit = fit_quadratic(torch.as_tensor(offsets), torch.as_tensor(y), mode)
        if not fit.is_finite:
            return None
        b, A = fit.b.numpy(), fit.A.numpy()
        low = np.maximum(-1.0, -state.center / state.radius)  # the region within the unit cube, in radii
        high = np.minimum(1.0, (1.0 - state.center) / state.radius)

        def model(z: np.ndarray) -> tuple[float, np.ndarray]:
            return float(fit.L0 - b @ z + 0.5 * z @ A @ z), A @ z - b  # L(z) = L0 - b^T z + 1/2 z^T A z

        starts = [np.zeros(d), np.where(b > 0, high, low)]  # the centre, the corner the slope points to
        best_z, best_value = np.zeros(d), model(np.zeros(d))[0]
        if np.all(np.linalg.eigvalsh(A) > 0):
            newton = np.linalg.solve(A, b)  # the model's minimiser z* = A^{-1} b
            if np.all((newton >= low) & (newton <= high)):  # inside the region: the constrained minimiser too
                best_z, best_value, starts = newton, model(newton)[0], []
            else:
                starts.append(np.clip(newton, low, high))
        for z0 in starts:
            result = minimize(model, z0, jac=True, method="L-BFGS-B", bounds=list(zip(low, high, strict=True)))
            if np.all(np.isfinite(result.x)) and result.fun < best_value:
                best_z, best_value = result.x, float(result.fun)
        predicted = model(np.zeros(d))[0] - best_value  # L(centre) - L(step) under the model
        if not predicted > 1e-12 * max(1.0, abs(state.best)) or np.max(np.abs(best_z)) < 1e-9:
            return None
        return np.clip(state.center + state.radius * best_z, 0.0, 1.0), predicted

    def fit(self, study: Study) -> QuadraticFit:
        """The quadratic model the next model step would use, in the study's parameter units (log-scaled
        parameters: natural log units), with the objective as minimised (negated for a maximising study).
        """
        modelled = [t for t in study._get_trials(deepcopy=False, use_cache=True) if _PREFIX + "names" in t.system_attrs]
        if not modelled:
            raise ValueError("no trial of this study was sampled by HiDLRSampler yet")
        names = modelled[-1].system_attrs[_PREFIX + "names"]
        trials = [t for t in modelled if self._in_space(t, names)]
        complete = [t for t in trials if self._complete(t, names)]
        if not complete:
            raise ValueError("no trial has suggested every modelled parameter yet")
        space = self._search_space or {n: complete[-1].distributions[n] for n in names}
        state = self._replay(study, trials, space)
        done = [
            t for t in trials if t.state == TrialState.COMPLETE and t.system_attrs.get(_PREFIX + "run") == state.run
        ]
        points = self._model_points(study, done, state, len(names))
        if points is None:
            raise ValueError("the current run has not enough finished trials to fit the quadratic model yet")
        offsets, y, mode = points
        x = state.center + state.radius * offsets  # unit cube
        scale = np.array([self._unit_scale(space[n]) for n in names])
        shift = np.array([self._unit_shift(space[n]) for n in names])
        # Fit in unit coordinates (well conditioned), report in parameter units: p = shift + scale * u.
        fit = fit_quadratic(torch.as_tensor(x), torch.as_tensor(y), mode)
        return _translate(fit.rescale(torch.as_tensor(scale)), torch.as_tensor(shift))

    def _design_points(self, k: int) -> np.ndarray:
        design = self._design
        if design is None:
            design = "pairwise" if self._mode == "full" and k <= 5 else "axial"
        mode = {"pairwise": "full", "axial": "diag"}.get(design, self._mode) if isinstance(design, str) else self._mode
        # A random design must be the same for every worker and every call: seed it from the design size.
        gen = torch.Generator().manual_seed(design) if isinstance(design, int) else None
        return make_design(design, k, mode, 1.0, generator=gen).numpy()

    @staticmethod
    def _in_space(t: FrozenTrial, names: list[str]) -> bool:
        """Whether this sampler chose the trial's point over these parameters."""
        return t.system_attrs.get(_PREFIX + "names") == names

    @staticmethod
    def _complete(t: FrozenTrial, names: list[str]) -> bool:
        """Whether the trial suggested every modelled parameter (a conditional space may leave one out)."""
        return all(n in t.params for n in names)

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
