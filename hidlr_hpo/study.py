"""Run a comparison study: every method x configuration x seed as an Optuna trial, on an RDB storage.

Each (method, seed) pair is one Optuna study named ``"{study}/{method}/seed{seed}"``:

- ``hidlr`` and ``fixed``: one trial (one training run);
- ``grid``: Optuna's ``GridSampler`` over the uniform learning rate, one trial per grid value;
- ``group-grid``: ``GridSampler`` over one learning rate per group (the product grid);
- ``tpe``: Optuna's ``TPESampler`` over the uniform learning rate, ``n_trials`` trials;
- ``hidlr-search``: the outer search, TPE over Hi-DLR's starting rate, each trial one Hi-DLR run.

Every trial reports its validation loss after each epoch (``trial.report``: learning curves in
optuna-dashboard); a method with a ``pruner`` stops poor trials early (Optuna's successive-halving or
Hyperband pruner), and a pruned trial's compute up to that epoch counts in the method's total.

Every trial's value is its final validation loss (what a grid search selects on); its user attributes hold
the test metrics, the compute in forward-equivalents, the wall time and the curves that ``hidlr report``
plots. A rerun resumes: configurations with a finished trial are not trained again, and a trial left
``RUNNING`` (or enqueued) by an interrupted run is marked failed and its configuration run again.

A study's numbers depend only on its study file and seeds: trials run with :data:`TRIAL_THREADS` intra-op
threads on any machine, ``hidlr run`` pins torch's CPU kernels to AVX2 (:func:`pin_cpu_kernels`), a resumed
TPE search draws what an uninterrupted one would, and every trial records what it ran with
(``torch_threads``, ``cpu_capability``, ``torch_version``), which the report states.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .baselines.gen import GEN_DEFAULTS
from .config import (
    FixedMethod,
    GridMethod,
    GroupGridMethod,
    HiDLRMethod,
    MethodConfig,
    SearchMethod,
    StudyConfig,
)
from .config import describe_method as describe
from .groups import group_parameters
from .plots import plt, trial_figures
from .storage import check_storage_url
from .tasks import Task, get_task
from .tracking import Tracker
from .training import EpochLog, TrainResult, train

__all__ = ["TRIAL_THREADS", "optuna_study_name", "pin_cpu_kernels", "run_study"]

# Intra-op threads of every trial, whatever the machine has: the count decides how matrix products and
# reductions are split, so it changes the low bits of every result, and methods that amplify round-off
# (Prodigy, D-Adaptation, GeN's preset, Adamax-SAGE at its top rates) then end visibly elsewhere. 2 is what
# the committed reports ran with; a machine with fewer cores gives the same numbers, only slower.
TRIAL_THREADS = 2
# torch's CPU kernels at this vector width wherever the CPU has it: the AVX-512 kernels sum and take exp/log
# in other orders than the AVX2 ones (the committed reports'), so an AVX-512 machine's numbers differed.
CPU_KERNELS = "avx2"


def optuna_study_name(cfg: StudyConfig, method: MethodConfig, seed: int) -> str:
    return f"{cfg.name}/{method.name}/seed{seed}"


@dataclass
class _Plan:
    method: MethodConfig
    seed: int
    study: optuna.Study
    missing: int  # trials still to run
    enqueue: list[dict[str, float]]  # grid points without a finished trial
    search: optuna.Study | None = None  # tpe: the in-memory search that proposes the next trial's rate


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
    storage = check_storage_url(storage or cfg.storage)  # a bad URL fails here, before anything is written
    tracker = Tracker(tracking_uri, enabled=tracking)
    tracker.start_study(cfg.name, cfg.model_dump(), reopen=True)
    try:
        with _threads(TRIAL_THREADS):  # the task's data too: standardising it is a reduction
            _run_plans(cfg, storage, show_progress, tracker)
    except BaseException:
        tracker.end_study(failed=True)
        raise
    if tracker.active:
        tracker.log_summary(method_summary_metrics(cfg, storage))
    tracker.end_study()
    return tracker


def method_summary_metrics(cfg: StudyConfig, storage: str | None = None) -> dict[str, float]:
    """Per method, means over seeds of the selected trial's final validation and test loss, and of the compute
    and trials spent per seed: the parent run's summary metrics."""
    from .report import collect  # report builds on this module

    metrics: dict[str, float] = {}
    for summary in collect(cfg, storage):
        if not summary.selected:
            continue
        for key in ("final_val_loss", "test_loss", "test_acc"):
            values = [v for v in summary.metric(key) if math.isfinite(v)]
            if values:
                metrics[f"{summary.name}/{key}"] = statistics.mean(values)
        metrics[f"{summary.name}/compute"] = statistics.mean(summary.compute)
        metrics[f"{summary.name}/trials"] = statistics.mean(summary.trials_per_seed)
        metrics[f"{summary.name}/seeds"] = len(summary.selected)
    return metrics


