"""A plain mini-batch training loop for a :class:`~hidlr_hpo.tasks.Task`, with or without Hi-DLR.

Compute is counted in forward-equivalents per example (DESIGN.md section 3): a training step costs 3 per
example (forward 1 + backward 2), a probe forward 1 per example of the probe batch. Evaluation of the
validation and test splits is not counted: every method pays it alike.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .baselines.optimizers import make_optimizer, set_eval_mode
from .baselines.schedules import make_schedule
from .controller import HiDLR, RefitRecord
from .groups import group_names, group_parameters
from .tasks.base import Split, Task

__all__ = ["EpochLog", "TrainResult", "evaluate", "train"]

ProbeSource = Literal["train", "heldout"]


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    lrs: list[float]
    compute: float
    # the rates groups actually stepped with at the epoch's end (see _rate_scale); equal to lrs for most
    effective_lrs: list[float] = field(default_factory=list)
    step: int = 0  # optimizer steps done by the epoch's end
    groups: list[str] = field(default_factory=list)  # group names, in the order of lrs
    plateau_cuts: int | None = None  # Hi-DLR's plateau-guard cuts so far (None: no Hi-DLR)


@dataclass
class TrainResult:
    epochs: list[EpochLog] = field(default_factory=list)
    final_val_loss: float = float("nan")
    final_val_acc: float = float("nan")
    best_val_loss: float = float("nan")
    test_loss: float = float("nan")
    test_acc: float = float("nan")
    compute: float = 0.0  # forward-equivalents per example, probes included
    probe_compute: float = 0.0  # the part of ``compute`` spent on probes
    steps: int = 0
    wall_seconds: float = 0.0  # training and evaluation; callbacks (tracking) and diagnostics excluded
    trainable_fraction: float = 1.0  # of the model's parameters, at the end (LoRA, BitFit, HiDLR(freeze=))
    hidlr: HiDLR | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "final_val_loss": self.final_val_loss,
            "final_val_acc": self.final_val_acc,
            "best_val_loss": self.best_val_loss,
            "test_loss": self.test_loss,
            "test_acc": self.test_acc,
            "compute": self.compute,
            "steps": self.steps,
            "wall_seconds": self.wall_seconds,
        }


def _trainable_fraction(model: nn.Module) -> float:
    """Parameters that train (``requires_grad``) over all the model's parameters, frozen ones included."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / total if total else 1.0


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: Split, batch_size: int = 1024) -> tuple[float, float]:
    """Mean loss and accuracy (NaN for regression) over a whole split, in eval mode."""
    was_training = model.training
    model.eval()
    total, correct, n = 0.0, 0, 0
    for x, y in split.batches(batch_size):
        total += float(task.loss_fn(model, (x, y))) * len(y)
        if task.classification:
            correct += int((model(x).argmax(-1) == y).sum())
        n += len(y)
    model.train(was_training)
    return total / n, (correct / n if task.classification else float("nan"))


@dataclass
class Prepared:
    """What a training run is built from, before its first step."""

    task: Task
    model: nn.Module
    names: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    controller: HiDLR | None
    gen: torch.Generator
    probe_gen: torch.Generator


