"""Print the cross-task baselines table of docs/results/README.md from the finished studies.

    python studies/summary.py [--storage URL] studies/digits.toml studies/nam.toml studies/multitask.toml

Per task and method: final validation loss, mean +- std over the seeds, and the method's compute per seed as
a fraction of the plain AdamW grid search's.
"""

from __future__ import annotations

import argparse
import statistics

from hidlr_hpo.config import load_study_config
from hidlr_hpo.report import collect, reference_grid

METHODS = [
    "hidlr-diag", "hidlr-search", "gen-preset", "grid", "grid-cosine", "tpe", "tpe-pruned", "adamw-sage",
    "adamax-sage", "prodigy", "dadapt-adam", "schedulefree-adamw",
]  # fmt: skip


def main(paths: list[str], storage: str | None = None) -> None:
    configs = [load_study_config(p) for p in paths]
    print("| method | " + " | ".join(c.name for c in configs) + " |")
    print("|---|" + "---|" * len(configs))
    by_task = []
    for cfg in configs:
        summaries = {s.name: s for s in collect(cfg, storage) if s.selected}
        grid = reference_grid(cfg, list(summaries.values()))
        by_task.append((summaries, statistics.mean(grid.compute) if grid else None))
    for name in METHODS:
        cells = []
        for summaries, grid_compute in by_task:
            s = summaries.get(name)
            if s is None:
                cells.append("-")
                continue
            values = s.metric("final_val_loss")
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            fraction = f" ({statistics.mean(s.compute) / grid_compute:.0%})" if grid_compute else ""
            cells.append(f"{statistics.mean(values):.4f} +- {sd:.4f}{fraction}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="*", default=[f"studies/{t}.toml" for t in ("digits", "nam", "multitask")])
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: each study file's)")
    args = parser.parse_args()
    main(args.studies, args.storage)