def _run_plans(cfg: StudyConfig, storage: str, show_progress: bool, tracker: Tracker) -> None:
    task = get_task(cfg.task.name, **cfg.task.options)
    n_groups = len(group_parameters(task.make_model(0), task.grouping))
    plans = [_plan(cfg, method, seed, storage, n_groups) for method in cfg.methods for seed in cfg.seeds]
    total = sum(p.missing for p in plans)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),  # from the trials done so far; searches and grids differ, so a rough guide
    )
    with Progress(*columns, disable=not show_progress) as progress:
        bar = progress.add_task(f"{cfg.name}: trials", total=total)
        for plan in plans:
            if plan.missing == 0:
                continue
            progress.update(bar, description=f"{cfg.name}: {plan.method.name} seed {plan.seed}")
            for params in plan.enqueue:
                plan.study.enqueue_trial(params)
            objective = _objective(cfg, task, plan.method, plan.seed, n_groups, tracker)
            callbacks = [lambda s, t: progress.advance(bar)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)
                if plan.search is None:
                    plan.study.optimize(objective, n_trials=plan.missing, callbacks=callbacks)
                    continue
                for _ in range(plan.missing):  # the search proposes, the stored study runs and records
                    proposal = plan.search.ask(_tpe_space(plan.method))  # type: ignore[arg-type]
                    plan.study.enqueue_trial(proposal.params)
                    # A trial that raises is recorded as failed and the search moves on (a resume replays it
                    # as failed too), instead of proposing the same failing rate again forever.
                    plan.study.optimize(objective, n_trials=1, callbacks=callbacks, catch=(Exception,))
                    _tell(plan.search, proposal, plan.study.get_trials(deepcopy=False)[-1])


