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
import functools
import io
import itertools
import json
import math
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import trial_queue
from .baselines.gen import GEN_DEFAULTS
from .config import (
    GridMethod,
    GroupGridMethod,
    HiDLRMethod,
    MethodConfig,
    SearchMethod,
    StudyConfig,
)
from .config import describe_method as describe
from .freezing import FreezePolicy
from .groups import group_parameters
from .plots import plt, trial_figures
from .storage import check_storage_url
from .tasks import Task, get_task
from .tracking import Tracker
from .training import EpochLog, TrainResult, prepare, train

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
    """One (method, seed) Optuna study and what it still needs: its configurations, or its search's steps."""

    method: MethodConfig
    seed: int
    study: optuna.Study
    configs: list[dict[str, float]]  # grid points, or one empty configuration (a single run); none for searches
    failed_here: set[str] = field(default_factory=set)  # keys that failed in training in this run: not retried

    def remaining(self) -> int:
        """Trials still to run (an estimate for the progress bar while other workers share the study)."""
        trials = self.study.get_trials(deepcopy=False)
        if isinstance(self.method, SearchMethod):
            return max(0, self.method.n_trials - len(_search_steps(trials)))
        done = {trial_queue.key_of(t) for t in trials if t.state in _DONE} | self.failed_here
        return sum(trial_queue.queue_key(c) not in done for c in self.configs)


_DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def run_study(
    cfg: StudyConfig,
    storage: str | None = None,
    show_progress: bool = True,
    tracking_uri: str | None = None,
    tracking: bool = True,
    on_ready: Callable[[], None] | None = None,
    on_seed_done: Callable[[list[int]], None] | None = None,
    lead: bool = True,
    finish: bool = True,
) -> Tracker:
    """Run every missing trial of the study (a rerun resumes), logging to MLflow unless ``tracking=False``.

    Seeds run one after the other (every method of seed 0, then of seed 1, ...), so a first table is
    there early: ``on_seed_done(seeds)`` is called when every trial of these seeds has finished.
    ``on_ready`` is called once the study's storage and MLflow experiment exist (``hidlr run --workers``
    starts its other workers there). ``lead=False``: a helper worker, which leaves the MLflow parent run to
    the lead; ``finish=False``: the lead closes it later with :func:`finish_study` (after its helpers).
    Returns the tracker (its ``failed`` says whether tracking was switched off by an error).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = check_storage_url(storage or cfg.storage)  # a bad URL fails here, before anything is written
    tracker = Tracker(tracking_uri, enabled=tracking)
    tracker.start_study(cfg.name, cfg.model_dump(), reopen=lead)
    try:
        with _threads(TRIAL_THREADS):  # the task's data too: standardising it is a reduction
            _run_plans(cfg, storage, show_progress, tracker, on_ready, on_seed_done)
    except BaseException:
        if lead:
            tracker.end_study(failed=True)
        raise
    if lead and finish:
        finish_study(cfg, storage, tracker)
    return tracker


def finish_study(cfg: StudyConfig, storage: str, tracker: Tracker) -> None:
    """Put the per-method summary on the MLflow parent run and close it (FINISHED)."""
    if tracker.active:
        tracker.log_summary(method_summary_metrics(cfg, storage))
    tracker.end_study()


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


def _run_plans(
    cfg: StudyConfig,
    storage: str,
    show_progress: bool,
    tracker: Tracker,
    on_ready: Callable[[], None] | None = None,
    on_seed_done: Callable[[list[int]], None] | None = None,
) -> None:
    """Claim and run trials, seed after seed, until none is left to claim; several workers may run this on
    one storage (the progress bar counts every worker's trials)."""
    task = check_study(cfg)  # a bad option fails here, before any trial
    n_groups = len(group_parameters(task.make_model(0), task.grouping))
    check_budgets(cfg, storage)  # before anything is written: a changed budget never reuses trials
    plans = [_plan(cfg, method, seed, storage, n_groups) for seed in cfg.seeds for method in cfg.methods]
    if on_ready is not None:
        on_ready()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),  # from the trials done so far; searches and grids differ, so a rough guide
    )
    total = sum(p.remaining() for p in plans)
    with Progress(*columns, disable=not show_progress) as progress, _poll(plans, total, progress) as bar:
        seeds_done: list[int] = []
        for i, plan in enumerate(plans):
            progress.update(bar, description=f"{cfg.name}: {plan.method.name} seed {plan.seed}")
            objective = _objective(cfg, task, plan.method, plan.seed, n_groups, tracker)
            while (trial := _next_trial(plan, tracker)) is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=UserWarning)
                    ended = trial_queue.run_claimed(plan.study, trial, objective)
                if ended.state == TrialState.FAIL:
                    plan.failed_here.add(trial_queue.key_of(ended))
                    progress.console.print(
                        f"[yellow]{escape(plan.study.study_name)} trial {ended.number} failed: "
                        f"{escape(str(ended.user_attrs.get('error', '?')))}[/yellow]"
                    )
                progress.advance(bar)  # other workers' trials: the poll below, every few seconds
            last_of_seed = i + 1 == len(plans) or plans[i + 1].seed != plan.seed
            if on_seed_done is not None and last_of_seed:
                done = [seed for seed in cfg.seeds if all(p.remaining() == 0 for p in plans if p.seed == seed)]
                if done != seeds_done:  # finished by this worker or others since the last seed
                    seeds_done = done
                    on_seed_done(done)
    left = sum(p.remaining() for p in plans)
    if left:
        print(f"{left} trial(s) are running in other workers; `hidlr report` once they are done")


