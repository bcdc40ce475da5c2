"""MLflow tracking against real backends: the SQLite default, a real `mlflow server` read back over REST, and
failures that must not stop a study. Also: optuna-dashboard reads the same Optuna storage."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import requests
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from hidlr_hpo.config import load_study_config
from hidlr_hpo.study import optuna_study_name, run_study
from hidlr_hpo.tracking import DEFAULT_TRACKING_URI, Tracker, resolve_tracking_uri, ui_command

STUDY = """
name = "tracked"
seeds = [0]
storage = "sqlite:///{db}"
results_dir = "{out}"

[task]
name = "digits"

[budget]
epochs = 2
batch_size = 128

[[methods]]
name = "hidlr-full"
kind = "hidlr"
mode = "full"
interval = 3

[[methods]]
name = "grid"
kind = "grid"
lrs = [1e-3, 1e-2]
"""


@pytest.fixture(autouse=True)
def _float32():
    torch.set_default_dtype(torch.float32)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "tracked.toml"
    path.write_text(STUDY.format(db=tmp_path / "optuna.db", out=tmp_path / "report"))
    return load_study_config(path)


def _trials(cfg, name):
    method = next(m for m in cfg.methods if m.name == name)
    study = optuna.load_study(study_name=optuna_study_name(cfg, method, 0), storage=cfg.storage)
    return study.get_trials(states=(TrialState.COMPLETE,))


def test_tracking_uri_resolution(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == "sqlite:///env.db"
    assert resolve_tracking_uri("sqlite:///arg.db") == "sqlite:///arg.db"
    assert ui_command("sqlite:///a.db", 5001) == [
        "mlflow", "server", "--backend-store-uri", "sqlite:///a.db",
        "--host", "127.0.0.1", "--port", "5001", "--workers", "1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="already a tracking server"):
        ui_command("http://127.0.0.1:5000")


def test_sqlite_default_holds_study_trials_and_refits(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_study(cfg, show_progress=False)
    assert (tmp_path / "mlflow.db").is_file()  # the default store, in the working folder
    client = MlflowClient("sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("hidlr.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3  # hidlr-full + two grid points
    assert {c.data.params["method"] for c in children} == {"hidlr-full", "grid"}
    assert all(c.info.status == "FINISHED" and c.data.params["seed"] == "0" for c in children)
    assert parent.info.status == "FINISHED"  # the study ran to its end
    # The parent says what the study was and how each method did, without opening its children.
    assert parent.data.params["task"] == "digits" and parent.data.params["methods"] == "hidlr-full, grid"
    grid_values = [t.value for t in _trials(cfg, "grid")]
    assert parent.data.metrics["grid/final_val_loss"] == pytest.approx(min(grid_values))
    assert parent.data.metrics["grid/trials"] == 2 and parent.data.metrics["hidlr-full/seeds"] == 1
    assert parent.data.metrics["hidlr-full/compute"] == pytest.approx(
        _trials(cfg, "hidlr-full")[0].user_attrs["compute"]
    )
    assert all(c.data.tags["optuna.state"] == "COMPLETE" for c in children)
    # MLflow 3 opens the experiment on its training runs, not on the GenAI overview.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    grid_params = sorted(float(c.data.params["lr"]) for c in children if c.data.params["method"] == "grid")
    assert grid_params == [1e-3, 1e-2]  # the sampled rate is a param: runs can be filtered and compared on it
    assert all(c.data.params["optimizer"] == "adamw" and c.data.params["epochs"] == "2" for c in children)

    (hidlr_trial,) = _trials(cfg, "hidlr-full")
    assert {k for k in hidlr_trial.user_attrs if k.startswith("final_lr_")} == {
        f"final_lr_{name}" for name in hidlr_trial.user_attrs["refits"]["group_names"]
    }
    (child,) = [c for c in children if c.data.params["method"] == "hidlr-full"]
    assert child.data.tags["optuna.study_name"] == "tracked/hidlr-full/seed0"
    assert child.data.tags["optuna.trial_number"] == str(hidlr_trial.number)
    refits = hidlr_trial.user_attrs["refits"]
    first = refits["group_names"][0]
    history = client.get_metric_history(child.info.run_id, f"lr/{first}")
    assert [m.step for m in history] == refits["step"]  # one point per refit, step = optimizer step
    assert [m.value for m in history] == pytest.approx([lrs[0] for lrs in refits["lrs"]])
    for key in ("r2", "predicted_decrease", "realised_decrease", f"b/{first}", f"A_kk/{first}", "compute_spent"):
        assert client.get_metric_history(child.info.run_id, key), key
    gaps = client.get_metric_history(child.info.run_id, "refit_gap")  # the adaptive schedule, refit by refit
    assert [m.value for m in gaps] == [b - a for a, b in zip(refits["step"], refits["step"][1:], strict=False)]
    val = client.get_metric_history(child.info.run_id, "val_loss")
    assert [m.step for m in val] == [9, 18]  # two epochs of 9 steps
    assert val[-1].value == pytest.approx(hidlr_trial.value)
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"config.json", "plots", "curvature"} <= artifacts
    assert {a.path for a in client.list_artifacts(child.info.run_id, "plots")} == {
        "plots/learning_rates.png",
        "plots/loss_vs_compute.png",
    }
    a_full = json.loads(Path(client.download_artifacts(child.info.run_id, "curvature/A_full.json")).read_text())
    assert [entry["step"] for entry in a_full] == refits["step"]

    # A rerun (nothing to do) keeps one parent run; the report lands in it.
    run_study(cfg, show_progress=False)
    tracker = Tracker()
    tracker.start_study("tracked", {})
    assert tracker.parent_id == parent.info.run_id
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# table")
    tracker.log_report(report)
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "report")] == ["report/report.md"]


def test_tracking_off_writes_nothing(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_study(cfg, show_progress=False, tracking=False)
    assert not (tmp_path / "mlflow.db").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback, started with the command `hidlr ui` runs."""
    port = _free_port()
    command = ui_command(f"sqlite:///{tmp_path / 'server.db'}", port)
    command[0] = str(Path(sys.executable).with_name("mlflow"))
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_real_server_shows_parent_children_and_rate_history(cfg, mlflow_server):
    run_study(cfg, show_progress=False, tracking_uri=mlflow_server)
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "tracked"}).json()
    experiment_id = experiment["experiment"]["experiment_id"]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment_id]}).json()["runs"]

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    (parent,) = [r for r in runs if tags(r).get("hidlr.role") == "study"]
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert len(children) == 3
    (child,) = [c for c in children if {p["key"]: p["value"] for p in c["data"]["params"]}["method"] == "hidlr-full"]
    (trial,) = _trials(cfg, "hidlr-full")
    name = trial.user_attrs["refits"]["group_names"][-1]
    history = requests.get(
        f"{api}/metrics/get-history", params={"run_id": child["info"]["run_id"], "metric_key": f"lr/{name}"}
    ).json()["metrics"]
    assert [m["step"] for m in history] == trial.user_attrs["refits"]["step"]
    assert [m["value"] for m in history] == pytest.approx([lrs[-1] for lrs in trial.user_attrs["refits"]["lrs"]])


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "notascheme://nowhere"])
def test_tracking_failure_warns_once_and_loses_nothing(cfg, uri):
    uri = uri.format(port=_free_port())  # nothing listens there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = run_study(cfg, show_progress=False, tracking_uri=uri)
    ours = [w for w in caught if "MLflow tracking at" in str(w.message)]
    assert len(ours) == 1 and "training goes on without tracking" in str(ours[0].message)
    assert tracker.failed is not None and not tracker.active
    assert len(_trials(cfg, "hidlr-full")) == 1 and len(_trials(cfg, "grid")) == 2


def test_optuna_dashboard_reads_the_same_study(cfg):
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    run_study(cfg, show_progress=False, tracking=False)
    app = optuna_dashboard.wsgi(cfg.storage)
    status: list[str] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/api/studies",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
    }
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200")
    names = {s["study_name"] for s in json.loads(body)["study_summaries"]}
    assert {"tracked/hidlr-full/seed0", "tracked/grid/seed0"} <= names


def test_a_failure_mid_trial_marks_the_run_failed_not_running(tmp_path, monkeypatch):
    """The store answers again after one failed send: tracking stays off, but the run is closed as FAILED."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    tracker.start_study("s", {})
    run = tracker.start_trial(method="m", description="", seed=0, config={}, study="s/m/seed0", trial=0)
    real_log_batch = tracker.client.log_batch

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(tracker.client, "log_batch", real_log_batch)
        raise ConnectionError("server went away")

    monkeypatch.setattr(tracker.client, "log_batch", fail_once)
    run._metric("x", 1.0, 0)
    with pytest.warns(RuntimeWarning, match="server went away"):
        run.flush()
    assert not run.active
    run.finish({"final_val_loss": 0.1})
    assert tracker.client.get_run(run.run_id).info.status == "FAILED"
