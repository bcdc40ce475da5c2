"""MLflow tracking a user can browse: study (parent run) > trial (nested child run) > refit interval (steps).

Logged with MLflow's own client (Optuna's ``MLflowCallback`` is deprecated and makes no parent run):

- one **parent run** per study (experiment = the study's name), reused when the study is rerun; ``hidlr
  report`` adds the comparison table and plots to it as artifacts;
- one **child run** per trial, tagged ``mlflow.parentRunId``, with the method, its configuration and the
  seed as params and the Optuna study name and trial number as tags;
- in a child run, at every refit (step = optimizer step): each group's rate ``lr/<group>``, ``b/<group>``,
  ``A_kk/<group>``, ``influence/<group>``, ``r2``, ``predicted_decrease``, ``realised_decrease``,
  ``rejected``, ``probe_seconds`` and ``compute_spent`` (forward-equivalents so far); with automatic
  freezing (``freeze``) also ``frozen/<group>`` (1 while frozen), ``smoothed_influence/<group>`` (what the
  decision used) and ``trainable_fraction``; per epoch:
  ``train_loss``, ``val_loss``, ``val_acc`` and the rate each group stepped with; at the last step the test
  metrics and the total compute; the config, the full A (mode full) and the trial's plots.

Metrics are queued and sent with ``log_batch`` at an epoch's end every few seconds (``flush_seconds``) and at
the end of the trial, never one call per value: ``benchmarks/tracking_cost.py`` measures what it costs.
Tracking never stops training: the first failure (server down, disk full, bad URI) warns once, switches
tracking off for the rest of the run, and the Optuna study stays complete.

The tracking URI is, in order: the ``tracking_uri`` argument (``--tracking-uri``), ``MLFLOW_TRACKING_URI``,
then ``sqlite:///mlflow.db`` in the working folder (MLflow 3's own default).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["DEFAULT_TRACKING_URI", "Tracker", "TrialRun", "resolve_tracking_uri", "ui_command"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_T = TypeVar("_T")
_MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _create_sqlite_store(uri: str) -> None:
    """Create a new SQLite tracking store whole or not at all.

    MLflow creates its tables in about twenty migrations; a run killed in the middle used to leave a
    half-made ``mlflow.db`` that MLflow then refused for good. The store is made under a temporary name in
    the same folder and linked into place when complete (a second process that made it first wins).
    """
    from .storage import storage_file

    try:
        file = storage_file(uri)
    except Exception:  # noqa: BLE001 - not a database URL (a server, a file store): nothing to create here
        return
    if file is None or file.exists() or not file.parent.is_dir():
        return
    from mlflow import MlflowClient

    # Absolute and unique: MLflow caches an engine per URI, so a relative name reused after a chdir (same
    # process, same name) would reach the cached connection to a file in the previous folder.
    file = file.absolute()
    temporary = file.with_name(f".{file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.creating")
    try:
        MlflowClient(tracking_uri=f"sqlite:///{temporary}").search_experiments(max_results=1)  # runs migrations
        try:
            os.link(temporary, file)  # atomic: the store appears complete, or not at all
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError:  # a file system without hard links: a rename is atomic too (last one wins)
            os.replace(temporary, file)
    finally:
        temporary.unlink(missing_ok=True)


def ui_command(tracking_uri: str | None = None, port: int = 5000) -> list[str]:
    """The ``mlflow server`` command line that ``hidlr ui`` runs: loopback only, one worker."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise ValueError(f"{uri} is already a tracking server: open it in a browser instead of starting one")
    return [
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def _study_params(config: dict[str, Any]) -> dict[str, Any]:
    """The parent run's params: what the study was configured with, in a few readable keys."""
    task = config.get("task", {})
    budget = config.get("budget", {})
    return {
        "task": task.get("name"),
        "seeds": config.get("seeds"),
        "epochs": budget.get("epochs"),
        "batch_size": budget.get("batch_size"),
        "methods": ", ".join(m.get("name", "?") for m in config.get("methods", [])),
    }


def _key(name: str) -> str:
    """An MLflow-safe metric/param key (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", str(name))


class Tracker:
    """Logs a study to MLflow; every call is a no-op after the first failure (which warns once).

    Args:
        tracking_uri: see :func:`resolve_tracking_uri`.
        enabled: False makes every call a no-op (``--no-tracking``).
    """

    def __init__(self, tracking_uri: str | None = None, enabled: bool = True) -> None:
        self.uri = resolve_tracking_uri(tracking_uri)
        self.enabled = enabled
        self.failed: str | None = None  # the first error, when tracking was switched off
        self.client: Any = None
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        if enabled:
            # A dead server should cost seconds, not MLflow's default minutes of retries; the user's
            # own settings win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            self._safe(self._connect)

    def _connect(self) -> None:
        from mlflow import MlflowClient

        _create_sqlite_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)

    @property
    def active(self) -> bool:
        return self.enabled and self.failed is None and self.client is not None

    def _safe(self, fn: Callable[[], _T]) -> _T | None:
        if not self.enabled or self.failed is not None:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any tracking failure must leave training running
            self.failed = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"MLflow tracking at {self.uri} failed ({self.failed[:300]}); training goes on without "
                "tracking and the Optuna results stay complete",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    # -- study (parent run) ---------------------------------------------------------------------------
    def start_study(self, study_name: str, config: dict[str, Any], reopen: bool = False) -> None:
        """Create (or, on a rerun, find) the study's experiment and parent run; ``reopen`` marks a found
        parent RUNNING again (a rerun works on it until :meth:`end_study`)."""

        def start() -> None:
            experiment = self.client.get_experiment_by_name(study_name)
            self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(study_name)
            # MLflow 3 opens an experiment of no declared kind on its GenAI overview; these are training runs.
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
            found = self.client.search_runs(
                [self.experiment_id], filter_string="tags.`hidlr.role` = 'study'", max_results=1
            )
            if found:
                self.parent_id = found[0].info.run_id
                return
            run = self.client.create_run(
                self.experiment_id, run_name=study_name, tags={"hidlr.role": "study", "hidlr.study": study_name}
            )
            self.parent_id = run.info.run_id
            self.client.log_dict(self.parent_id, config, "study_config.json")
            from mlflow.entities import Param

            params = _study_params(config)
            self.client.log_batch(self.parent_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

        self._safe(start)
        if reopen and self.parent_id is not None:
            self._safe(lambda: self.client.update_run(self.parent_id, status="RUNNING"))

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Per-method results on the parent run (``<method>/final_val_loss``, ``<method>/compute``, ...), so
        the study's outcome reads from the parent's metrics without opening every child."""
        if self.parent_id is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]
        self._safe(lambda: self.client.log_batch(self.parent_id, metrics=batch))

    def end_study(self, failed: bool = False) -> None:
        """Close the parent run: FINISHED after a complete run, FAILED when the run stopped on an error."""
        if self.parent_id is not None:
            self._safe(lambda: self.client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED"))

    def log_report(self, report_dir: str | Path) -> None:
        """Attach ``hidlr report``'s table and plots to the parent run."""
        if self.parent_id is not None:
            self._safe(lambda: self.client.log_artifacts(self.parent_id, str(report_dir), "report"))

    def close_trial_run(self, study: str, trial: int) -> None:
        """Mark FAILED the child run of a trial whose worker died (killed, crashed), found by its Optuna tags
        (the worker may have died before the trial recorded the run's id): it would stay RUNNING."""
        if self.experiment_id is None or self.client is None:
            return

        def close() -> None:
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=(
                    f"tags.`optuna.study_name` = '{study}' and tags.`optuna.trial_number` = '{trial}' "
                    "and attributes.status = 'RUNNING'"
                ),
            )
            for run in runs:
                self.client.set_tag(run.info.run_id, "optuna.state", "FAIL")
                self.client.set_terminated(run.info.run_id, "FAILED")

        self._safe(close)

    # -- trial (child run) ----------------------------------------------------------------------------
    def start_trial(
        self,
        *,
        method: str,
        description: str,
        seed: int,
        config: dict[str, Any],
        study: str,
        trial: int,
        params: dict[str, Any] | None = None,
    ) -> TrialRun:
        """A child run with the trial's configuration as params (``params``: the sampled lr, the optimizer,
        the budget, ...), so that runs can be filtered and compared on them."""

        def start() -> str:
            tags = {
                "mlflow.parentRunId": self.parent_id,
                "hidlr.role": "trial",
                "optuna.study_name": study,
                "optuna.trial_number": str(trial),
            }
            run = self.client.create_run(self.experiment_id, run_name=f"{method} seed{seed} trial{trial}", tags=tags)
            logged = {"method": method, "configuration": description, "seed": seed, **(params or {})}
            from mlflow.entities import Param

            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in logged.items()])
            self.client.log_dict(run.info.run_id, config, "config.json")
            return run.info.run_id

        run_id = self._safe(start) if self.parent_id is not None else None
        return TrialRun(self, run_id)