@contextlib.contextmanager
def _poll(plans: list[_Plan], total: int, progress: Progress) -> Iterator[Any]:
    """The progress bar's task, moved every few seconds to the trials finished by any worker."""
    bar = progress.add_task(f"{plans[0].study.study_name.split('/')[0]}: trials", total=total)
    stop = threading.Event()

    def poll() -> None:
        # Reading every plan's trials takes a while (0.26 s for the digits study's 85): not after each trial.
        while not stop.wait(15.0):
            with contextlib.suppress(Exception):  # a busy database: the next poll will do
                progress.update(bar, completed=total - sum(p.remaining() for p in plans))

    thread = threading.Thread(target=poll, name="progress", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()


def _next_trial(plan: _Plan, tracker: Tracker) -> optuna.Trial | None:
    """Claim the plan's next trial, or None when it has nothing this worker can run.

    Trials of dead workers are failed first (their MLflow runs closed as FAILED) so that their
    configurations run again. A configuration is enqueued when no trial holds it; a search enqueues its
    next proposal when no other worker is running one of its trials (a search's steps are sequential).
    """
    study = plan.study
    while True:
        for trial in trial_queue.fail_stale(study):
            tracker.close_trial_run(study.study_name, trial.number)
        trials = study.get_trials(deepcopy=False)
        method = plan.method
        if isinstance(method, SearchMethod):
            steps = _search_steps(trials)
            if len(steps) >= method.n_trials or any(t.state == TrialState.RUNNING for t in trials):
                return None
            if plan.failed_here & {
                trial_queue.key_of(t)
                for t in trials
                if t.state == TrialState.FAIL and not (_is_search_step(t) or t.user_attrs.get("duplicate"))
            }:
                return None  # a step failed here without a recorded error: not again in this run
            key = f"step {len(steps)}"
            if not any(t.state == TrialState.WAITING and trial_queue.key_of(t) == key for t in trials):
                proposal = _tpe_search(method, plan.seed, steps).ask(_tpe_space(method))
                trial_queue.enqueue(study, proposal.params, key)
            counts = _is_search_step
            wanted = {key}
        else:
            live = (*_DONE, TrialState.RUNNING, TrialState.WAITING)
            held = {trial_queue.key_of(t) for t in trials if t.state in live}
            wanted = {trial_queue.queue_key(config) for config in plan.configs}
            for config in plan.configs:
                key = trial_queue.queue_key(config)
                if key not in held and key not in plan.failed_here:
                    trial_queue.enqueue(study, config, key)
            counts = _is_done
        claimed = trial_queue.claim(study, wanted.__contains__)
        if claimed is None:
            return None
        if not trial_queue.is_duplicate(study, claimed, counts):
            return claimed
        # Two workers enqueued the same configuration at once: the lower-numbered trial is its trial.
        claimed.set_user_attr("duplicate", True)
        study.tell(claimed, state=TrialState.FAIL, skip_if_finished=True)


def in_study_file(method: MethodConfig, trials: list[FrozenTrial], cfg: StudyConfig) -> list[FrozenTrial]:
    """The complete and pruned trials that the study file asks for: a grid's trials at its current values,
    a search's first ``n_trials`` steps (a study run longer before, or with more values, keeps the rest)."""
    if isinstance(method, SearchMethod):
        steps = _search_steps(trials)[: method.n_trials]
        return [t for t in steps if t.state in _DONE]
    done = [t for t in trials if t.state in _DONE]
    if isinstance(method, GridMethod | GroupGridMethod):
        n_groups = (
            _task_groups(cfg.task.name, json.dumps(cfg.task.options, sort_keys=True))
            if isinstance(method, GroupGridMethod)
            else 1
        )  # a uniform grid's points do not depend on it
        wanted = {trial_queue.queue_key(p) for p in _grid_points(method, n_groups)}
        done = [t for t in done if trial_queue.queue_key(t.params) in wanted]
    return done


@functools.cache
def _task_groups(name: str, options: str) -> int:
    task = get_task(name, **json.loads(options))
    return len(group_parameters(task.make_model(0), task.grouping))


def _is_done(trial: FrozenTrial) -> bool:
    return trial.state in _DONE


def _is_search_step(trial: FrozenTrial) -> bool:
    """A finished step of a search: complete, pruned, or failed in training (an interrupted one is retried)."""
    return trial.state in _DONE or (trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def _search_steps(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return sorted((t for t in trials if _is_search_step(t)), key=lambda t: t.number)


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
        storage=trial_queue.open_storage(storage),
        sampler=sampler,
        pruner=_pruner(method, cfg.budget.epochs),
        direction="minimize",
        load_if_exists=True,
    )
    attrs = {
        "fingerprint": fingerprint(cfg, method),  # first: a worker starting now checks it (check_budgets)
        "study": cfg.name,
        "task": cfg.task.name,
        "method": method.name,
        "kind": method.kind,
        "seed": seed,
        "config": method.model_dump(),
        "epochs": cfg.budget.epochs,
    }
    for key, value in attrs.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    if isinstance(method, GridMethod | GroupGridMethod):
        return _Plan(method, seed, study, _grid_points(method, n_groups))
    if isinstance(method, SearchMethod):
        return _Plan(method, seed, study, [])
    return _Plan(method, seed, study, [{}])


#: settings that say how many configurations to try, not what one trial means: a grid may grow (only the new
#: values train) or a search run longer; the report takes the file's values and the first n_trials steps
_EXTENT = ("lrs", "n_trials", "max_configs")


def fingerprint(cfg: StudyConfig, method: MethodConfig) -> dict[str, Any]:
    """What a (method, seed) study's trials mean: the task, the budget and the method's settings. Trials
    made under another fingerprint are never reused or reported with these."""
    return {
        "task": cfg.task.model_dump(mode="json"),
        "budget": cfg.budget.model_dump(mode="json"),
        "method": {k: v for k, v in method.model_dump(mode="json").items() if k not in _EXTENT},
    }


def check_budgets(cfg: StudyConfig, storage: str) -> None:
    """Raise a ValueError naming the first Optuna study of ``cfg`` that the storage already holds with trials
    made under another task, budget or method setting (a ``--quick`` run has its own names)."""
    existing = {s.study_name: s for s in trial_queue.open_storage(storage).get_all_studies()}
    for method in cfg.methods:
        want = fingerprint(cfg, method)
        for seed in cfg.seeds:
            found = existing.get(optuna_study_name(cfg, method, seed))
            if found is None:
                continue
            have = found.user_attrs.get("fingerprint")
            if have is None and "config" in found.user_attrs:  # made before fingerprints: settings and epochs
                config = found.user_attrs["config"]
                have = {
                    **want,
                    "method": {k: v for k, v in config.items() if k not in _EXTENT},
                    "budget": {**want["budget"], "epochs": found.user_attrs.get("epochs")},
                }
            if have is None:
                continue  # another worker is creating it this moment
            have, wanted = _without_defaults(have, cfg, method), _without_defaults(want, cfg, method)
            if have != wanted:
                changed = _changes(have, wanted)
                raise ValueError(
                    f"the storage {storage} already holds {found.study_name!r} run with other settings "
                    f"({changed}); its trials cannot be mixed with these. Give the study a new name, use "
                    f"another --storage, or delete it: optuna delete-study --study-name '{found.study_name}' "
                    f"--storage {storage}"
                )


def _without_defaults(print_: dict[str, Any], cfg: StudyConfig, method: MethodConfig) -> dict[str, Any]:
    """A fingerprint without the settings at their defaults, so that a setting added to the code later (at
    its default, which is what earlier trials ran with) does not make every stored study look changed."""

    def strip(values: Any, model: Any) -> Any:
        if not isinstance(values, dict):
            return values
        defaults = {name: f.get_default(call_default_factory=True) for name, f in type(model).model_fields.items()}
        defaults = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in defaults.items()}
        return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}

    return {
        "task": strip(print_.get("task"), cfg.task),
        "budget": strip(print_.get("budget"), cfg.budget),
        "method": strip(print_.get("method"), method),
    }


