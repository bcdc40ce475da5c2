"""HiDLRSampler against Optuna's samplers on textbook test functions (benchmarks/functions.py).

    python benchmarks/samplers.py [--samplers hidlr tpe cmaes gp random] [--functions sphere ...]
        [--dims 2 5 10] [--seeds 10] [--budget-per-dim 20] [--jobs 1]
        [--out docs/results/sampler-benchmark.md] [--plot docs/images/sampler-benchmark.png]
        [--cache benchmarks/.cache/samplers.jsonl]

One cell is one Optuna study (in memory) of one sampler on one instance (function, d, seed), with
``budget-per-dim * d`` trials over parameters x0..x{d-1} in the function's box; it records the best-so-far
regret f(x) - f* after each trial (clipped at 0: rounding can put a value 1e-16 under f*). Branin runs only at
d = 2 and Hartmann-6 only at d = 6, once each. Every sampler and instance is seeded with the cell's seed, so a
command gives the same numbers with any --jobs. Finished cells are appended to --cache (JSON lines), keyed by
the cell, the budget and Optuna's version, and for hidlr by a hash of hidlr_hpo/sampler.py and
hidlr_hpo/curvature.py (its fit): a killed run resumes, and a change to the sampler reruns only hidlr's cells.

Writes a markdown report (--out): the command, machine, timings, the median over seeds of the final regret per
(function, d) and sampler, and how often hidlr's median is at least as good as each other sampler's; and a plot
(--plot) of the median best regret against the trial number with the interquartile band.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: import benchmarks.functions from the repository root
    sys.path.insert(0, str(REPO))

from benchmarks.functions import FUNCTIONS, dims_for, make  # noqa: E402

SAMPLERS = ("hidlr", "tpe", "cmaes", "gp", "random")
HIDLR_SOURCES = (REPO / "hidlr_hpo" / "sampler.py", REPO / "hidlr_hpo" / "curvature.py")
REGRET_FLOOR = 1e-12  # the plot's log axis shows a regret of 0 (an exact hit) at this floor


def _quiet() -> None:
    """One CPU thread per process, Optuna's log at WARNING and no experimental-feature warnings."""
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)


def make_sampler(name: str, search_space: dict, seed: int):
    import optuna

    from hidlr_hpo import HiDLRSampler

    samplers = optuna.samplers
    return {
        "hidlr": lambda: HiDLRSampler(search_space=search_space, seed=seed),
        "tpe": lambda: samplers.TPESampler(multivariate=True, seed=seed),
        "cmaes": lambda: samplers.CmaEsSampler(seed=seed),
        "gp": lambda: samplers.GPSampler(seed=seed),
        "random": lambda: samplers.RandomSampler(seed=seed),
    }[name]()


def run_cell(function: str, dim: int, seed: int, sampler: str, budget: int) -> dict:
    """One study: {"best": best-so-far regret after each of the ``budget`` trials, "seconds": its wall time}."""
    import optuna
    from optuna.distributions import FloatDistribution

    problem = make(function, dim, seed)
    names = [f"x{i}" for i in range(dim)]
    space = {
        n: FloatDistribution(float(lo), float(hi)) for n, lo, hi in zip(names, problem.low, problem.high, strict=True)
    }

    def objective(trial: optuna.Trial) -> float:
        return problem([trial.suggest_float(n, d.low, d.high) for n, d in space.items()])

    made = make_sampler(sampler, space, seed)  # outside the timing: the first one imports its module
    start = time.perf_counter()
    study = optuna.create_study(sampler=made)
    study.optimize(objective, n_trials=budget)
    seconds = time.perf_counter() - start
    regret = np.maximum(np.array([t.value for t in study.trials]) - problem.f_star, 0.0)
    return {"best": np.minimum.accumulate(regret).tolist(), "seconds": seconds}


def hidlr_hash() -> str:
    digest = hashlib.sha256()
    for path in HIDLR_SOURCES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(cell: tuple, budget: int, source_hash: str, optuna_version: str) -> str:
    function, dim, seed, sampler = cell
    source = source_hash if sampler == "hidlr" else "-"
    return f"{function}/{dim}/{seed}/{sampler}/{budget}/{source}/optuna-{optuna_version}"


def load_cache(path: Path) -> dict[str, dict]:
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run
                continue
            records[record["key"]] = record
    return records


def _work(job: tuple) -> tuple:
    cell, budget = job
    return cell, run_cell(*cell, budget)


