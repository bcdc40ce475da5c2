"""The ``hidlr`` command."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import StudyConfig, load_study_config
from .groups import group_names, group_parameters
from .report import write_report
from .storage import check_storage_url, storage_file
from .study import TRIAL_THREADS, check_budgets, check_study, finish_study, pin_cpu_kernels, run_study
from .tasks import get_task
from .tracking import DEFAULT_TRACKING_URI, Tracker, ui_command
from .training import EpochLog, train

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Hi-DLR: per-group learning rates tuned inside one run."
)
console = Console()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"hidlr-hpo {version('hidlr-hpo')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Hi-DLR: Hessian-informed differential learning rates."""


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(min=1, help="training epochs")] = 30,
    lr: Annotated[float, typer.Option(help="starting learning rate of every group (AdamW)")] = 1e-3,
    mode: Annotated[str, typer.Option(help="diag or full")] = "diag",
    interval: Annotated[int, typer.Option(min=1, help="refit every N to 4N steps (adaptive)")] = 10,
    seed: Annotated[int, typer.Option()] = 0,
    probe: Annotated[str, typer.Option(help="probe batch: heldout (validation) or train")] = "heldout",
    horizon: Annotated[bool, typer.Option(help="scale the rates down linearly over the planned steps")] = True,
    compare: Annotated[bool, typer.Option(help="also train plain AdamW at the same starting lr")] = True,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Train an MLP on scikit-learn's digits with Hi-DLR(AdamW), layer groups, and show what it did."""
    if mode not in ("diag", "full"):
        raise typer.BadParameter(f"mode must be diag or full, got {mode!r}", param_hint="--mode")
    if probe not in ("heldout", "train"):
        raise typer.BadParameter(f"probe must be heldout or train, got {probe!r}", param_hint="--probe")
    if not (lr > 0 and math.isfinite(lr)):
        raise typer.BadParameter(f"lr must be positive, got {lr}", param_hint="--lr")
    try:
        torch.empty(0, device=device)  # the device exists and this torch build can use it
    except (RuntimeError, AssertionError) as exc:
        raise typer.BadParameter(f"cannot use device {device!r} here: {exc}", param_hint="--device") from None
    task = get_task("digits")
    console.print(
        f"[bold]digits[/bold]: {len(task.train)} train / {len(task.val)} val / {len(task.test)} test, "
        f"MLP 64-128-128-10, groups by layer, AdamW from lr={lr:g}, Hi-DLR {mode}, "
        f"refit every {interval}-{4 * interval} steps"
    )

    names = group_names(group_parameters(task.make_model(seed), task.grouping))
    widths = (5, 10, 9, 7, *(10 for _ in names))
    header = ("epoch", "train loss", "val loss", "val acc", *(f"lr[{n}]" for n in names))
    console.print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)), style="bold")

    def show(log: EpochLog) -> None:  # each epoch as it ends
        cells = (log.epoch + 1, f"{log.train_loss:.4f}", f"{log.val_loss:.4f}", f"{log.val_acc:.3f}")
        cells += tuple(f"{x:.2e}" for x in log.lrs)
        console.print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))

    result = train(
        task,
        lr=lr,
        epochs=epochs,
        seed=seed,
        hidlr={"interval": interval, "mode": mode, "horizon": horizon},
        probe=probe,
        on_epoch=show,
        device=device,
    )  # type: ignore[arg-type]
    h = result.hidlr
    assert h is not None
    console.print(
        f"Hi-DLR: {len(h.history)} refits, {h.n_rejected} rejected, {h.probe_forwards} probe forwards; "
        f"compute {result.compute:,.0f} forward-equivalents, "
        f"{100 * result.probe_compute / result.compute:.1f}% of it on probes"
    )
    console.print(
        f"Hi-DLR   final val loss {result.final_val_loss:.4f}  test acc {result.test_acc:.3f}  "
        f"({result.wall_seconds:.1f}s)"
    )
    if compare:
        with console.status("training plain AdamW for comparison ..."):
            plain = train(task, lr=lr, epochs=epochs, seed=seed, device=device)
        console.print(
            f"AdamW    final val loss {plain.final_val_loss:.4f}  test acc {plain.test_acc:.3f}  "
            f"(fixed lr={lr:g}, {plain.wall_seconds:.1f}s)"
        )


