"""The outer search (hidlr-search) and the pruned TPE baseline: per-epoch reports, pruning, compute counted."""

from __future__ import annotations

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from hidlr_hpo.config import StudyConfig
from hidlr_hpo.report import collect, write_report
from hidlr_hpo.study import optuna_study_name, run_study


@pytest.fixture(autouse=True)
def _float32():
    torch.set_default_dtype(torch.float32)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def study(tmp_path, n_trials=6, pruner="successive-halving") -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "name": "search",
            "seeds": [0],
            "storage": f"sqlite:///{tmp_path / 'studies.db'}",
            "results_dir": str(tmp_path / "report"),
            "task": {"name": "digits"},
            "budget": {"epochs": 6, "batch_size": 256},
            "methods": [
                {"name": "hidlr-search", "kind": "hidlr-search", "n_trials": n_trials, "pruner": pruner},
                {
                    "name": "tpe-pruned",
                    "kind": "tpe",
                    "n_trials": n_trials,
                    "low": 1e-4,
                    "high": 1e-1,
                    "pruner": pruner,
                },
            ],
        }
    )


def trials(cfg, name, states=None):
    method = next(m for m in cfg.methods if m.name == name)
    return optuna.load_study(study_name=optuna_study_name(cfg, method, 0), storage=cfg.storage).get_trials(
        states=states
    )


def test_the_outer_search_reports_every_epoch_prunes_and_counts_pruned_compute(tmp_path):
    cfg = study(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_study(cfg, show_progress=False, tracking_uri=uri)
    for name in ("hidlr-search", "tpe-pruned"):
        finished = trials(cfg, name)
        assert len(finished) == 6 and {t.state for t in finished} <= {TrialState.COMPLETE, TrialState.PRUNED}
        pruned = [t for t in finished if t.state == TrialState.PRUNED]
        assert pruned, name  # successive halving stops some trials on their first rungs
        for t in finished:
            assert 1e-4 <= t.params["lr"] <= 1e-1
            assert sorted(t.intermediate_values) == list(range(len(t.intermediate_values)))  # epoch by epoch
        for t in pruned:
            assert t.user_attrs["epochs_run"] < 6 and t.user_attrs["compute"] > 0
            assert len(t.intermediate_values) == t.user_attrs["epochs_run"]
        complete = [t for t in finished if t.state == TrialState.COMPLETE]
        assert all(len(t.intermediate_values) == 6 for t in complete)
    # Each trial's MLflow run carries the Optuna state: pruned runs can be filtered out (or in).
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id], "tags.`hidlr.role` = 'trial'")
    for name in ("hidlr-search", "tpe-pruned"):
        states = {
            int(r.data.tags["optuna.trial_number"]): r.data.tags["optuna.state"]
            for r in runs
            if r.data.params["method"] == name
        }
        assert states == {t.number: t.state.name for t in trials(cfg, name)}
    summary = next(s for s in collect(cfg) if s.name == "hidlr-search")
    everything = sum(t.user_attrs["compute"] for t in trials(cfg, "hidlr-search"))
    assert summary.compute == [pytest.approx(everything)]  # pruned trials' compute counts
    assert summary.trials_per_seed == [6] and summary.pruned_per_seed[0] >= 1
    report = write_report(cfg).read_text()
    assert "TPE over Hi-DLR diag's starting lr in [0.0001, 0.1], 6 trials, successive-halving pruning" in report
    assert "pruned)" in report


def test_a_resumed_search_proposes_what_an_uninterrupted_one_would(tmp_path):
    (tmp_path / "whole").mkdir()
    (tmp_path / "parts").mkdir()
    whole = study(tmp_path / "whole", n_trials=5)
    run_study(whole, show_progress=False, tracking=False)
    parts = study(tmp_path / "parts", n_trials=3)
    run_study(parts, show_progress=False, tracking=False)  # stopped after 3 trials ...
    run_study(study(tmp_path / "parts", n_trials=5), show_progress=False, tracking=False)  # ... resumed
    for name in ("hidlr-search", "tpe-pruned"):
        expected = [(t.params["lr"], t.state, t.value) for t in trials(whole, name)]
        assert [(t.params["lr"], t.state, t.value) for t in trials(parts, name)] == expected


def test_a_search_trial_that_fails_is_recorded_and_the_search_moves_on(tmp_path, monkeypatch):
    import hidlr_hpo.study as study_module

    real_train = study_module.train
    calls = []

    def flaky(task, **kwargs):
        calls.append(kwargs["lr"])
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real_train(task, **kwargs)

    monkeypatch.setattr(study_module, "train", flaky)
    cfg = study(tmp_path, n_trials=4, pruner="none")
    cfg = cfg.model_copy(update={"methods": cfg.methods[:1]})
    run_study(cfg, show_progress=False, tracking=False)
    states = [t.state for t in trials(cfg, "hidlr-search")]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 3
    assert "simulated" in trials(cfg, "hidlr-search")[1].user_attrs["error"]
    run_study(cfg, show_progress=False, tracking=False)  # a rerun: the failed trial counts, nothing runs again
    assert len(trials(cfg, "hidlr-search")) == 4 and len(calls) == 4


def test_checks_within_an_epoch_give_the_pruner_rungs_below_one_epoch(tmp_path):
    cfg = study(tmp_path)
    methods = [m.model_copy(update={"checks_per_epoch": 3}) for m in cfg.methods]
    cfg = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"epochs": 2}), "methods": methods})
    run_study(cfg, show_progress=False, tracking=False)
    for name in ("hidlr-search", "tpe-pruned"):
        finished = trials(cfg, name)
        for t in finished:  # checks 0..5: two within each epoch and its end
            assert sorted(t.intermediate_values) == list(range(len(t.intermediate_values)))
        for t in (t for t in finished if t.state == TrialState.COMPLETE):
            assert len(t.intermediate_values) == 6
            # The checks do not change training: the epoch ends' values are the trial's curve.
            curve = t.user_attrs["curve"]["val_loss"]
            assert [t.intermediate_values[2], t.intermediate_values[5]] == pytest.approx(curve, rel=1e-12)
        pruned = [t for t in finished if t.state == TrialState.PRUNED]
        assert pruned, name
        assert any(t.user_attrs["epochs_run"] != int(t.user_attrs["epochs_run"]) for t in pruned)  # mid-epoch
        assert all(len(t.intermediate_values) == round(t.user_attrs["epochs_run"] * 3) for t in pruned)
    assert "successive-halving pruning (3 checks per epoch)" in write_report(cfg).read_text()
