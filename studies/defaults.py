"""How Hi-DLR's defaults were chosen: an 8-value AdamW grid against Hi-DLR variants (short-horizon remedies),
each started from the grid's best, a 10x smaller and a 10x larger learning rate.

    python studies/defaults.py --task digits --variants            # -> docs/results/defaults-digits.md
    python studies/defaults.py --task multitask --configs "..."    # named variants only

Selection is on the *final* validation loss (never on the test split); the test split is reported only.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from horizon_objectives import (
    AveragedFit,
    DiscountedAveragedFit,
    DiscountedTrajectory,
    NoiseGated,
)  # studies/, beside this script
from rich.progress import Progress

from hidlr_hpo import HiDLR
from hidlr_hpo.tasks import get_task
from hidlr_hpo.training import TrainResult, train

GRID = [10 ** (-4 + 0.5 * i) for i in range(8)]  # 1e-4 ... 3.16e-1


def mean_std(values: list[float]) -> str:
    if not all(math.isfinite(v) for v in values):
        return "-" if all(math.isnan(v) for v in values) else "not finite"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {sd:.4f}"


def row(label: str, runs: list[TrainResult]) -> str:
    return (
        f"| {label} | {mean_std([r.final_val_loss for r in runs])} | {mean_std([r.best_val_loss for r in runs])} "
        f"| {mean_std([r.test_loss for r in runs])} | {mean_std([r.test_acc for r in runs])} "
        f"| {statistics.mean(r.compute for r in runs) / 1e3:,.0f}k "
        f"| {statistics.mean(r.wall_seconds for r in runs):.1f} |"
    )


HEADER = (
    "| method | final val loss | best-epoch val loss | test loss | test acc | compute (fwd-eq./run) | wall s/run |\n"
    "|---|---|---|---|---|---|---|"
)


STARTS = (1e-4, 1e-3, 1e-2)  # 10x too small, the grid's best, 10x too large

# Each remedy of the short-horizon bias, added one at a time (HiDLR's own defaults underneath: diag, axial
# design, interval 10, trust ratio 2, smoothing 0.9 of every change, as GeN's).
# The variants below were measured on HiDLR's defaults before 2026-12-02 (no fast climb, no plateau guard);
# GEN_LIKE pins those, so that each label keeps its meaning.
BEFORE_PLATEAU = dict(believable_ratio=None, plateau_factor=None)
GEN_LIKE = dict(BEFORE_PLATEAU, smooth_decreases=True)  # GeN's smoothing of every change (HiDLR's default)
FAST_DOWN = dict(BEFORE_PLATEAU, smooth_decreases=False)  # smooth only increases
NEW_DEFAULT = "held-out probe + horizon (defaults since 2026-12-02)"
# The plateau guard's settings measured: cut by `plateau_factor` when the epoch's validation loss is more than
# `plateau_threshold` above the best since the last cut, on more than `plateau_patience` reports in a row, or
# at once when it is more than `plateau_jump` above it.
PLATEAU = {
    "at the first rise": dict(plateau_factor=0.5, plateau_threshold=0.02, plateau_patience=0, plateau_jump=None),
    "on two rises in a row": dict(plateau_factor=0.5, plateau_threshold=0.02, plateau_patience=1, plateau_jump=None),
    "on two rises in a row or one above 20%": dict(
        plateau_factor=0.5, plateau_threshold=0.02, plateau_patience=1, plateau_jump=0.2
    ),
}
VARIANTS: dict[str, dict] = {
    "no trust region, no smoothing": dict(probe="train", hidlr=dict(BEFORE_PLATEAU, trust_ratio=None, smoothing=0.0)),
    "GeN-like: train probe, smoothing of every change": dict(probe="train", hidlr=dict(GEN_LIKE)),
    "+ bias-corrected smoothing": dict(probe="train", hidlr=dict(GEN_LIKE, smoothing_bias_correction=True)),
    "+ log-space smoothing": dict(probe="train", hidlr=dict(GEN_LIKE, log_smoothing=True)),
    "+ held-out probe": dict(probe="heldout", hidlr=dict(GEN_LIKE)),
    "+ held-out probe + horizon": dict(probe="heldout", hidlr=dict(GEN_LIKE, horizon=True)),
    "+ held-out probe + horizon, interval 25": dict(probe="heldout", hidlr=dict(GEN_LIKE, horizon=True, interval=25)),
    "train probe, smoothing of increases only": dict(probe="train", hidlr=dict(FAST_DOWN)),
    "held-out probe, smoothing of increases only": dict(probe="heldout", hidlr=dict(FAST_DOWN)),
    "held-out probe, smoothing of increases only, + horizon": dict(
        probe="heldout", hidlr=dict(FAST_DOWN, horizon=True)
    ),
    "held-out probe, smoothing of increases only, + horizon, halve on non-descent": dict(
        probe="heldout", hidlr=dict(FAST_DOWN, horizon=True, nondescent_shrink=0.5)
    ),
    # Schedule-aware fitting: a torch LR schedule gives the shape over the run, Hi-DLR fits a multiplier per group
    # on top of it (the group's rate is the scheduled lr times its multiplier; docs/method.md).
    "held-out probe, cosine schedule x fitted multipliers": dict(
        probe="heldout", schedule="cosine", hidlr=dict(GEN_LIKE)
    ),
    "held-out probe, 5% warm-up + cosine x fitted multipliers": dict(
        probe="heldout", schedule="cosine", warmup=0.05, hidlr=dict(GEN_LIKE)
    ),
    "held-out probe, linear decay x fitted multipliers": dict(probe="heldout", schedule="linear", hidlr=dict(GEN_LIKE)),
    "held-out probe, linear decay x fitted multipliers, bias-corrected smoothing": dict(
        probe="heldout", schedule="linear", hidlr=dict(GEN_LIKE, smoothing_bias_correction=True)
    ),
    "+ held-out probe + horizon, bias-corrected smoothing": dict(
        probe="heldout", hidlr=dict(GEN_LIKE, horizon=True, smoothing_bias_correction=True)
    ),
    # Tune-then-follow: refit in an early phase only, then keep the fitted multipliers under the horizon.
    "+ held-out probe + horizon, refits in the first 25%": dict(
        probe="heldout", hidlr=dict(GEN_LIKE, horizon=True, refit_until=0.25)
    ),
    "+ held-out probe + horizon, refits in the first 50%": dict(
        probe="heldout", hidlr=dict(GEN_LIKE, horizon=True, refit_until=0.5)
    ),
    # Fewer refits (issue 11 section 5): HiDLR's default lets the gap between refits double while the rates are
    # settled and halve while one trends, between interval and 4 * interval; the smoothing is scaled to the gap.
    "+ held-out probe + horizon, fixed interval 10": dict(
        probe="heldout", hidlr=dict(GEN_LIKE, horizon=True, max_interval=None)
    ),
    "+ held-out probe + horizon, adaptive interval 10-80": dict(
        probe="heldout", hidlr=dict(GEN_LIKE, horizon=True, max_interval=80)
    ),
    # Take a proposal within 4x (or 8x) of the current rate unsmoothed: near the probed range the model
    # interpolates; far beyond it (the 10-60x of digits) it extrapolates a nearly linear fit (experimental).
    "+ held-out probe + horizon, proposals within 4x unsmoothed": dict(
        probe="heldout", hidlr=dict(GEN_LIKE, horizon=True, believable_ratio=4.0)
    ),
    "+ held-out probe + horizon, proposals within 8x unsmoothed": dict(
        probe="heldout", hidlr=dict(GEN_LIKE, horizon=True, believable_ratio=8.0)
    ),
    # The known-linear-term lever: b from the training gradient, K + 1 probes on the training batch.
    "train probe, gradient slope (K + 1 probes), + horizon": dict(
        probe="train", hidlr=dict(GEN_LIKE, horizon=True, slope="gradient")
    ),
    # The plateau guard (HiDLR.report_validation, called by train() with each epoch's validation loss): when
    # the validation loss rises above the best since the last cut, the multipliers are cut and capped. Alone,
    # and as the brake of a fast climb (bias-corrected smoothing, or proposals within 4x taken unsmoothed).
    **{
        f"+ held-out probe + horizon, {climb}plateau guard ({guard})": dict(
            probe="heldout", hidlr=dict(GEN_LIKE, horizon=True, **fast, **PLATEAU[guard])
        )
        for climb, fast in (
            ("", {}),
            ("bias-corrected smoothing, ", dict(smoothing_bias_correction=True)),
            ("within 4x unsmoothed, ", dict(believable_ratio=4.0)),
        )
        for guard in PLATEAU
    },
    # Fewer refits on the defaults since 2026-12-02 (issue 11 section 5: the overhead bar): stop refitting
    # earlier (the plateau guard still cuts after), or let the gap grow further.
    **{
        f"defaults, refits in the first {int(until * 100)}%": dict(
            probe="heldout", hidlr=dict(horizon=True, refit_until=until)
        )
        for until in (0.5, 0.7)
    },
    "defaults, gap 10-80": dict(probe="heldout", hidlr=dict(horizon=True, max_interval=80)),
    "defaults, gap 20-80": dict(probe="heldout", hidlr=dict(horizon=True, interval=20, max_interval=80)),
    # The plateau guard's jump threshold: a rise above it cuts at once (wide_deep's seed 1 needed 10%).
    **{
        f"defaults, plateau jump {jump:g}": dict(probe="heldout", hidlr=dict(horizon=True, plateau_jump=jump))
        for jump in (0.1, 0.15)
    },
    # Issue 11 section 2, the directions not measured before: a longer-horizon objective (MARTHE's discounted
    # trajectory, first order) and noise-aware fits ((b, A) averaged over refits; the probe batch's size).
    # The subclasses are in studies/horizon_objectives.py.
    **{
        f"defaults, discounted trajectory mu={mu:g}": dict(
            probe="heldout", hidlr=dict(horizon=True, discount=mu), cls=DiscountedTrajectory
        )
        for mu in (0.5, 0.9)
    },
    **{
        f"defaults, (b, A) averaged s={s:g}, rates unsmoothed": dict(
            probe="heldout", hidlr=dict(horizon=True, fit_smoothing=s), cls=AveragedFit
        )
        for s in (0.5, 0.8)
    },
    **{  # the same averages under the default rate safeguards (smoothing 0.9 beyond 4x, as the defaults)
        f"defaults, (b, A) averaged s={s:g}": dict(
            probe="heldout", hidlr=dict(horizon=True, fit_smoothing=s, smoothing=0.9), cls=AveragedFit
        )
        for s in (0.5, 0.8)
    },
    # The control for the rows above: the rates unsmoothed, each refit's own fit.
    "defaults, rates unsmoothed": dict(probe="heldout", hidlr=dict(horizon=True, smoothing=0.0)),
    "defaults, discounted trajectory mu=0.9, (b, A) averaged s=0.8, rates unsmoothed": dict(
        probe="heldout", hidlr=dict(horizon=True, discount=0.9, fit_smoothing=0.8), cls=DiscountedAveragedFit
    ),
    "defaults, probe batch 128 in two halves, changes within the noise kept": dict(
        probe="heldout", hidlr=dict(horizon=True, gate_z=1.0), cls=NoiseGated, probe_batch_size=128
    ),
    **{
        f"defaults, probe batch {size}": dict(probe="heldout", hidlr=dict(horizon=True), probe_batch_size=size)
        for size in (16, 128, 256)
    },
    # HiDLR's defaults since 2026-12-02: the last of the rows above.
    NEW_DEFAULT: dict(probe="heldout", hidlr=dict(horizon=True)),
}
# The defaults: chosen on the mean over three starts of the final validation loss relative to the grid's
# best, on digits (this study) and the multi-task study together; see docs/method.md.
CHOSEN = NEW_DEFAULT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--out", type=Path, default=None, help="default: docs/results/defaults-<task>.md")
    parser.add_argument("--configs", nargs="*", default=None, help="run only these variants (their labels)")
    parser.add_argument(
        "--variants", action="store_true", help="sweep the short-horizon remedies, not only the chosen defaults"
    )
    parser.add_argument(
        "--cosine-grid", action="store_true", help="also the 8-value grid over a cosine schedule's peak"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    task = get_task(args.task)
    seeds = list(range(args.seeds))
    started = time.perf_counter()

    configs = VARIANTS if args.variants else {CHOSEN: VARIANTS[CHOSEN]}
    if args.configs:
        unknown = [c for c in args.configs if c not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        configs = {c: VARIANTS[c] for c in dict.fromkeys([*args.configs, CHOSEN])}
    out = args.out or Path(f"docs/results/defaults-{args.task}.md")
    jobs = ((1 + args.cosine_grid) * len(GRID) + len(configs) * len(STARTS)) * len(seeds)
    grid: dict[float, list[TrainResult]] = {}
    cosine_grid: dict[float, list[TrainResult]] = {}
    swept: dict[str, dict[float, list[TrainResult]]] = {}
    with Progress() as progress:
        bar = progress.add_task("runs", total=jobs)
        for lr in GRID:
            grid[lr] = [train(task, lr=lr, epochs=args.epochs, seed=s) for s in seeds]
            progress.advance(bar, len(seeds))
        for lr in GRID if args.cosine_grid else ():
            cosine_grid[lr] = [train(task, lr=lr, epochs=args.epochs, seed=s, schedule="cosine") for s in seeds]
            progress.advance(bar, len(seeds))
        for label, spec in configs.items():
            schedule = {"schedule": spec.get("schedule", "constant"), "warmup": spec.get("warmup", 0.0)}
            swept[label] = {
                lr: [
                    train(
                        task,
                        lr=lr,
                        epochs=args.epochs,
                        seed=s,
                        hidlr=spec["hidlr"],
                        probe=spec["probe"],
                        hidlr_class=spec.get("cls", HiDLR),
                        probe_batch_size=spec.get("probe_batch_size"),
                        **schedule,
                    )
                    for s in seeds
                ]
                for lr in STARTS
            }
            progress.advance(bar, len(seeds) * len(STARTS))

    best_lr = min(grid, key=lambda lr: statistics.mean(r.final_val_loss for r in grid[lr]))
    grid_compute = sum(r.compute for runs in grid.values() for r in runs) / len(seeds)
    chosen = CHOSEN
    command = " ".join(
        ["python studies/defaults.py", f"--task {args.task}", f"--seeds {args.seeds}"]
        + (["--variants"] if args.variants else [])
        + (["--cosine-grid"] if args.cosine_grid else [])
        + ([f"--configs {' '.join(repr(c) for c in args.configs)}"] if args.configs else [])
        + ([f"--out {args.out}"] if args.out else [])
    )
    lines = [
        f"# Hi-DLR's defaults on {args.task}: variants against an 8-value AdamW grid",
        "",
        f"Command: `{command}`  ",
        f"Task: {args.task} ({len(task.train)} train / {len(task.val)} val / {len(task.test)} test, fixed split), "
        f"AdamW, batch 64, {args.epochs} epochs. Seeds {seeds} (model init and batch order); "
        "mean +- std over seeds. Selection on the final validation loss; the test split is only reported.  ",
        "Compute: forward-equivalents per example (training step 3, probe forward 1), per run.  ",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, 1 thread; total wall time "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "## AdamW learning-rate grid (fixed lr)",
        "",
        HEADER,
        *(row(f"AdamW lr={lr:.2e}" + (" **(best)**" if lr == best_lr else ""), runs) for lr, runs in grid.items()),
        "",
        f"The whole grid costs {grid_compute / 1e3:,.0f}k forward-equivalents per seed.",
        "",
    ]
    if cosine_grid:
        best_cos = min(cosine_grid, key=lambda lr: statistics.mean(r.final_val_loss for r in cosine_grid[lr]))
        lines += [
            "## AdamW grid over the peak of a cosine schedule",
            "",
            HEADER,
            *(
                row(f"AdamW cosine, peak {lr:.2e}" + (" **(best)**" if lr == best_cos else ""), runs)
                for lr, runs in cosine_grid.items()
            ),
            "",
        ]
    if len(swept) > 1:
        lines += [
            "## Short-horizon remedies: final validation loss from each starting rate",
            "",
            "Hi-DLR diag, axial design, refit gap 10-40 steps (adaptive), trust ratio 2, smoothing 0.9 unless the "
            "row says otherwise (pages made before 2026-12-02's adaptive gap had a fixed interval 10). "
            "The defaults are chosen on these rows and the same comparison on the multi-task study "
            "(docs/method.md); validation loss only.",
            "",
            "| configuration | from 1e-4 | from 1e-3 | from 1e-2 | mean over starts | refits/run | compute/run |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, by_start in swept.items():
            cells = [mean_std([r.final_val_loss for r in by_start[lr]]) for lr in STARTS]
            every = [r for runs in by_start.values() for r in runs]
            overall = statistics.mean(r.final_val_loss for r in every)
            refits = statistics.mean(r.hidlr.n_refits for r in every)
            compute = statistics.mean(r.compute for r in every)
            lines.append(
                f"| {label}{' **(default)**' if label == chosen else ''} | {' | '.join(cells)} | {overall:.4f} "
                f"| {refits:.1f} | {compute / 1e3:,.0f}k |"
            )
        lines.append("")
    lines += [
        "## Hi-DLR defaults from good and poor starting rates",
        "",
        f"Defaults: diag, axial design, refit gap 10-40 steps (adaptive), trust ratio 2, smoothing 0.9; {chosen}.",
        "",
        HEADER,
        row(f"grid best: AdamW lr={best_lr:.2e}", grid[best_lr]),
        *([row(f"cosine grid best: peak {best_cos:.2e}", cosine_grid[best_cos])] if cosine_grid else []),
        *(row(f"Hi-DLR from lr={lr:.0e}", runs) for lr, runs in swept[chosen].items()),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
