"""Comparison tables and plots from a finished (or partly finished) study.

For every method and seed, the *selected* trial is the one with the lowest final validation loss (for a
single-run method, its only trial) and the method's *compute* is the sum over all its trials: a grid search
pays for every grid point. Means and standard deviations are over seeds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from .config import (  # noqa: E402
    FixedMethod,
    GridMethod,
    GroupGridMethod,
    HiDLRMethod,
    MethodConfig,
    StudyConfig,
)
from .study import optuna_study_name  # noqa: E402

__all__ = ["MethodSummary", "collect", "write_report"]


@dataclass
class MethodSummary:
    name: str
    kind: str
    selected: list[FrozenTrial] = field(default_factory=list)  # one per seed
    compute: list[float] = field(default_factory=list)  # per seed, all trials
    wall: list[float] = field(default_factory=list)  # per seed, all trials
    trials_per_seed: list[int] = field(default_factory=list)
    searches: list[list[FrozenTrial]] = field(default_factory=list)  # per seed, in trial order

    def metric(self, key: str) -> list[float]:
        values = [t.value if key == "final_val_loss" else t.user_attrs.get(key) for t in self.selected]
        return [math.nan if v is None else float(v) for v in values]  # None: not finite, or not applicable


def describe(method: MethodConfig) -> str:
    """A short description of a method's configuration for the table."""
    if isinstance(method, HiDLRMethod):
        groups = "one group (GeN)" if method.grouping == "single" else "task groups"
        return f"Hi-DLR {method.mode}, {groups}, from lr={method.lr:g}, probe {method.probe}"
    if isinstance(method, FixedMethod):
        return f"fixed lr={method.lr:g}"
    if isinstance(method, GridMethod):
        return f"uniform lr grid, {len(method.lrs)} values {min(method.lrs):g}..{max(method.lrs):g}"
    if isinstance(method, GroupGridMethod):
        return f"per-group lr grid, {len(method.lrs)} values per group"
    return f"TPE over uniform lr in [{method.low:g}, {method.high:g}]"


