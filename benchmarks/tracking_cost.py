"""What MLflow tracking costs: one Hi-DLR training run on digits with tracking off and on, in one process.

    python benchmarks/tracking_cost.py [--repeats 3] [--epochs 30] [--tracking-uri sqlite:///...]

Runs alternate (off, on, off, on, ...) so that machine noise hits both alike; the figure is the median over
repeats. Reported: wall time per optimizer step with and without tracking and their ratio (the per-step
cost: per-epoch batched metrics, the refits' diagnostics and the realised-decrease forward), and separately
the once-per-trial cost (creating the child run, the config, the two plots, closing the run).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hidlr_hpo.plots import plt, trial_figures
from hidlr_hpo.tasks import get_task
from hidlr_hpo.tracking import Tracker
from hidlr_hpo.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--tracking-uri", default=None, help="default: a fresh SQLite file in a temp folder")
    parser.add_argument("--flush-seconds", type=float, default=5.0, help="0: send the metrics at every epoch")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier timings on a shared machine
    task = get_task("digits")
    hidlr = {"interval": 10, "mode": "diag", "horizon": True}
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.tracking_uri or f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        tracker = Tracker(uri)
        tracker.start_study("tracking-cost", {})
        train(task, lr=1e-3, epochs=1, hidlr=hidlr)  # warm-up: imports, allocator
        off, on, per_trial, in_mlflow = [], [], [], []
        steps = 0
        for r in range(args.repeats):
            result = train(task, lr=1e-3, epochs=args.epochs, seed=r, hidlr=hidlr)
            off.append(result.wall_seconds / result.steps)
            t0 = time.perf_counter()
            run = tracker.start_trial(method="hidlr", description="", seed=r, config={}, study="s", trial=r)
            run.flush_seconds = args.flush_seconds
            t1 = time.perf_counter()
            result = train(
                task,
                lr=1e-3,
                epochs=args.epochs,
                seed=r,
                hidlr={**hidlr, "measure_realised": True},
                on_epoch=run.epoch,
                on_refit=run.refit,
            )
            t2 = time.perf_counter()
            in_mlflow.append(run.log_seconds)  # during training only
            figures = trial_figures(result)
            run.finish(result.summary(), figures)
            for _, fig in figures:
                plt.close(fig)
            t3 = time.perf_counter()
            on.append(result.wall_seconds / result.steps)
            per_trial.append((t1 - t0) + (t3 - t2))
            steps = result.steps
        if tracker.failed:
            raise SystemExit(f"tracking failed: {tracker.failed}")
    off_s, on_s = statistics.median(off), statistics.median(on)
    print(
        f"digits MLP, Hi-DLR diag, {args.epochs} epochs ({steps} steps), {args.repeats} repeats, "
        f"{uri.split(':')[0]} store, flush every {args.flush_seconds:g} s"
    )
    print(f"per step, tracking off: {off_s * 1e3:.3f} ms")
    print(f"per step, tracking on:  {on_s * 1e3:.3f} ms  (ratio {on_s / off_s:.3f})")
    print(f"per step, of which in MLflow calls during training: {statistics.median(in_mlflow) / steps * 1e3:.3f} ms")
    print(f"per trial, once: {statistics.median(per_trial):.2f} s (child run, config, 2 plots, close)")


if __name__ == "__main__":
    main()
