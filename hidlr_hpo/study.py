"""Run a comparison study: every method x configuration x seed as an Optuna trial, on an RDB storage.

Each (method, seed) pair is one Optuna study named ``"{study}/{method}/seed{seed}"``:

- ``hidlr`` and ``fixed``: one trial (one training run);
- ``grid``: Optuna's ``GridSampler`` over the uniform learning rate, one trial per grid value;
- ``group-grid``: ``GridSampler`` over one learning rate per group (the product grid);
- ``tpe``: Optuna's ``TPESampler`` over the uniform learning rate, ``n_trials`` trials.

Every trial's value is its final validation loss (what a grid search selects on); its user attributes hold
the test metrics, the compute in forward-equivalents, the wall time and the curves that ``hidlr report``
plots. A rerun resumes: configurations with a finished trial are not trained again, and a trial left
``RUNNING`` by an interrupted run is marked failed and its configuration run again.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .baselines.gen import GEN_DEFAULTS
from .config import FixedMethod, GridMethod, GroupGridMethod, HiDLRMethod, MethodConfig, StudyConfig, TPEMethod
from .config import describe_method as describe
from .groups import group_parameters
from .plots import plt, trial_figures
from .tasks import Task, get_task
from .tracking import Tracker
from .training import TrainResult, train

__all__ = ["optuna_study_name", "run_study"]


def optuna_study_name(cfg: StudyConfig, method: MethodConfig, seed: int) -> str:
    return f"{cfg.name}/{method.name}/seed{seed}"


@dataclass
class _Plan:
    method: MethodConfig
    seed: int
    study: optuna.Study
    missing: int  # trials still to run
    enqueue: list[dict[str, float]]  # grid points without a finished trial


def run_study(
    cfg: StudyConfig,
    storage: str | None = None,
    show_progress: bool = True,
    tracking_uri: str | None = None,
    tracking: bool = True,
) -> Tracker:
    """Run every missing trial of the study (a rerun resumes), logging to MLflow unless ``tracking=False``.

    Returns the tracker (its ``failed`` says whether tracking was switched off by an error).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage or cfg.storage
    tracker = Tracker(tracking_uri, enabled=tracking)
    tracker.start_study(cfg.name, cfg.model_dump())
    task = get_task(cfg.task.name, **cfg.task.options)
    n_groups = len(group_parameters(task.make_model(0), task.grouping))
    plans = [_plan(cfg, method, seed, storage, n_groups) for method in cfg.methods for seed in cfg.seeds]
    total = sum(p.missing for p in plans)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        bar = progress.add_task(f"{cfg.name}: trials", total=total)
        for plan in plans:
            if plan.missing == 0:
                continue
            progress.update(bar, description=f"{cfg.name}: {plan.method.name} seed {plan.seed}")
            for params in plan.enqueue:
                plan.study.enqueue_trial(params)
            objective = _objective(cfg, task, plan.method, plan.seed, n_groups, tracker)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)
                plan.study.optimize(objective, n_trials=plan.missing, callbacks=[lambda s, t: progress.advance(bar)])
    return tracker


def _plan(cfg: StudyConfig, method: MethodConfig, seed: int, storage: str, n_groups: int) -> _Plan:
    sampler = _sampler(method, seed, n_groups)
    study = optuna.create_study(
        study_name=optuna_study_name(cfg, method, seed),
        storage=storage,
        sampler=sampler,
        direction="minimize",
        load_if_exists=True,
    )
    for key, value in {
        "study": cfg.name,
        "task": cfg.task.name,
        "method": method.name,
        "kind": method.kind,
        "seed": seed,
        "config": method.model_dump(),
        "epochs": cfg.budget.epochs,
    }.items():
        study.set_user_attr(key, value)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Left running by an interrupted run (one runner per study is assumed): run it again.
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if isinstance(method, GridMethod | GroupGridMethod):
        grid = _grid_points(method, n_groups)
        finished = {tuple(sorted(t.params.items())) for t in done}
        todo = [p for p in grid if tuple(sorted(p.items())) not in finished]
        return _Plan(method, seed, study, len(todo), todo)
    wanted = method.n_trials if isinstance(method, TPEMethod) else 1
    return _Plan(method, seed, study, max(0, wanted - len(done)), [])


def _grid_points(method: GridMethod | GroupGridMethod, n_groups: int) -> list[dict[str, float]]:
    if isinstance(method, GridMethod):
        return [{"lr": lr} for lr in method.lrs]
    n_configs = len(method.lrs) ** n_groups
    if n_configs > method.max_configs:
        raise ValueError(
            f"method {method.name!r}: a per-group grid of {len(method.lrs)} values over {n_groups} groups has "
            f"{n_configs} configurations, above max_configs={method.max_configs}; use fewer values or a uniform grid"
        )
    return [{f"lr{k}": v for k, v in enumerate(combo)} for combo in itertools.product(method.lrs, repeat=n_groups)]