StudyFile = Annotated[Path, typer.Argument(help="a study file, e.g. studies/digits.toml", exists=True, dir_okay=False)]
StorageOption = Annotated[
    str | None, typer.Option(help="Optuna storage URL (default: the study file's, an SQLite file)")
]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"),
]
TrackingOption = Annotated[bool, typer.Option(help="log to MLflow (parent run per study, child run per trial)")]


def _load(path: Path, quick: bool, storage: str | None = None, build: bool = False):
    """The study file (and the storage it will use, ``--storage`` or the file's), or one red line and exit 2.
    ``build``: also build every method's task, groups, optimizer and HiDLR (what ``run`` will train)."""
    try:
        cfg = load_study_config(path)
        url = check_storage_url(storage or cfg.storage)
        cfg = cfg.quick() if quick else cfg
        file = storage_file(url)
        if build:
            check_study(cfg)
        if file is None or file.exists():  # a database that does not exist yet holds nothing to clash with
            check_budgets(cfg, url)
    except ValueError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    return cfg


@app.command()
def run(
    study_file: StudyFile,
    storage: StorageOption = None,
    quick: Annotated[
        bool, typer.Option(help="a smoke run: 2 epochs, one seed, a few trials per method, kept apart")
    ] = False,
    tracking_uri: TrackingUriOption = None,
    tracking: TrackingOption = True,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="worker processes sharing the study's trials (default: one per 2 cores; each trial uses 2 threads)",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="progress bar and a table after each seed")] = True,
    helper: Annotated[bool, typer.Option(hidden=True, help="a helper worker started by --workers")] = False,
) -> None:
    """Run a comparison study (a rerun resumes; finished trials are not repeated).

    Seeds run one after the other, with the results table after each. Trials run with a fixed torch thread
    count (and AVX2 CPU kernels on x86) on any machine, so the numbers are the study's own; several workers
    (``--workers``, or ``hidlr run`` started again elsewhere on the same storage) share the trials.
    """
    pin_cpu_kernels()  # before torch's first CPU operation, which picks the kernels for the process
    cfg = _load(study_file, quick, storage, build=True)
    url = storage or cfg.storage
    # SIGTERM (kill, a scheduler's stop, a closed container) stops like Ctrl-C: the running trial is recorded
    # as FAIL and its MLflow run as FAILED, and a rerun trains it again.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    helpers: list[subprocess.Popen] = []
    if workers is None:  # every trial runs TRIAL_THREADS intra-op threads: more workers would only contend
        workers = 1 if helper else max(1, (os.cpu_count() or 1) // TRIAL_THREADS)

    def start_helpers() -> None:
        command = [sys.executable, "-m", "hidlr_hpo", "run", str(study_file), "--storage", url, "--helper"]
        command += ["--no-progress", *(["--quick"] if quick else [])]
        command += ["--tracking-uri", tracking_uri] if tracking_uri else []
        command += [] if tracking else ["--no-tracking"]
        for _ in range(workers - 1):
            # Their own session: Ctrl-C reaches the lead only, which stops them (SIGTERM) after its own trial.
            helpers.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True))

    def seed_table(seeds: list[int]) -> None:
        if len(seeds) < len(cfg.seeds):  # the last one comes with the final message
            console.print(_summary_table(cfg.model_copy(update={"seeds": seeds}), url, len(cfg.seeds)))

    try:
        tracker = run_study(
            cfg,
            storage=url,
            tracking_uri=tracking_uri,
            tracking=tracking,
            show_progress=progress,
            on_ready=start_helpers,
            on_seed_done=seed_table if progress and not helper else None,
            lead=not helper,
            finish=workers == 1,  # with helpers, the lead closes the MLflow parent after them (below)
        )
        failed_helpers = sum(process.wait() != 0 for process in helpers)
    except BaseException:
        for process in helpers:  # stopped: so are its helpers (each records its running trial as FAIL)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in helpers:
            process.wait()
        raise
    if helper:
        return
    if helpers:
        finish_study(cfg, url, tracker)
    if progress:
        console.print(_summary_table(cfg, url, len(cfg.seeds)))
    if failed_helpers:
        console.print(f"[yellow]{failed_helpers} helper worker(s) stopped with an error; rerun to finish[/yellow]")
    console.print(
        f"study [bold]{cfg.name}[/bold] done in {url}; next: hidlr report {study_file}{' --quick' if quick else ''}"
    )
    if tracker.active:
        if tracker.uri.startswith("http"):
            browse = f"open {tracker.uri}"
        else:
            browse = "hidlr ui" + ("" if tracker.uri == DEFAULT_TRACKING_URI else f" --tracking-uri {tracker.uri}")
        console.print(f"MLflow: experiment [bold]{cfg.name}[/bold] in {tracker.uri}; browse it with: {browse}")


