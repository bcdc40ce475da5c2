"""A study file names its own task by import string; mistakes are caught when the file is loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import torch

from hidlr_hpo.config import load_study_config
from hidlr_hpo.study import optuna_study_name, run_study
from hidlr_hpo.tasks import Split, get_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

STUDY = """
name = "own"
seeds = [0]
storage = "sqlite:///{db}"
results_dir = "{out}"

[task]
name = "{task}"
options = {options}

[budget]
epochs = 2
batch_size = 32

[[methods]]
name = "hidlr"
kind = "hidlr"
"""


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch):
    torch.set_default_dtype(torch.float32)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("own_task", None)


def study_file(tmp_path, task="own_task:wine_task", options="{ hidden = 8 }"):
    path = tmp_path / "own.toml"
    path.write_text(STUDY.format(db=tmp_path / "s.db", out=tmp_path / "out", task=task, options=options))
    return path


def test_an_own_task_by_import_string_runs_in_a_study(tmp_path):
    cfg = load_study_config(study_file(tmp_path))
    run_study(cfg, show_progress=False, tracking=False)
    study = optuna.load_study(study_name=optuna_study_name(cfg, cfg.methods[0], 0), storage=cfg.storage)
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["test_acc"] > 0.5
    task = get_task("own_task:wine_task", hidden=8)
    assert (len(task.train), len(task.val), len(task.test)) == (106, 36, 36)
    assert sum(p.numel() for p in task.make_model(0).parameters()) == 13 * 8 + 8 + 8 * 3 + 3


@pytest.mark.parametrize(
    "task, options, message",
    [
        ("wine", "{}", "unknown task 'wine': use one of"),
        ("no_such_module:make", "{}", "cannot import 'no_such_module'"),
        ("own_task:no_such_factory", "{}", "has no callable 'no_such_factory'"),
        ("own_task:wine_task", "{ bogus = 1 }", r"options \['bogus'\] do not fit wine_task\(\)"),
        ("digits", "{ depth = 3 }", r"options \['depth'\] do not fit digits_task\(\)"),
    ],
)
def test_a_bad_task_is_reported_when_the_file_is_loaded(tmp_path, task, options, message):
    path = study_file(tmp_path, task, options)
    with pytest.raises(ValueError, match=message) as error:
        load_study_config(path)
    assert str(path) in str(error.value) and not (tmp_path / "s.db").exists()  # nothing half-written


def test_a_split_from_a_dataloader_of_pairs():
    data = torch.utils.data.TensorDataset(torch.randn(10, 2), torch.arange(10))
    split = Split.from_dataset(torch.utils.data.DataLoader(data, batch_size=3))
    assert torch.equal(split.y, torch.arange(10))
    with pytest.raises(ValueError, match="pairs"):
        Split.from_dataset(torch.utils.data.TensorDataset(torch.randn(4, 2)))