def _changes(have: dict[str, Any], want: dict[str, Any], prefix: str = "") -> str:
    """The first differences of two nested dicts, as 'budget.epochs 2 -> 30' (a key missing on one side is
    that setting at its default)."""
    diffs = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key, _DEFAULT), want.get(key, _DEFAULT)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _changes(a, b, f"{prefix}{key}.")
            if inner:
                diffs.append(inner)
        elif a != b:
            diffs.append(f"{prefix}{key} {a!r} -> {b!r}")
    return "; ".join(diffs[:3])


class _Default:
    def __repr__(self) -> str:
        return "default"


_DEFAULT = _Default()


def _pruner(method: MethodConfig, epochs: int) -> optuna.pruners.BasePruner:
    """Successive halving or Hyperband over validation checks (a third of the trials go on at each rung), or
    none. A check is an epoch, or 1/R of one with ``checks_per_epoch = R``; the first rung is a tenth of the
    run's checks (at least one)."""
    kind = getattr(method, "pruner", "none")
    checks = epochs * getattr(method, "checks_per_epoch", 1)
    first = max(1, checks // 10)
    if kind == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=checks, reduction_factor=3)
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
        lr: float | list[float] | None = None
        if isinstance(method, GridMethod | SearchMethod):
            low, high = (
                (min(method.lrs), max(method.lrs)) if isinstance(method, GridMethod) else (method.low, method.high)
            )
            lr = trial.suggest_float("lr", low, high, log=True)
        elif isinstance(method, GroupGridMethod):
            lo, hi = min(method.lrs), max(method.lrs)
            lr = [trial.suggest_float(f"lr{k}", lo, hi, log=True) for k in range(n_groups)]
        kwargs = train_kwargs(cfg, method, seed, lr)
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
        if run.run_id is not None:  # so that a resume can close the run of a trial whose worker died
            trial.set_user_attr("mlflow_run_id", run.run_id)
        if run.active and "hidlr" in kwargs:
            kwargs["hidlr"] = {**kwargs["hidlr"], "measure_realised": True}  # diagnostic only: same trajectory
        pruned = getattr(method, "pruner", "none") != "none"
        started = time.perf_counter()

        checks = getattr(method, "checks_per_epoch", 1) if pruned else 1

        def on_epoch(log: EpochLog) -> None:
            run.epoch(log)
            index = (log.epoch + 1) * checks - 1  # the pruner's step: checks so far (epochs, when 1 per epoch)
            trial.report(log.val_loss if math.isfinite(log.val_loss) else math.inf, index)
            if pruned and log.epoch + 1 < budget.epochs and trial.should_prune():
                _record_partial(trial, log.val_loss, log.compute, (log.epoch + 1), time.perf_counter() - started)
                raise optuna.TrialPruned(f"pruned after epoch {log.epoch + 1}: val loss {log.val_loss:.4g}")

        def on_check(index: int, val_loss: float, compute: float) -> None:
            trial.report(val_loss if math.isfinite(val_loss) else math.inf, index)
            if trial.should_prune():
                epochs_run = (index + 1) / checks
                _record_partial(trial, val_loss, compute, epochs_run, time.perf_counter() - started)
                raise optuna.TrialPruned(f"pruned after {epochs_run:.2f} epochs: val loss {val_loss:.4g}")

        try:
            result = train(
                task,
                on_epoch=on_epoch,
                on_refit=run.refit,
                checks_per_epoch=checks,
                on_check=on_check if checks > 1 else None,
                **kwargs,
            )
            _record(trial, result)
        except optuna.TrialPruned:
            run.finish({"compute": trial.user_attrs.get("compute", 0.0)}, state="PRUNED")
            raise
        except BaseException as exc:
            run.finish({}, state="FAIL")
            if isinstance(exc, Exception):  # failed in training or recording (an interrupt is not a result)
                # The trial may be finished already: failed by another worker while this one was paused.
                with contextlib.suppress(Exception):
                    trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
            raise
        if run.active:
            try:
                figures = trial_figures(result)
            except Exception as exc:  # noqa: BLE001 - a plot is tracking, never the trial's result
                warnings.warn(f"the trial's figures could not be drawn: {exc}", RuntimeWarning, stacklevel=1)
                figures = []
            run.finish(result.summary(), figures, state="COMPLETE")
            for _, figure in figures:
                plt.close(figure)
            trial.set_user_attr("tracking_seconds", run.log_seconds)
        value = result.final_val_loss
        return value if math.isfinite(value) else math.inf  # a diverged run is a bad result, not a failure

    return objective