def run_all(cells: list[tuple], budget_per_dim: int, cache: Path, jobs: int) -> tuple[dict, int]:
    """Every cell's record (from the cache or run now), and how many were run now."""
    import optuna
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    source, version = hidlr_hash(), optuna.__version__
    key = {cell: cache_key(cell, budget_per_dim * cell[1], source, version) for cell in cells}
    cached = load_cache(cache)
    results = {cell: cached[key[cell]] for cell in cells if key[cell] in cached}
    todo = [(cell, budget_per_dim * cell[1]) for cell in cells if cell not in results]
    cache.parent.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress, cache.open("a") as out:
        task = progress.add_task("cells", total=len(cells), completed=len(results))
        if out.tell() and not cache.read_bytes().endswith(b"\n"):
            out.write("\n")  # end a line cut short by a killed run, so the next record starts its own

        def done(cell: tuple, record: dict) -> None:
            record = {
                "key": key[cell],
                **dict(zip(("function", "dim", "seed", "sampler"), cell, strict=True)),
                **record,
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            results[cell] = record
            progress.update(task, advance=1, description=f"{cell[0]} d={cell[1]} seed={cell[2]} {cell[3]}")

        if jobs == 1:
            _quiet()
            for cell, record in map(_work, todo):
                done(cell, record)
        else:
            with multiprocessing.get_context("spawn").Pool(jobs, initializer=_quiet) as pool:
                for cell, record in pool.imap_unordered(_work, todo):
                    done(cell, record)
    return results, len(todo)


def fmt(value: float) -> str:
    return f"{value:.1e}"


def at_least_as_good(a: float, b: float) -> bool:
    return a <= b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def report(args, pairs, samplers, results, wall: float, ran: int) -> str:
    import optuna
    import torch

    seeds, dims = range(args.seeds), sorted({d for _, d in pairs})
    final = {}  # (function, d, sampler): the median over seeds of the final best regret
    for f, d in pairs:
        for s in samplers:
            final[(f, d, s)] = float(np.median([results[(f, d, k, s)]["best"][-1] for k in seeds]))
    cpu = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), platform.processor())
    run_seconds = sum(r["seconds"] for r in results.values())
    lines = [
        "# Sampler benchmark: HiDLRSampler against Optuna's samplers",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`",
        "",
        f"Machine: {platform.platform()}, {cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"optuna {optuna.__version__}, torch {torch.__version__}, numpy {np.__version__}.",
        "",
        f"Seeds: 0..{args.seeds - 1} (each seed sets both the instance and the sampler). "
        f"Budget: {args.budget_per_dim} x d trials. Functions and instances: benchmarks/functions.py.",
        "",
        f"Total wall time: {wall:.0f} s with --jobs {args.jobs}; {ran} of {len(results)} runs ran now, the rest "
        f"came from the cache; the runs' own times sum to {run_seconds:.0f} s.",
        "",
        "Mean wall time per run (seconds):",
        "",
        "| sampler | " + " | ".join(f"d={d}" for d in dims) + " |",
        "|---|" + "---:|" * len(dims),
    ]
    for s in samplers:
        means = [np.mean([r["seconds"] for (_, dd, _, ss), r in results.items() if (ss, dd) == (s, d)]) for d in dims]
        lines.append(f"| {s} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    lines += [
        "",
        "Median over seeds of the final best regret f(x) - f* (the best of each row in bold):",
        "",
        "| function | d | " + " | ".join(samplers) + " |",
        "|---|---:|" + "---:|" * len(samplers),
    ]
    for f, d in pairs:
        values = [final[(f, d, s)] for s in samplers]
        shown = [f"**{fmt(v)}**" if at_least_as_good(v, min(values)) else fmt(v) for v in values]
        lines.append(f"| {f} | {d} | " + " | ".join(shown) + " |")
    if "hidlr" in samplers:
        lines += ["", "hidlr's median final regret is at least as good (<=, or equal to rel 1e-9 / abs 1e-12) as:", ""]
        for s in samplers:
            if s != "hidlr":
                wins = sum(at_least_as_good(final[(f, d, "hidlr")], final[(f, d, s)]) for f, d in pairs)
                lines.append(f"- {s}'s on {wins} of {len(pairs)} (function, d) pairs")
        if "random" in samplers:
            worse = [(f, d) for f, d in pairs if not at_least_as_good(final[(f, d, "hidlr")], final[(f, d, "random")])]
            worse = [f"{f} d={d}" for f, d in worse]
            lines += ["", f"hidlr is worse than random on: {', '.join(worse) or 'none'}."]
    if args.plot:
        image = os.path.relpath(args.plot.resolve(), args.out.resolve().parent)
        caption = f"median best regret per trial, interquartile band shaded; a regret of 0 drawn at {REGRET_FLOOR:g}"
        lines += ["", f"![{caption}]({image})"]
    return "\n".join(lines) + "\n"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def plot(path: Path, pairs, samplers, results, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(4, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax, (f, d) in zip(axes.flat, pairs, strict=False):
        for s in samplers:
            curves = np.maximum([results[(f, d, k, s)]["best"] for k in range(seeds)], REGRET_FLOOR)
            q25, median, q75 = np.percentile(curves, [25, 50, 75], axis=0)
            trials = np.arange(1, curves.shape[1] + 1)
            (line,) = ax.plot(trials, median, label=s)
            ax.fill_between(trials, q25, q75, color=line.get_color(), alpha=0.2)
        ax.set(yscale="log", title=f"{f}, d={d}", xlabel="trial")
    for ax in axes.flat[len(pairs) :]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel("best regret")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=len(samplers))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # 0.4 inch on top for the legend
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--functions", nargs="+", choices=list(FUNCTIONS), default=list(FUNCTIONS))
    parser.add_argument("--dims", nargs="+", type=int, default=[2, 5, 10])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1")
    parser.add_argument("--budget-per-dim", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "sampler-benchmark.md")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "sampler-benchmark.png")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache" / "samplers.jsonl")
    args = parser.parse_args()

    pairs = [(f, d) for f in args.functions for d in dims_for(f, args.dims)]
    cells = [(f, d, seed, s) for f, d in pairs for seed in range(args.seeds) for s in args.samplers]
    start = time.perf_counter()
    results, ran = run_all(cells, args.budget_per_dim, args.cache, args.jobs)
    wall = time.perf_counter() - start
    if args.plot:
        plot(args.plot, pairs, args.samplers, results, args.seeds)
    text = report(args, pairs, args.samplers, results, wall, ran)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