def pin_cpu_kernels() -> None:
    """Make torch run its AVX2 CPU kernels on any x86 CPU that has them (AVX-512 ones too), unless the
    environment already sets ``ATEN_CPU_CAPABILITY``.

    torch picks its kernels once, at the process's first CPU operation: call this before any (``hidlr run``
    does); afterwards it changes nothing, and the trials' ``cpu_capability`` says what they ran with.
    """
    has_avx2 = getattr(torch.cpu, "_is_avx2_supported", lambda: False)  # asks the CPU, picks nothing
    if "ATEN_CPU_CAPABILITY" not in os.environ and has_avx2():
        os.environ["ATEN_CPU_CAPABILITY"] = CPU_KERNELS


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n``, and the caller's restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _plan(cfg: StudyConfig, method: MethodConfig, seed: int, storage: str, n_groups: int) -> _Plan:
    sampler = _sampler(method, seed, n_groups)
    study = optuna.create_study(
        study_name=optuna_study_name(cfg, method, seed),
        storage=storage,
        sampler=sampler,
        pruner=_pruner(method, cfg.budget.epochs),
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
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        # Left running or enqueued by an interrupted run (one runner per study is assumed): run it again, as
        # planned below; a stale enqueued trial would otherwise be run in place of the one planned.
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if isinstance(method, SearchMethod):  # a trial that failed in training is a finished search step too
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        done = sorted(done + [t for t in failed if "error" in t.user_attrs], key=lambda t: t.number)
    if isinstance(method, GridMethod | GroupGridMethod):
        grid = _grid_points(method, n_groups)
        finished = {tuple(sorted(t.params.items())) for t in done}
        todo = [p for p in grid if tuple(sorted(p.items())) not in finished]
        return _Plan(method, seed, study, len(todo), todo)
    if isinstance(method, SearchMethod):
        return _Plan(method, seed, study, max(0, method.n_trials - len(done)), [], _tpe_search(method, seed, done))
    return _Plan(method, seed, study, max(0, 1 - len(done)), [])


def _pruner(method: MethodConfig, epochs: int) -> optuna.pruners.BasePruner:
    """Successive halving or Hyperband over epochs (a third of the trials go on at each rung), or none."""
    kind = getattr(method, "pruner", "none")
    min_epochs = max(1, epochs // 10)
    if kind == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=3)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _tpe_space(method: SearchMethod) -> dict[str, optuna.distributions.BaseDistribution]:
    return {"lr": optuna.distributions.FloatDistribution(method.low, method.high, log=True)}


def _tpe_search(method: SearchMethod, seed: int, done: list[FrozenTrial]) -> optuna.Study:
    """The TPE search as an uninterrupted run would have it after the finished trials.

    A sampler fresh from its seed would draw the first trials' rates again on a resume. Asked once per
    finished trial, in order, and told their results, it makes the draws the original run made (the same
    ones, as the objective's), and then proposes what that run would have proposed next.
    """
    search = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize")
    ordered = sorted(done, key=lambda t: t.number)
    for trial in ordered:
        proposal = search.ask(_tpe_space(method))
        if proposal.params != trial.params:  # the range or Optuna changed: replaying would mispair rates and losses
            warnings.warn(
                f"{method.name}: resuming from {len(ordered)} finished trials whose rates the current settings do "
                "not reproduce; the search continues from them, but not as an uninterrupted run would have",
                RuntimeWarning,
                stacklevel=2,
            )
            return _added_search(seed, ordered)
        _tell(search, proposal, trial)
    return search


def _added_search(seed: int, done: list[FrozenTrial]) -> optuna.Study:
    """A TPE search told each finished trial as it was (its own rate, value or curve), in order."""
    search = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize")
    for t in done:
        values = {"value": t.value} if t.state == TrialState.COMPLETE else {}
        search.add_trial(
            optuna.trial.create_trial(
                state=t.state,
                params=t.params,
                distributions=t.distributions,
                intermediate_values=t.intermediate_values,
                **values,
            )
        )
    return search


def _tell(search: optuna.Study, proposal: optuna.Trial, stored: FrozenTrial) -> None:
    """Tell the in-memory search how the stored trial ended: its value, or its curve up to the pruning."""
    if stored.state == TrialState.COMPLETE:
        search.tell(proposal, stored.value)
    elif stored.state == TrialState.PRUNED:
        for step, value in sorted(stored.intermediate_values.items()):
            proposal.report(value, step)  # TPE ranks a pruned trial by its last reported value
        search.tell(proposal, state=TrialState.PRUNED)
    else:
        search.tell(proposal, state=TrialState.FAIL)


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
    return optuna.samplers.RandomSampler(seed=seed)  # no parameters to sample (tpe: its search proposes them)


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
        elif isinstance(method, SearchMethod):
            kwargs["lr"] = trial.suggest_float("lr", method.low, method.high, log=True)
        elif isinstance(method, FixedMethod):
            kwargs["lr"] = method.lr
        if isinstance(method, HiDLRMethod):
            kwargs.setdefault("lr", method.lr)  # a search's trials start from the rate it proposes
            kwargs.update(probe=method.probe, grouping=method.grouping, hidlr=hidlr_kwargs(method))
            kwargs.update(optimizer=method.optimizer, optimizer_options=method.optimizer_options)
        else:
            kwargs.update(
                optimizer=method.optimizer,
                optimizer_options=method.optimizer_options,
                schedule=method.schedule,
                warmup=method.warmup,
            )
        _record_numerics(trial)
        run = tracker.start_trial(
            method=method.name,
            description=describe(method),
            seed=seed,
            config={**method.model_dump(), "params": trial.params, "budget": budget.model_dump()},
            study=trial.study.study_name,
            trial=trial.number,
            params={
                **trial.params,
                "optimizer": method.optimizer,
                "schedule": getattr(method, "schedule", "hidlr"),
                "epochs": budget.epochs,
                "batch_size": budget.batch_size,
            },
        )
        if run.active and "hidlr" in kwargs:
            kwargs["hidlr"] = {**kwargs["hidlr"], "measure_realised": True}  # diagnostic only: same trajectory
        pruned = getattr(method, "pruner", "none") != "none"
        started = time.perf_counter()

        def on_epoch(log: EpochLog) -> None:
            run.epoch(log)
            trial.report(log.val_loss if math.isfinite(log.val_loss) else math.inf, log.epoch)
            if pruned and log.epoch + 1 < budget.epochs and trial.should_prune():
                _record_partial(trial, log, time.perf_counter() - started)
                raise optuna.TrialPruned(f"pruned after epoch {log.epoch + 1}: val loss {log.val_loss:.4g}")

        try:
            result = train(task, on_epoch=on_epoch, on_refit=run.refit, **kwargs)
        except optuna.TrialPruned:
            run.finish({"compute": trial.user_attrs.get("compute", 0.0)}, state="PRUNED")
            raise
        except BaseException as exc:
            run.finish({}, state="FAIL")
            if isinstance(exc, Exception):  # failed in training (an interrupt is not a result)
                trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
            raise
        _record(trial, result)
        if run.active:
            figures = trial_figures(result)
            run.finish(result.summary(), figures, state="COMPLETE")
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


def _record_numerics(trial: optuna.Trial) -> None:
    """What the trial runs with that its numbers depend on beyond the study file (the report states it)."""
    trial.set_user_attr("torch_threads", torch.get_num_threads())
    trial.set_user_attr("cpu_capability", torch.backends.cpu.get_cpu_capability())
    trial.set_user_attr("torch_version", torch.__version__)


def _record_partial(trial: optuna.Trial, log: EpochLog, seconds: float) -> None:
    """What a pruned trial spent: its compute, time and epochs up to the pruning (counted in the method's total)."""
    trial.set_user_attr("compute", log.compute)
    trial.set_user_attr("wall_seconds", seconds)
    trial.set_user_attr("epochs_run", log.epoch + 1)
    trial.set_user_attr("final_val_loss", log.val_loss if math.isfinite(log.val_loss) else None)


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
        for name, rate in zip(h.group_names, h.lrs(), strict=True):  # one number per group, readable in Optuna
            trial.set_user_attr(f"final_lr_{name}", rate)
        trial.set_user_attr(
            "refits",
            {
                "step": [r.step for r in h.history],
                "lrs": [r.applied_lrs for r in h.history],
                "rejected": h.n_rejected,
                "group_names": h.group_names,
            },
        )