def _sampler(method: MethodConfig, seed: int, n_groups: int) -> optuna.samplers.BaseSampler:
    if isinstance(method, GridMethod | GroupGridMethod):
        space: dict[str, list[float]] = {}
        for point in _grid_points(method, n_groups):
            for name, value in point.items():
                space.setdefault(name, []).append(value)
        return optuna.samplers.GridSampler({k: sorted(set(v)) for k, v in space.items()}, seed=seed)
    if isinstance(method, TPEMethod):
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # no parameters to sample


def _objective(
    cfg: StudyConfig, task: Task, method: MethodConfig, seed: int, n_groups: int, tracker: Tracker
) -> Callable:
    budget = cfg.budget

    def objective(trial: optuna.Trial) -> float:
        kwargs: dict[str, Any] = {"epochs": budget.epochs, "batch_size": budget.batch_size, "seed": seed}
        if isinstance(method, GridMethod):
            kwargs["lr"] = trial.suggest_float("lr", min(method.lrs), max(method.lrs), log=True)
        elif isinstance(method, GroupGridMethod):
            lo, hi = min(method.lrs), max(method.lrs)
            kwargs["lr"] = [trial.suggest_float(f"lr{k}", lo, hi, log=True) for k in range(n_groups)]
        elif isinstance(method, TPEMethod):
            kwargs["lr"] = trial.suggest_float("lr", method.low, method.high, log=True)
        elif isinstance(method, FixedMethod):
            kwargs["lr"] = method.lr
        elif isinstance(method, HiDLRMethod):
            kwargs.update(lr=method.lr, probe=method.probe, grouping=method.grouping, hidlr=hidlr_kwargs(method))
        if isinstance(method, HiDLRMethod):
            kwargs.update(optimizer=method.optimizer, optimizer_options=method.optimizer_options)
        else:
            kwargs.update(
                optimizer=method.optimizer,
                optimizer_options=method.optimizer_options,
                schedule=method.schedule,
                warmup=method.warmup,
            )
        run = tracker.start_trial(
            method=method.name,
            description=describe(method),
            seed=seed,
            config={**method.model_dump(), "params": trial.params, "budget": budget.model_dump()},
            study=trial.study.study_name,
            trial=trial.number,
        )
        if run.active and "hidlr" in kwargs:
            kwargs["hidlr"] = {**kwargs["hidlr"], "measure_realised": True}  # diagnostic only: same trajectory
        try:
            result = train(
                task,
                on_epoch=run.epoch,
                on_refit=run.refit,
                **kwargs,
            )
        except BaseException:
            run.finish({}, failed=True)
            raise
        _record(trial, result)
        if run.active:
            figures = trial_figures(result)
            run.finish(result.summary(), figures)
            for _, figure in figures:
                plt.close(figure)
            trial.set_user_attr("tracking_seconds", run.log_seconds)
        value = result.final_val_loss
        return value if math.isfinite(value) else math.inf  # a diverged run is a bad result, not a failure

    return objective


def hidlr_kwargs(method: HiDLRMethod) -> dict[str, Any]:
    """The ``HiDLR`` keyword arguments of a method: its fields, over GeN's defaults for ``preset="gen"``."""
    own = {"mode": method.mode, "interval": method.interval, "horizon": method.horizon}
    if method.preset == "gen":  # GeN's defaults, unless the study file sets a field explicitly
        own = {**GEN_DEFAULTS, **{k: v for k, v in own.items() if k in method.model_fields_set or k == "horizon"}}
    return {**own, **method.options}


def _record(trial: optuna.Trial, result: TrainResult) -> None:
    for key, value in result.summary().items():
        trial.set_user_attr(key, value if math.isfinite(value) else None)
    trial.set_user_attr("probe_compute", result.probe_compute)
    trial.set_user_attr(
        "curve",
        {
            "epoch": [e.epoch for e in result.epochs],
            "val_loss": [e.val_loss if math.isfinite(e.val_loss) else None for e in result.epochs],
            "compute": [e.compute for e in result.epochs],
            "lrs": [e.lrs for e in result.epochs],
            "effective_lrs": [e.effective_lrs for e in result.epochs],
        },
    )
    if result.hidlr is not None:
        h = result.hidlr
        trial.set_user_attr(
            "refits",
            {
                "step": [r.step for r in h.history],
                "lrs": [r.applied_lrs for r in h.history],
                "rejected": h.n_rejected,
                "group_names": h.group_names,
            },
        )