def train_kwargs(
    cfg: StudyConfig, method: MethodConfig, seed: int, lr: float | list[float] | None = None
) -> dict[str, Any]:
    """The keyword arguments of :func:`~hidlr_hpo.training.train` for one trial of ``method``; ``lr``: the
    rate(s) the trial sampled (a grid value, a search's proposal), else the method's own."""
    budget = cfg.budget
    kwargs: dict[str, Any] = {"epochs": budget.epochs, "batch_size": budget.batch_size, "seed": seed}
    kwargs["lr"] = lr if lr is not None else getattr(method, "lr", None)
    kwargs.update(optimizer=method.optimizer, optimizer_options=method.optimizer_options)
    if isinstance(method, HiDLRMethod):
        kwargs.update(probe=method.probe, grouping=method.grouping, hidlr=hidlr_kwargs(method))
    else:
        kwargs.update(schedule=method.schedule, warmup=method.warmup)
    return kwargs


def check_study(cfg: StudyConfig) -> Task:
    """Build, without training, what the trials of ``cfg`` build: the task, and per method its parameter
    groups, optimizer, schedule and HiDLR. A bad task name or option, grouping, optimizer option or Hi-DLR
    option is then one ValueError naming the method, before any trial runs or anything is written.
    Returns the task."""
    try:
        task = get_task(cfg.task.name, **cfg.task.options)
        model = task.make_model(0)
        task_groups = len(group_parameters(model, task.grouping))
    except (KeyError, TypeError, ValueError, ImportError) as exc:
        options = f" with options {cfg.task.options}" if cfg.task.options else ""
        raise ValueError(f"task {cfg.task.name!r}{options}: {_reason(exc)}") from None
    for i, method in enumerate(cfg.methods):
        try:
            grouping = getattr(method, "grouping", None)
            n_groups = len(group_parameters(model, grouping)) if grouping else task_groups
            lr: float | list[float] | None = None
            if isinstance(method, GridMethod):
                lr = min(method.lrs)
            elif isinstance(method, GroupGridMethod):
                lr = [min(method.lrs)] * n_groups
            elif isinstance(method, SearchMethod):
                lr = method.low
            # Quiet: some optimizers print at construction (D-Adaptation's "Using decoupled weight decay").
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                prepare(task, **train_kwargs(cfg, method, 0, lr))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"methods.{i} ({method.name}): {_reason(exc)}") from None
    return task