def prepare(
    task: Task,
    *,
    lr: float | Sequence[float],
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adamw",
    optimizer_options: dict[str, Any] | None = None,
    schedule: str = "constant",
    warmup: float = 0.0,
    hidlr: dict[str, Any] | None = None,
    probe: ProbeSource = "heldout",
    device: str | torch.device = "cpu",
    grouping: str | None = None,
    hidlr_class: type[HiDLR] = HiDLR,
) -> Prepared:
    """Build the model, its groups, the optimizer, the schedule and the HiDLR of a :func:`train` run, without
    training: a bad option raises here (``hidlr run`` calls it for every method before any trial)."""
    task = task.to(device)
    model = task.make_model(seed).to(device)
    model.train()
    groups = group_parameters(model, grouping or task.grouping)
    names = group_names(groups)
    if isinstance(lr, Sequence):
        if len(lr) != len(groups):
            raise ValueError(f"got {len(lr)} learning rates for {len(groups)} parameter groups")
        for group, group_lr in zip(groups, lr, strict=True):
            group["lr"] = float(group_lr)
        lr = float(lr[0])
    options = dict(optimizer_options or {})
    steps_per_epoch = -(-len(task.train) // batch_size)
    total_steps = epochs * steps_per_epoch
    if optimizer == "schedulefree-adamw":  # no schedule by design; its warm-up is its own
        if schedule != "constant":
            raise ValueError(f"Schedule-Free AdamW takes no schedule (got {schedule!r}); use schedule='constant'")
        options.setdefault("warmup_steps", int(warmup * total_steps))
        warmup = 0.0
    opt = (
        make_optimizer(optimizer, groups, lr, **options)
        if isinstance(optimizer, str)
        else optimizer(groups, lr=lr, **options)
    )
    gen = torch.Generator().manual_seed(seed)
    probe_gen = torch.Generator().manual_seed(seed + 1_000_003)
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {warmup}")
    if hidlr is not None and hidlr.get("slope") == "gradient" and probe != "train":
        raise ValueError(
            "slope='gradient' takes b from the training batch's gradient: it needs probe='train' (the batch just "
            f"trained on), not probe={probe!r}"
        )
    set_eval_mode(opt, False)  # Schedule-Free starts in train mode
    scheduler = None  # constant: no scheduler at all, so nothing overrides Hi-DLR's rates
    if schedule != "constant" or warmup > 0:
        scheduler = make_schedule(opt, schedule, total_steps, int(warmup * total_steps))
    controller = None
    if hidlr is not None:
        kwargs = dict(hidlr)
        if "probes" in kwargs:
            raise ValueError("train() draws the probe batches itself (probe='heldout' or 'train'); drop 'probes'")
        horizon = kwargs.pop("horizon", None)  # True: the planned steps; False or None: off; an int: itself
        if "total_steps" in kwargs and horizon is not None:
            raise ValueError("give the horizon as horizon=True/False or as total_steps=N, not both")
        if "total_steps" not in kwargs:
            kwargs["total_steps"] = (total_steps if horizon else None) if isinstance(horizon, bool | None) else horizon
        # The loop draws each probe batch itself (a held-out one, or the batch just trained on) when one is due.
        if not (isinstance(hidlr_class, type) and issubclass(hidlr_class, HiDLR)):
            raise TypeError(f"hidlr_class must be HiDLR or a subclass of it, got {hidlr_class!r}")
        controller = hidlr_class(opt, model, task.loss_fn, probes=None, **kwargs)
        controller._warned.add("unguarded")  # train() reports every epoch's validation loss, even a 1-epoch run's

    return Prepared(task, model, names, opt, scheduler, controller, gen, probe_gen)


def train(
    task: Task,
    *,
    lr: float | Sequence[float],
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adamw",
    optimizer_options: dict[str, Any] | None = None,
    schedule: str = "constant",
    warmup: float = 0.0,
    hidlr: dict[str, Any] | None = None,
    probe: ProbeSource = "heldout",
    on_epoch: Callable[[EpochLog], None] | None = None,
    on_refit: Callable[[RefitRecord, float, list[str]], None] | None = None,
    device: str | torch.device = "cpu",
    grouping: str | None = None,
    checks_per_epoch: int = 1,
    on_check: Callable[[int, float, float], None] | None = None,
    probe_batch_size: int | None = None,
    hidlr_class: type[HiDLR] = HiDLR,
) -> TrainResult:
    """Train ``task.make_model(seed)`` with ``optimizer`` over the task's groups.

    Args:
        lr: the starting learning rate of every group, or one per group (in the grouping's order).
        optimizer: a name from :data:`~hidlr_hpo.baselines.OPTIMIZERS` ("adamw", "adamw-sage", "prodigy", ...)
            or a factory ``fn(param_groups, lr=...)``; ``optimizer_options`` are its other keyword arguments.
        schedule: "constant", "linear" or "cosine" (multiplies the rates), after a linear warm-up over the
            fraction ``warmup`` of the steps. With ``hidlr`` the schedule gives the shape over time and Hi-DLR
            fits a multiplier per group on top of it.
        hidlr: keyword arguments of :class:`HiDLR` to tune the rates online; None trains at fixed ``lr``.
            ``horizon=True`` is replaced by the planned number of steps, ``horizon=False`` by None.
        probe: the probe batch: ``"train"`` (the batch just trained on) or ``"heldout"`` (a random
            validation batch, so the fitted objective is a validation loss).
        probe_batch_size: the held-out probe batch's size (None: ``batch_size``; at most the validation
            split's size).
        hidlr_class: HiDLR or a subclass of it (the research variants of ``studies/horizon_objectives.py``).
        on_epoch: called after every epoch with its log (progress display, tracking).
        checks_per_epoch, on_check: with ``checks_per_epoch = R > 1``, ``on_check(index, val_loss, compute)``
            is also called R - 1 times within each epoch, at evenly spaced steps (``index`` counts checks over
            the run, the epoch's end being check R (e + 1) - 1): a pruner's rung below one epoch. Evaluating
            does not touch the training's random state, so the trajectory is the same with or without.
        on_refit: called after every Hi-DLR refit with its record, the compute spent so far and the group names.
        device: where the model, the data and the probes live ("cpu", "cuda"); the same code path.
        grouping: overrides the task's grouping strategy (``"single"``: one group, GeN).
    """
    _check_probe_options(task, hidlr, probe, probe_batch_size, hidlr_class)
    start = time.perf_counter()
    run = prepare(
        task,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        optimizer=optimizer,
        optimizer_options=optimizer_options,
        schedule=schedule,
        warmup=warmup,
        hidlr=hidlr,
        probe=probe,
        device=device,
        grouping=grouping,
        hidlr_class=hidlr_class,
    )
    probe_size = batch_size if probe_batch_size is None else probe_batch_size
    task, model, opt, scheduler, controller = run.task, run.model, run.optimizer, run.scheduler, run.controller
    names, gen, probe_gen = run.names, run.gen, run.probe_gen
    result = TrainResult(hidlr=controller)
    examples_trained = 0
    probe_examples = 0
    best = float("inf")
    callback_seconds = 0.0  # time in on_epoch / on_refit (progress, tracking): not the method's cost
    steps_per_epoch = -(-len(task.train) // batch_size)
    # Steps (within an epoch) after which a check runs: R - 1 evenly spaced ones before the epoch's end.
    check_after = {round(k * steps_per_epoch / checks_per_epoch): k for k in range(1, checks_per_epoch)}
    for epoch in range(epochs):
        running, seen = 0.0, 0
        for step_in_epoch, (x, y) in enumerate(task.train.batches(batch_size, gen), start=1):
            loss = task.loss_fn(model, (x, y))
            loss.backward()
            running += float(loss.detach()) * len(y)
            seen += len(y)
            examples_trained += len(y)
            if controller is None:
                opt.step()
            else:
                probe_batch = None
                if controller.refit_due:
                    probe_batch = (x, y) if probe == "train" else _random_batch(task.val, probe_size, probe_gen)
                forwards_before = controller.probe_forwards
                controller.step(probe_batch=probe_batch)
                if probe_batch is not None:
                    probe_examples += (controller.probe_forwards - forwards_before) * len(probe_batch[1])
                    if on_refit is not None and controller.history and controller.history[-1].step == result.steps:
                        t0 = time.perf_counter()
                        on_refit(controller.history[-1], 3.0 * examples_trained + probe_examples, names)
                        callback_seconds += time.perf_counter() - t0
            if scheduler is not None:
                step_lrs = _step_lrs(opt, controller)  # the rates this step used
                step_effective = _effective_lrs(opt, controller)
                scheduler.step()
            opt.zero_grad(set_to_none=True)
            result.steps += 1
            if on_check is not None and step_in_epoch in check_after:
                set_eval_mode(opt, True)
                check_loss, _ = evaluate(model, task, task.val)
                set_eval_mode(opt, False)
                t0 = time.perf_counter()
                on_check(
                    epoch * checks_per_epoch + check_after[step_in_epoch] - 1,
                    check_loss,
                    3.0 * examples_trained + probe_examples,
                )
                callback_seconds += time.perf_counter() - t0
        set_eval_mode(opt, True)  # Schedule-Free evaluates at its averaged point
        val_loss, val_acc = evaluate(model, task, task.val)
        set_eval_mode(opt, False)
        best = min(best, val_loss)
        if controller is not None:  # the plateau guard: the epoch's validation loss, computed anyway
            controller.report_validation(val_loss)
        log = EpochLog(
            epoch,
            running / seen,
            val_loss,
            val_acc,
            step_lrs if scheduler is not None else _step_lrs(opt, controller),
            3.0 * examples_trained + probe_examples,
            step_effective if scheduler is not None else _effective_lrs(opt, controller),
            result.steps,
            names,
            None if controller is None else len(controller.plateau_cuts),
        )
        result.epochs.append(log)
        if on_epoch is not None:
            t0 = time.perf_counter()
            on_epoch(log)
            callback_seconds += time.perf_counter() - t0

    result.final_val_loss, result.final_val_acc = result.epochs[-1].val_loss, result.epochs[-1].val_acc
    result.best_val_loss = best
    set_eval_mode(opt, True)
    result.test_loss, result.test_acc = evaluate(model, task, task.test)
    result.compute = 3.0 * examples_trained + probe_examples
    result.probe_compute = float(probe_examples)
    result.trainable_fraction = _trainable_fraction(model)
    diagnostics = controller.diagnostic_seconds if controller is not None else 0.0
    result.wall_seconds = time.perf_counter() - start - callback_seconds - diagnostics
    return result


def _step_lrs(opt: torch.optim.Optimizer, controller: HiDLR | None) -> list[float]:
    """The rates the last step used: Hi-DLR's (the scheduled lr times its multipliers) or the groups' own."""
    return controller.lrs() if controller is not None else [float(g["lr"]) for g in opt.param_groups]


def _effective_lrs(opt: torch.optim.Optimizer, controller: HiDLR | None) -> list[float]:
    """Per group, the rate the last step used times its optimizer's own scale (see _rate_scale)."""
    return [lr * _rate_scale(g) for lr, g in zip(_step_lrs(opt, controller), opt.param_groups, strict=True)]


def _rate_scale(group: dict[str, Any]) -> float:
    """What multiplies a group's lr in its step: SAGE's mean sensitivity multiplier, or the distance estimate d
    of Prodigy and D-Adaptation (their lr is a multiplier of d); 1 for the others."""
    return float(group.get("mean_scale", 1.0)) * float(group.get("d", 1.0))


def _check_probe_options(
    task: Task, hidlr: dict[str, Any] | None, probe: str, probe_batch_size: int | None, hidlr_class: type
) -> None:
    """train()'s probe options, before anything is built."""
    if hidlr is None and (probe_batch_size is not None or hidlr_class is not HiDLR):
        raise ValueError("probe_batch_size and hidlr_class shape a Hi-DLR run: pass hidlr={...} too")
    if probe_batch_size is None:
        return
    if isinstance(probe_batch_size, bool) or not isinstance(probe_batch_size, int) or probe_batch_size < 1:
        raise ValueError(f"probe_batch_size must be None or an int >= 1, got {probe_batch_size!r}")
    if probe != "heldout":
        raise ValueError(
            "probe_batch_size sets the held-out probe batch; with probe='train' the probe is the batch trained on"
        )
    if probe_batch_size > len(task.val):
        warnings.warn(
            f"probe_batch_size={probe_batch_size} is larger than the validation split ({len(task.val)} examples): "
            "each probe batch is the whole split",
            UserWarning,
            stacklevel=3,
        )


def _random_batch(split: Split, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(split), generator=gen)[:batch_size].to(split.x.device)
    return split.x[idx], split.y[idx]