class TrialRun:
    """One trial's child run. Metrics are queued and sent in one ``log_batch`` at an epoch's end once
    ``flush_seconds`` have passed since the last send (and at the end), so a fast run pays a few calls, not
    one per epoch, and a slow run still shows its curves live."""

    def __init__(self, tracker: Tracker, run_id: str | None, flush_seconds: float = 5.0) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._pending: list[Any] = []
        self._full_a: list[dict[str, Any]] = []  # mode full: every refit's A, logged as one artifact
        self._last_step = 0  # the summary metrics are logged at it, so they are the runs' latest values
        self.log_seconds = 0.0  # time spent in MLflow calls (the cost of tracking)

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.tracker.active

    def _metric(self, key: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        if value is None or not math.isfinite(value):
            return  # MLflow stores NaN, but a browsing user reads a gap better than a NaN point
        self._last_step = max(self._last_step, int(step))
        self._pending.append(Metric(_key(key), float(value), int(time.time() * 1000), int(step)))

    def refit(self, record: Any, compute: float, group_names: list[str]) -> None:
        """Queue one refit's diagnostics (a :class:`~hidlr_hpo.controller.RefitRecord`), step = its step."""
        if not self.active:
            return
        t = record.step
        for k, name in enumerate(group_names):
            self._metric(f"lr/{name}", record.applied_lrs[k], t)
            self._metric(f"b/{name}", record.b[k], t)
            self._metric(f"A_kk/{name}", record.A[k][k], t)
            self._metric(f"influence/{name}", record.influence[k], t)
        self._metric("r2", record.r2, t)
        self._metric("predicted_decrease", record.predicted_decrease, t)
        self._metric("realised_decrease", record.realised_decrease, t)
        self._metric("rejected", float(record.rejected), t)
        self._metric("probe_seconds", record.probe_seconds, t)
        self._metric("compute_spent", compute, t)
        if record.gap:  # steps since the previous refit: the adaptive schedule (0 for the first refit)
            self._metric("refit_gap", float(record.gap), t)
        if getattr(record, "frozen", None) is not None:  # automatic PEFT: what is frozen, and on what evidence
            for k, name in enumerate(group_names):
                self._metric(f"frozen/{name}", float(k in record.frozen), t)
                self._metric(f"smoothed_influence/{name}", record.smoothed_influence[k], t)
            self._metric("trainable_fraction", record.trainable_fraction, t)
        k = len(record.A)
        off_diagonal = (record.A[i][j] for i in range(k) for j in range(k) if i != j)
        if any(a != 0 and math.isfinite(a) for a in off_diagonal):  # a full fit (NaN: a frozen group): keep A
            self._full_a.append({"step": t, "A": record.A, "used_mode": record.used_mode})

    def epoch(self, log: Any) -> None:
        """Queue an :class:`~hidlr_hpo.training.EpochLog` (step = optimizer steps done) and send the queue."""
        if not self.active:
            return
        step = log.step
        self._metric("train_loss", log.train_loss, step)
        self._metric("val_loss", log.val_loss, step)
        self._metric("val_acc", log.val_acc, step)
        self._metric("epoch", float(log.epoch), step)
        if getattr(log, "plateau_cuts", None) is not None:  # Hi-DLR's plateau guard: cuts so far
            self._metric("plateau_cuts", float(log.plateau_cuts), step)
        for name, rate in zip(log.groups, log.effective_lrs or log.lrs, strict=False):
            self._metric(f"epoch_lr/{name}", rate, step)
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.active or not self._pending:
            return
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        t0 = time.perf_counter()
        for i in range(0, len(pending), _MAX_METRICS_PER_BATCH):
            chunk = pending[i : i + _MAX_METRICS_PER_BATCH]
            self.tracker._safe(lambda chunk=chunk: self.tracker.client.log_batch(self.run_id, metrics=chunk))
        self.log_seconds += time.perf_counter() - t0

    def finish(
        self,
        summary: dict[str, float],
        figures: Iterable[tuple[str, Any]] = (),
        failed: bool = False,
        state: str | None = None,
    ) -> None:
        """Final metrics (at the last step), the full A matrices (mode full), the trial's figures; then close
        the run, tagged with the Optuna trial's ``state`` (``optuna.state``: COMPLETE, PRUNED or FAIL) when
        given. After a tracking failure it still tries, once and silently, to mark the run FAILED so that
        it does not stay RUNNING in the UI."""
        if not self.active:
            if self.run_id is not None and self.tracker.client is not None:
                try:
                    self.tracker.client.set_terminated(self.run_id, "FAILED")
                except Exception:  # noqa: BLE001 - best effort: tracking is already off
                    pass
            return
        t0 = time.perf_counter()
        for key, value in summary.items():
            self._metric(key, value, self._last_step)
        self.flush()
        client = self.tracker.client
        if self._full_a:
            text = json.dumps(self._full_a)
            self.tracker._safe(lambda: client.log_text(self.run_id, text, "curvature/A_full.json"))
        for name, figure in figures:
            self.tracker._safe(lambda name=name, figure=figure: client.log_figure(self.run_id, figure, name))
        if state is not None:
            self.tracker._safe(lambda: client.set_tag(self.run_id, "optuna.state", state))
        status = "FAILED" if failed or state == "FAIL" else "FINISHED"
        self.tracker._safe(lambda: client.set_terminated(self.run_id, status))
        self.log_seconds += time.perf_counter() - t0