def _reason(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.replace(".__init__()", "").replace("__init__()", "").strip()


def hidlr_kwargs(method: HiDLRMethod) -> dict[str, Any]:
    """The ``HiDLR`` keyword arguments of a method: its fields, over GeN's defaults for ``preset="gen"``."""
    own = {"mode": method.mode, "interval": method.interval, "horizon": method.horizon}
    if method.preset == "gen":  # GeN's defaults, unless the study file sets a field explicitly
        own = {**GEN_DEFAULTS, **{k: v for k, v in own.items() if k in method.model_fields_set or k == "horizon"}}
    kwargs = {**own, **method.options}
    if method.freeze is not None:
        kwargs["freeze"] = FreezePolicy(**method.freeze)  # type: ignore[arg-type]
    return kwargs


def _record_numerics(trial: optuna.Trial) -> None:
    """What the trial runs with that its numbers depend on beyond the study file (the report states it)."""
    trial.set_user_attr("torch_threads", torch.get_num_threads())
    trial.set_user_attr("cpu_capability", torch.backends.cpu.get_cpu_capability())
    trial.set_user_attr("torch_version", torch.__version__)


def _record_partial(trial: optuna.Trial, val_loss: float, compute: float, epochs_run: float, seconds: float) -> None:
    """What a pruned trial spent: its compute, time and epochs up to the pruning (counted in the method's total)."""
    trial.set_user_attr("compute", compute)
    trial.set_user_attr("wall_seconds", seconds)
    trial.set_user_attr("epochs_run", epochs_run)
    trial.set_user_attr("final_val_loss", val_loss if math.isfinite(val_loss) else None)


def _record(trial: optuna.Trial, result: TrainResult) -> None:
    for key, value in result.summary().items():
        trial.set_user_attr(key, value if math.isfinite(value) else None)
    trial.set_user_attr("probe_compute", result.probe_compute)
    trial.set_user_attr("trainable_fraction", result.trainable_fraction)  # MLflow has it per refit (freeze=)
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
        if h.freezer is not None:  # automatic PEFT: which groups froze, and when
            trial.set_user_attr("frozen_groups", h.frozen_groups)
            trial.set_user_attr("freeze_events", [[e.step, h.group_names[e.group], e.action] for e in h.freezer.events])
        trial.set_user_attr(
            "refits",
            {
                "step": [r.step for r in h.history],
                "lrs": [r.applied_lrs for r in h.history],
                "rejected": h.n_rejected,
                "group_names": h.group_names,
            },
        )
