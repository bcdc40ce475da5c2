"""Comparison tables and plots from a finished (or partly finished) study.

For every method and seed, the *selected* trial is the one with the lowest final validation loss (for a
single-run method, its only trial) and the method's *compute* is the sum over all its trials: a grid search
pays for every grid point. Means and standard deviations are over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
from scipy import stats

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from . import trial_queue  # noqa: E402
from .config import MethodConfig, StudyConfig, describe_method  # noqa: E402
from .storage import storage_file  # noqa: E402
from .study import check_budgets, in_study_file, optuna_study_name  # noqa: E402

__all__ = ["MethodSummary", "collect", "paired_verdict", "write_report"]


@dataclass
class MethodSummary:
    name: str
    kind: str
    selected: list[FrozenTrial] = field(default_factory=list)  # one per seed
    compute: list[float] = field(default_factory=list)  # per seed, all trials
    wall: list[float] = field(default_factory=list)  # per seed, all trials
    trials_per_seed: list[int] = field(default_factory=list)  # complete and pruned
    pruned_per_seed: list[int] = field(default_factory=list)
    searches: list[list[FrozenTrial]] = field(default_factory=list)  # per seed, in trial order
    seeds: list[int] = field(default_factory=list)  # the seed of each entry above

    def metric(self, key: str) -> list[float]:
        values = [t.value if key == "final_val_loss" else t.user_attrs.get(key) for t in self.selected]
        return [math.nan if v is None else float(v) for v in values]  # None: not finite, or not applicable


def reference_grid(cfg: StudyConfig, summaries: list[MethodSummary]) -> MethodSummary | None:
    """The plain grid search every method's compute is measured against: the first uniform-lr grid of AdamW
    at a constant rate (the method users replace); without one, the best grid."""
    grids = [s for s in summaries if s.kind == "grid"]
    for s in grids:
        m = _config(cfg, s.name)
        if m.optimizer == "adamw" and m.schedule == "constant" and not m.warmup:
            return s
    return min(grids, key=lambda s: statistics.mean(s.metric("final_val_loss"))) if grids else None


def _config(cfg: StudyConfig, name: str) -> MethodConfig:
    return next(m for m in cfg.methods if m.name == name)


def collect(cfg: StudyConfig, storage: str | None = None) -> list[MethodSummary]:
    """Per method, each seed's selected trial and what its trials spent: only trials made under the study
    file's task, budget and settings (a ValueError names a study run with others), and of those only the
    file's grid values and a search's first ``n_trials`` steps."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage or cfg.storage
    check_budgets(cfg, storage)
    storage_obj = trial_queue.open_storage(storage)
    summaries = []
    for method in cfg.methods:
        summary = MethodSummary(method.name, method.kind)
        for seed in cfg.seeds:
            try:
                study = optuna.load_study(study_name=optuna_study_name(cfg, method, seed), storage=storage_obj)
            except KeyError:
                continue  # not run yet
            # A pruned trial is not selectable, but what it spent up to the pruning counts.
            spent = in_study_file(method, study.get_trials(deepcopy=False), cfg)
            done = [t for t in spent if t.state == TrialState.COMPLETE]
            if not done:
                continue
            summary.selected.append(min(done, key=lambda t: (t.value, t.number)))
            summary.compute.append(sum(t.user_attrs.get("compute", 0.0) for t in spent))
            summary.wall.append(sum(t.user_attrs.get("wall_seconds", 0.0) for t in spent))
            summary.trials_per_seed.append(len(spent))
            summary.pruned_per_seed.append(len(spent) - len(done))
            summary.searches.append(sorted(spent, key=lambda t: t.number))
            summary.seeds.append(seed)
        summaries.append(summary)
    return summaries


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: list[float], digits: int = 4) -> str:
    """'mean +- std' over seeds, or why there is none (no value, or some not finite)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    if len(finite) < len(values):
        return f"not finite in {len(values) - len(finite)}/{len(values)}"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def write_report(cfg: StudyConfig, out_dir: str | Path | None = None, storage: str | None = None) -> Path:
    """Write ``report.md`` and the plots into ``out_dir`` (default: the study's ``results_dir``)."""
    url = storage or cfg.storage
    database = storage_file(url)
    if database is not None and not database.exists():  # opening it would create an empty one
        raise ValueError(f"study {cfg.name!r}: there is no database {str(database)!r} ({url}); run it first")
    summaries = [s for s in collect(cfg, storage) if s.selected]
    if not summaries:
        raise ValueError(f"study {cfg.name!r} has no finished trial in {url}; run it first")
    out = Path(out_dir or cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    grid = reference_grid(cfg, summaries)
    grid_compute = statistics.mean(grid.compute) if grid else None

    lines = [
        f"# Study `{cfg.name}`: task `{cfg.task.name}`",
        "",
        f"Budget: {cfg.budget.epochs} epochs, batch {cfg.budget.batch_size}. Seeds: {cfg.seeds} "
        "(mean +- std over seeds). Selection: lowest final validation loss; the test split is only reported.  ",
        "Compute: forward-equivalents per example (training step 3, probe forward 1), summed over all of a "
        "method's trials for one seed" + (f"; 'vs grid compute' divides by `{grid.name}`'s." if grid else ".") + "  ",
        _numerics(summaries),
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
            describe_method(_config(cfg, s.name)),
            f"{statistics.mean(s.trials_per_seed):.0f}"
            + (f" ({statistics.mean(s.pruned_per_seed):.0f} pruned)" if any(s.pruned_per_seed) else ""),
            mean_std(s.metric("final_val_loss")),
            mean_std(s.metric("best_val_loss")),
            mean_std(s.metric("test_loss")),
            mean_std(s.metric("test_acc"), 3),
            f"{compute / 1e3:,.0f}k",
            ratio,
            f"{statistics.mean(s.wall):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _paired_section(summaries)
    lines += _sage_section(cfg, summaries, out)
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


# The trials' user attributes that their numbers depend on beyond the study file (see study.py), with how one
# value and several values are named.
_NUMERICS = {
    "torch_threads": (lambda v: f"{v} intra-op threads", "thread counts"),
    "cpu_capability": (lambda v: f"CPU kernels {v}", "CPU kernels"),
    "torch_version": (lambda v: f"torch {v}", "torch versions"),
}


def _numerics(summaries: list[MethodSummary]) -> str:
    """What the trials ran with: another thread count or vector width changes the low bits of every result."""
    trials = [t for s in summaries for search in s.searches for t in search]
    parts, mixed = [], False
    for key, (one, several) in _NUMERICS.items():
        counts = Counter(t.user_attrs.get(key) for t in trials)
        if len(counts) > 1:
            mixed = True
            spread = ", ".join(
                f"{'not recorded' if v is None else v} ({n} trial{'s' if n > 1 else ''})"
                for v, n in sorted(counts.items(), key=lambda vn: (-vn[1], str(vn[0])))
            )
            parts.append(f"different {several}: {spread}")
        else:
            (value,) = counts
            parts.append(one(value) if value is not None else f"{several} not recorded")
    if mixed:
        return (
            f"Numerics: the trials ran with {'; '.join(parts)}. "
            "**Numbers from different settings are not comparable bit for bit.**"
        )
    return (
        f"Numerics: {'; '.join(parts)} (all {len(trials)} trials). Another thread count or CPU changes the low "
        "bits, which methods that amplify round-off (Prodigy, D-Adaptation, GeN's preset) make visible."
    )


# The methods under test, and the searches they are judged against.
_CANDIDATES = ("hidlr", "hidlr-search")
_REFERENCES = ("grid", "group-grid", "tpe")


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of the per-seed differences a_i - b_i and its two-sided t-interval: (mean, low, high).

    Example:
        >>> mean, low, high = paired_difference([1.0, 2.0, 3.0], [1.5, 2.4, 3.6])
        >>> round(mean, 4), round(low, 4), round(high, 4)
        (-0.5, -0.7484, -0.2516)
    """
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.mean(d)
    if len(d) < 2:
        return mean, -math.inf, math.inf  # one seed: no interval, so never a win or a loss
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * statistics.stdev(d) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def _common_seeds(candidate: MethodSummary, reference: MethodSummary) -> list[int]:
    return [seed for seed in candidate.seeds if seed in reference.seeds]


def paired_verdict(candidate: MethodSummary, reference: MethodSummary, key: str) -> str:
    """'better' / 'worse' only when the paired 95% interval excludes 0; else 'tie'. A run that diverged (a
    non-finite loss) loses its seed: 'worse' when only the method diverged there, 'better' when only the search
    did; the interval is then over the other seeds."""
    seeds = _common_seeds(candidate, reference)
    a = [candidate.metric(key)[candidate.seeds.index(seed)] for seed in seeds]
    b = [reference.metric(key)[reference.seeds.index(seed)] for seed in seeds]
    if not seeds:
        return "-"
    lost = [s for s, x, y in zip(seeds, a, b, strict=True) if not math.isfinite(x) and math.isfinite(y)]
    won = [s for s, x, y in zip(seeds, a, b, strict=True) if math.isfinite(x) and not math.isfinite(y)]
    finite = [(x, y) for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if lost and not won:
        return f"**worse** (diverged on seed {', '.join(map(str, lost))})"
    if won and not lost:
        return f"**better** (the search diverged on seed {', '.join(map(str, won))})"
    if len(finite) < 2:
        return f"tie (n = {len(finite)}: no interval)"
    return interval_verdict([x for x, _ in finite], [y for _, y in finite])


def interval_verdict(a: list[float], b: list[float]) -> str:
    """The paired verdict of seed-matched values a - b: 'better' / 'worse' only when the 95% interval excludes 0."""
    mean, low, high = paired_difference(a, b)
    word = "**better**" if high < 0 else "**worse**" if low > 0 else "tie"
    return f"{word} {mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def _paired_section(summaries: list[MethodSummary]) -> list[str]:
    candidates = [s for s in summaries if s.kind in _CANDIDATES]
    references = [s for s in summaries if s.kind in _REFERENCES]
    if not candidates or not references:
        return []
    lines = [
        "## Paired comparisons over seeds",
        "",
        "Each cell: the method's loss minus the search's, seed by seed (the selected configuration of each), "
        "mean and 95% t-interval over the seeds. **better** or **worse** only when the interval excludes 0; "
        "otherwise a tie. Then the method's compute as a fraction of the search's.",
        "",
    ]
    for key, label in (("final_val_loss", "final validation loss"), ("test_loss", "test loss")):
        lines += [
            f"{label[0].upper()}{label[1:]}:",
            "",
            "| method | " + " | ".join(f"vs `{r.name}`" for r in references) + " |",
            "|---|" + "---|" * len(references),
        ]
        for c in candidates:
            cells = []
            for r in references:
                cell = paired_verdict(c, r, key)
                if key == "final_val_loss":
                    seeds = _common_seeds(c, r)  # the same seeds as the interval
                    spent = [c.compute[c.seeds.index(s)] / r.compute[r.seeds.index(s)] for s in seeds]
                    cell += f", {statistics.mean(spent):.0%} compute, n = {len(seeds)}" if seeds else ""
                cells.append(cell)
            lines.append(f"| `{c.name}` | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _plot_loss_vs_compute(summaries: list[MethodSummary], path: Path) -> None:
    """Single runs: validation loss per epoch. Searches: best final loss so far after each trial."""
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # up to 20 methods, each its own colour
    for s in summaries:
        search = s.searches[0]  # first seed
        if len(search) == 1:
            curve = search[0].user_attrs.get("curve", {})
            ax.plot(curve.get("compute", []), curve.get("val_loss", []), label=s.name)
        else:
            spent, best, xs, ys = 0.0, math.inf, [], []
            for t in search:
                spent += t.user_attrs.get("compute", 0.0)  # a pruned trial's compute counts ...
                if t.state == TrialState.COMPLETE:  # ... but its partial loss is not a result
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


def _sage_section(cfg: StudyConfig, summaries: list[MethodSummary], out: Path) -> list[str]:
    """SAGE beside Hi-DLR on the same task and budget: the per-group rates each ends up stepping with."""
    sage = [s for s in summaries if _config(cfg, s.name).optimizer.endswith("-sage")]
    hidlr = [s for s in summaries if s.kind == "hidlr" and _config(cfg, s.name).grouping != "single"]
    if not sage or not hidlr:
        return []
    _plot_sage_vs_hidlr(hidlr[0], sage, out / "sage_vs_hidlr.png")
    return [
        "SAGE and Hi-DLR, same task and budget. SAGE scales every element's step by its sensitivity's "
        "variation, lr x |I - I_bar| / I_bar with I = |theta * grad|, and still needs its lr searched (here by "
        "the grid); Hi-DLR sets one rate per group from the measured curvature in one run. The plot shows the "
        "rate each group steps with at the end of every epoch: Hi-DLR's group rates, and SAGE's lr times the "
        "group's mean sensitivity multiplier at its selected grid point (first seed).",
        "",
        "![SAGE against Hi-DLR group rates](sage_vs_hidlr.png)",
        "",
    ]


def _plot_sage_vs_hidlr(hidlr: MethodSummary, sage: list[MethodSummary], path: Path) -> None:
    panels = [hidlr, *sage]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), sharey=True, squeeze=False)
    names = hidlr.selected[0].user_attrs.get("refits", {}).get("group_names")
    for ax, summary in zip(axes[0], panels, strict=True):
        trial = summary.selected[0]
        curve = trial.user_attrs["curve"]
        rates = curve.get("effective_lrs") or curve["lrs"]
        for k, series in enumerate(zip(*rates, strict=True)):
            label = f"group {names[k]}" if names and k < len(names) else f"group {k}"
            ax.plot([e + 1 for e in curve["epoch"]], series, label=label)
        lr = f", lr={trial.params['lr']:g}" if "lr" in trial.params else ""
        ax.set_title(f"{summary.name}{lr}", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("rate stepped with (group mean)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
