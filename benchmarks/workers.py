"""The README's main job: time to its first table, and trials per minute with one and with two workers.

    python benchmarks/workers.py [--study studies/digits.toml] [--seconds 240]

Runs ``hidlr run STUDY`` as the README does (with MLflow tracking, to a temporary store) on a fresh
temporary storage, once with ``--workers 1`` and once with ``--workers 2``, each for ``--seconds`` (then
stopped), and reports for each: the seconds until the first results table (after the first seed) and the
trials finished per minute, and the throughput ratio of two workers over one (measured in the same run, so
machine noise hits both). Install excluded.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna


def measure(study: Path, workers: int, seconds: float) -> tuple[float | None, float]:
    """(seconds to the first table or None, trials finished per minute) of one run stopped after ``seconds``."""
    folder = Path(tempfile.mkdtemp(prefix="hidlr-workers-"))
    storage = f"sqlite:///{folder / 'studies.db'}"
    command = [sys.executable, "-m", "hidlr_hpo", "run", str(study), "--storage", storage]
    command += ["--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--workers", str(workers)]
    start = time.monotonic()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "100"}
    )
    first_table: list[float] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if "mean over seeds" in line and not first_table:
                first_table.append(time.monotonic() - start)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # stops the lead and its helpers like Ctrl-C
        proc.wait()
    elapsed = time.monotonic() - start
    finished = 0
    for summary in optuna.get_all_study_summaries(storage):
        study_obj = optuna.load_study(study_name=summary.study_name, storage=storage)
        finished += sum(t.state.is_finished() and "compute" in t.user_attrs for t in study_obj.trials)
    return (first_table[0] if first_table else None), finished / (elapsed / 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("studies/digits.toml"))
    parser.add_argument("--seconds", type=float, default=240.0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = {}
    for workers in (1, 2):
        rows[workers] = measure(args.study, workers, args.seconds)
    print(f"| workers | first table after | trials finished per minute | ({os.cpu_count()} cores) |")
    print("|---|---|---|---|")
    for workers, (first, rate) in rows.items():
        shown = f"{first:.0f} s" if first is not None else f"not within {args.seconds:.0f} s"
        print(f"| {workers} | {shown} | {rate:.1f} | |")
    print(f"two workers over one, trials per minute: {rows[2][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
