from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from hidlr_hpo.cli import app
from hidlr_hpo.tasks import get_task
from hidlr_hpo.training import train


@pytest.fixture(autouse=True)
def _float32():
    torch.set_default_dtype(torch.float32)  # the real tasks run in float32


def test_demo_trains_and_reports():
    result = CliRunner().invoke(app, ["demo", "--epochs", "2", "--no-compare"])
    assert result.exit_code == 0, result.output
    assert "Hi-DLR   final val loss" in result.output
    assert "refits" in result.output


def test_demo_rejects_bad_options():
    result = CliRunner().invoke(app, ["demo", "--mode", "diagonal"])
    assert result.exit_code != 0
    assert "mode must be diag or full" in result.output


def test_digits_training_counts_probe_compute():
    task = get_task("digits")
    plain = train(task, lr=1e-3, epochs=1, seed=0)
    tuned = train(task, lr=1e-3, epochs=1, seed=0, hidlr={"interval": 5})
    steps = math.ceil(len(task.train) / 64)
    assert plain.steps == tuned.steps == steps
    assert plain.compute == 3 * len(task.train) and plain.probe_compute == 0
    h = tuned.hidlr
    # One probe forward per design point (2K + 1 = 7 for three layer groups) on a 64-example batch.
    assert len(h.history) == math.ceil(steps / 5)
    assert h.probe_forwards == 7 * len(h.history)
    assert tuned.probe_compute == 64 * h.probe_forwards
    assert tuned.compute == plain.compute + tuned.probe_compute
    assert math.isfinite(tuned.final_val_loss) and tuned.final_val_loss < 2.3  # below chance (ln 10)


def test_gradient_slope_needs_the_training_batch_as_probe():
    from hidlr_hpo.tasks import get_task
    from hidlr_hpo.training import train

    with pytest.raises(ValueError, match="needs probe='train'"):
        train(get_task("digits"), lr=1e-3, epochs=1, hidlr={"slope": "gradient"}, probe="heldout")
