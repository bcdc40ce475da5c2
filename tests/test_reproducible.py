"""A study's numbers depend only on its study file and seeds: not on the machine's thread count or vector
width, the order the methods run in, what ran before in the process, or whether the run was resumed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import leave_running_as_killed
from optuna.trial import TrialState

from hidlr_hpo import study as study_module
from hidlr_hpo.config import StudyConfig
from hidlr_hpo.report import write_report
from hidlr_hpo.study import optuna_study_name, run_study
from hidlr_hpo.tasks import get_task
from hidlr_hpo.training import train

# Prodigy and GeN's preset amplify round-off: one epoch is enough for a thread count to show in the result.
METHODS = [
    {"name": "prodigy", "kind": "fixed", "optimizer": "prodigy", "lr": 1.0},
    {"name": "gen-preset", "kind": "hidlr", "preset": "gen"},
    {"name": "grid", "kind": "grid", "lrs": [1e-3, 3e-2]},
]
KEY_ATTRS = ("final_val_loss", "best_val_loss", "test_loss", "compute", "curve", "refits", "torch_threads")


@pytest.fixture(autouse=True)
def _float32_and_threads():
    torch.set_default_dtype(torch.float32)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(tmp_path: Path, name: str, methods: list[dict], seeds: list[int], epochs: int = 1) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "name": "repro",
            "task": {"name": "digits"},
            "budget": {"epochs": epochs, "batch_size": 64},
            "seeds": seeds,
            "storage": f"sqlite:///{tmp_path / name}.db",
            "results_dir": str(tmp_path / f"{name}-report"),
            "methods": methods,
        }
    )


def outcomes(cfg: StudyConfig) -> dict[tuple[str, int, tuple], tuple]:
    """(method, seed, params) -> the value and key user attributes of its finished trial."""
    found = {}
    for method in cfg.methods:
        for seed in cfg.seeds:
            study = optuna.load_study(study_name=optuna_study_name(cfg, method, seed), storage=cfg.storage)
            for t in study.get_trials(states=(TrialState.COMPLETE,)):
                key = (method.name, seed, tuple(sorted(t.params.items())))
                found[key] = (t.value, *(t.user_attrs.get(k) for k in KEY_ATTRS))
    return found


def test_numbers_do_not_depend_on_thread_count_order_or_earlier_work(tmp_path):
    first = config(tmp_path, "first", METHODS, [0, 1])
    torch.set_num_threads(1)  # a one-core machine
    run_study(first, show_progress=False, tracking=False)

    # Other work in the process, then the methods and seeds in the other order on a two-core machine.
    torch.set_num_threads(2)
    train(get_task("digits"), lr=1e-2, epochs=1, seed=7, optimizer="adamax")
    torch.rand(5)
    second = config(tmp_path, "second", METHODS[::-1], [1, 0])
    run_study(second, show_progress=False, tracking=False)

    a, b = outcomes(first), outcomes(second)
    assert len(a) == 2 * (1 + 1 + 2)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key  # exactly: every value, curve and refit
    assert torch.get_num_threads() == 2  # the caller's setting is restored


def test_a_resumed_tpe_search_draws_what_an_uninterrupted_one_draws(tmp_path):
    tpe = [{"name": "tpe", "kind": "tpe", "n_trials": 4, "low": 1e-4, "high": 0.3}]
    whole = config(tmp_path, "whole", tpe, [0])
    run_study(whole, show_progress=False, tracking=False)

    resumed = config(tmp_path, "resumed", [{**tpe[0], "n_trials": 2}], [0])
    run_study(resumed, show_progress=False, tracking=False)  # stopped after two trials ...
    study = optuna.load_study(study_name=optuna_study_name(resumed, resumed.methods[0], 0), storage=resumed.storage)
    leave_running_as_killed(study)  # ... with a third left RUNNING by the killed worker
    resumed = config(tmp_path, "resumed", tpe, [0])
    run_study(resumed, show_progress=False, tracking=False)

    def search(cfg: StudyConfig) -> list[tuple[float, float]]:
        s = optuna.load_study(study_name=optuna_study_name(cfg, cfg.methods[0], 0), storage=cfg.storage)
        return [(t.params["lr"], t.value) for t in s.get_trials(states=(TrialState.COMPLETE,))]

    assert len(set(search(whole))) == 4
    assert search(resumed) == search(whole)


def test_the_report_states_the_thread_count_of_the_trials(tmp_path):
    cfg = config(tmp_path, "threads", [METHODS[2]], [0, 1])
    run_study(cfg, show_progress=False, tracking=False)
    pinned = study_module.TRIAL_THREADS
    for (_, _, _), (_, *attrs) in outcomes(cfg).items():
        assert attrs[KEY_ATTRS.index("torch_threads")] == pinned
    text = write_report(cfg).read_text()
    assert f"{pinned} intra-op threads" in text and "different" not in text

    # A trial run elsewhere, with another count: the report says the numbers mix settings.
    study = optuna.load_study(study_name=optuna_study_name(cfg, cfg.methods[0], 1), storage=cfg.storage)
    (trial, _) = study.trials
    study.add_trial(
        optuna.trial.create_trial(
            params=trial.params,
            distributions=trial.distributions,
            value=trial.value,
            user_attrs={**trial.user_attrs, "torch_threads": pinned + 5},
        )
    )
    text = write_report(cfg).read_text()
    assert "different thread counts" in text and f"{pinned + 5} (1 trial)" in text


def test_the_cli_runs_trials_with_the_same_cpu_kernels_on_every_x86_machine(tmp_path):
    study_file = tmp_path / "cli.toml"
    study_file.write_text(
        f'name = "cli"\nseeds = [0]\nstorage = "sqlite:///{tmp_path / "cli.db"}"\n'
        '[task]\nname = "digits"\n[budget]\nepochs = 1\n'
        '[[methods]]\nname = "prodigy"\nkind = "fixed"\noptimizer = "prodigy"\nlr = 1.0\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    command = [sys.executable, "-m", "hidlr_hpo", "run", str(study_file), "--no-tracking"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="cli/prodigy/seed0", storage=f"sqlite:///{tmp_path / 'cli.db'}")
    (trial,) = study.trials
    expected = "AVX2" if torch.cpu._is_avx2_supported() else torch.backends.cpu.get_cpu_capability()
    assert trial.user_attrs["cpu_capability"] == expected
    assert trial.user_attrs["torch_threads"] == study_module.TRIAL_THREADS