@app.command()
def report(
    study_file: StudyFile,
    storage: StorageOption = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: the study's results_dir)")] = None,
    quick: Annotated[bool, typer.Option(help="report the --quick run")] = False,
    tracking_uri: TrackingUriOption = None,
    tracking: Annotated[bool, typer.Option(help="attach the report to the study's MLflow parent run")] = True,
) -> None:
    """Write the comparison table (markdown) and plots (PNG) of a study."""
    cfg = _load(study_file, quick, storage)
    try:
        path = write_report(cfg, out_dir=out, storage=storage)
    except ValueError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    except OSError as exc:  # an output folder that cannot be made or written
        where = exc.filename or out or cfg.results_dir
        console.print(
            f"[red]cannot write the report to {escape(str(where))}: {escape(exc.strerror or str(exc))}; "
            "choose another folder with --out[/red]"
        )
        raise typer.Exit(2) from None
    console.print(_summary_table(cfg, storage))
    console.print(f"report (every column, paired comparisons, plots): {path}")
    if tracking:
        tracker = Tracker(tracking_uri)
        tracker.start_study(cfg.name, cfg.model_dump())
        tracker.log_report(path.parent)
        if tracker.active:
            console.print(f"attached to the MLflow parent run of experiment {cfg.name} in {tracker.uri}")


def _summary_table(cfg: StudyConfig, storage: str | None, of_seeds: int | None = None) -> Table:
    """The report's main numbers, narrow enough for an 80-column terminal (``of_seeds``: the study's seeds,
    of which ``cfg.seeds`` are done)."""
    import statistics

    from .report import collect

    done = f" ({len(cfg.seeds)} of {of_seeds} seeds)" if of_seeds and len(cfg.seeds) < of_seeds else ""
    table = Table(title=f"{cfg.name}: mean over seeds{done}", title_justify="left")
    for column in ("method", "val loss", "test loss", "compute"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for s in collect(cfg, storage):
        if not s.selected:
            continue
        val, test = s.metric("final_val_loss"), s.metric("test_loss")
        table.add_row(
            s.name,
            f"{statistics.mean(val):.4f}",
            f"{statistics.mean(test):.4f}",
            f"{statistics.mean(s.compute) / 1e3:,.0f}k",
        )
    return table


@app.command()
def ui(
    tracking_uri: TrackingUriOption = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="port on 127.0.0.1")] = 5000,
) -> None:
    """Serve the MLflow UI for the tracking store on 127.0.0.1 (mlflow server, one worker)."""
    try:
        command = ui_command(tracking_uri, port)
    except ValueError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    # MLflow 3 opens on its GenAI pages unless told otherwise; studies are model-training runs.
    url = f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning"
    console.print(f"MLflow UI for {command[3]} on {url} (Ctrl-C stops it)")
    # The mlflow of this environment (beside its python, even when the environment is not activated).
    beside = Path(sys.executable).with_name(command[0])
    executable = str(beside) if beside.exists() else shutil.which(command[0])
    if executable is None:
        console.print("[red]the mlflow command is not installed here: pip install 'mlflow>=3'[/red]")
        raise typer.Exit(2)
    raise typer.Exit(_serve([executable, *command[1:]]))


def _serve(command: list[str]) -> int:
    """Run the server in its own process group and stop the whole group (mlflow server starts its web
    workers as children) when this process gets Ctrl-C or SIGTERM, so no server outlives ``hidlr ui``."""
    server = subprocess.Popen(command, start_new_session=True)
    stopped = []

    def stop(*_: object) -> None:
        stopped.append(True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        stop()
        code = server.wait()
    return 0 if stopped else code  # stopped on request: a clean exit


if __name__ == "__main__":  # pragma: no cover
    app()