def collect(cfg: StudyConfig, storage: str | None = None) -> list[MethodSummary]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage or cfg.storage
    summaries = []
    for method in cfg.methods:
        summary = MethodSummary(method.name, method.kind)
        for seed in cfg.seeds:
            try:
                study = optuna.load_study(study_name=optuna_study_name(cfg, method, seed), storage=storage)
            except KeyError:
                continue  # not run yet
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not done:
                continue
            summary.selected.append(min(done, key=lambda t: (t.value, t.number)))
            summary.compute.append(sum(t.user_attrs.get("compute", 0.0) for t in done))
            summary.wall.append(sum(t.user_attrs.get("wall_seconds", 0.0) for t in done))
            summary.trials_per_seed.append(len(done))
            summary.searches.append(sorted(done, key=lambda t: t.number))
        summaries.append(summary)
    return summaries


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_std(values: list[float], digits: int = 4) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    if len(finite) < len(values):
        return f"not finite in {len(values) - len(finite)}/{len(values)}"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def write_report(cfg: StudyConfig, out_dir: str | Path | None = None, storage: str | None = None) -> Path:
    """Write ``report.md`` and the plots into ``out_dir`` (default: the study's ``results_dir``)."""
    out = Path(out_dir or cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [s for s in collect(cfg, storage) if s.selected]
    if not summaries:
        raise ValueError(f"study {cfg.name!r} has no finished trial in {storage or cfg.storage}; run it first")
    grids = [s for s in summaries if s.kind == "grid"]
    grid = min(grids, key=lambda s: statistics.mean(s.metric("final_val_loss"))) if grids else None
    grid_compute = statistics.mean(grid.compute) if grid else None

    lines = [
        f"# Study `{cfg.name}`: task `{cfg.task.name}`",
        "",
        f"Budget: {cfg.budget.epochs} epochs, batch {cfg.budget.batch_size}. Seeds: {cfg.seeds} "
        "(mean +- std over seeds). Selection: lowest final validation loss; the test split is only reported.  ",
        "Compute: forward-equivalents per example (training step 3, probe forward 1), summed over all of a "
        "method's trials for one seed.",
        "",
        "| method | configuration | trials/seed | final val loss | best-epoch val loss | test loss | test acc "
        "| compute/seed | vs grid compute | wall s/seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        compute = statistics.mean(s.compute)
        ratio = f"{compute / grid_compute:.2f}" if grid_compute else "-"
        cells = [
            s.name,
            describe(next(m for m in cfg.methods if m.name == s.name)),
            f"{statistics.mean(s.trials_per_seed):.0f}",
            _mean_std(s.metric("final_val_loss")),
            _mean_std(s.metric("best_val_loss")),
            _mean_std(s.metric("test_loss")),
            _mean_std(s.metric("test_acc"), 3),
            f"{compute / 1e3:,.0f}k",
            ratio,
            f"{statistics.mean(s.wall):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for g in [s for s in summaries if s.kind in ("grid", "group-grid")]:
        target, target_sd = statistics.mean(g.metric("final_val_loss")), _sd(g.metric("final_val_loss"))
        g_compute = statistics.mean(g.compute)
        lines += [
            f"Against `{g.name}` ({g.kind}, final validation loss {target:.4f} +- {target_sd:.4f}, "
            f"{g_compute / 1e3:,.0f}k forward-equivalents per seed):",
            "",
        ]
        for s in summaries:
            if s.kind != "hidlr":
                continue
            mean, sd = statistics.mean(s.metric("final_val_loss")), _sd(s.metric("final_val_loss"))
            if mean <= target:
                verdict = "reached it"
            elif mean - target <= max(sd, target_sd):
                verdict = f"did not reach it ({(mean / target - 1) * 100:+.0f}%, within one seed standard deviation)"
            else:
                verdict = f"did not reach it ({(mean / target - 1) * 100:+.0f}%)"
            lines.append(
                f"- `{s.name}` {verdict}: {mean:.4f} +- {sd:.4f} at "
                f"{statistics.mean(s.compute) / g_compute:.0%} of its compute."
            )
        lines.append("")
    lines += ["![validation loss against compute](val_loss_vs_compute.png)", ""]
    _plot_loss_vs_compute(summaries, out / "val_loss_vs_compute.png")
    for s in summaries:
        if s.kind == "hidlr" and s.selected[0].user_attrs.get("refits"):
            name = f"lrs_{s.name}.png"
            _plot_lrs(s, out / name)
            lines += [f"![group learning rates of {s.name}]({name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _plot_loss_vs_compute(summaries: list[MethodSummary], path: Path) -> None:
    """Single runs: validation loss per epoch. Searches: best final loss so far after each trial."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        search = s.searches[0]  # first seed
        if len(search) == 1:
            curve = search[0].user_attrs.get("curve", {})
            ax.plot(curve.get("compute", []), curve.get("val_loss", []), label=s.name)
        else:
            spent, best, xs, ys = 0.0, math.inf, [], []
            for t in search:
                spent += t.user_attrs.get("compute", 0.0)
                best = min(best, t.value if t.value is not None else math.inf)
                xs.append(spent)
                ys.append(best if math.isfinite(best) else None)
            ax.plot(xs, ys, marker="o", drawstyle="steps-post", label=f"{s.name} (best so far)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute (forward-equivalents per example)")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss against compute (first seed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_lrs(summary: MethodSummary, path: Path) -> None:
    refits = summary.selected[0].user_attrs["refits"]
    fig, ax = plt.subplots(figsize=(7, 4))
    lrs = list(zip(*refits["lrs"], strict=True))
    for name, series in zip(refits["group_names"], lrs, strict=True):
        ax.plot(refits["step"], series, label=f"group {name}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{summary.name}: group learning rates at each refit (first seed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
