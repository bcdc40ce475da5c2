"""Bad input is one clear error at load time, with exit code 2 and nothing written (issue 13)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from hidlr_hpo.cli import app

STUDY = """
name = "{name}"
seeds = {seeds}
[task]
name = "digits"
[[methods]]
name = "{method}"
kind = "fixed"
"""


@pytest.mark.parametrize(
    "name, seeds, method, message",
    [
        ("ok", "[-1]", "m", "seeds.0: Input should be greater than or equal to 0"),
        ("ok", "[4294967296]", "m", "seeds.0: Input should be less than or equal to 4294967295"),
        ("ok", "[0]", "../escape", "methods.0.fixed.name: String should match pattern"),
        ("ok", "[0]", "a/b", "methods.0.fixed.name: String should match pattern"),
        ("..", "[0]", "m", "name: String should match pattern"),
    ],
)
def test_bad_names_and_seeds_are_refused_when_the_file_is_loaded(tmp_path, monkeypatch, name, seeds, method, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(STUDY.format(name=name, seeds=seeds, method=method))
    for command in ("run", "report"):
        result = CliRunner().invoke(app, [command, "s.toml"])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_demo_on_a_device_this_torch_cannot_use_is_a_usage_error():
    result = CliRunner().invoke(app, ["demo", "--device", "cuda", "--epochs", "1"])
    assert result.exit_code == 2 and "cannot use device 'cuda' here" in " ".join(result.output.split())


METHOD = """
name = "bad"
seeds = [0]
[task]
name = "{task}"
{task_options}
[[methods]]
name = "grid"
kind = "grid"
lrs = [1e-3, 1e-2]
[[methods]]
name = "m"
{method}
"""
HIDLR = 'kind = "hidlr"\n'
FIXED = 'kind = "fixed"\n'
SAGE = 'kind = "grid"\nlrs = [1e-3, 1e-2]\noptimizer = "adamw-sage"\n'


@pytest.mark.parametrize(
    "task, task_options, method, message",
    [
        ("digitz", "", FIXED, "unknown task 'digitz'"),
        ("digits", "options = { hidden = 3 }", FIXED, "task 'digits' with options {'hidden': 3}: "),
        ("digits", "", HIDLR + "options = { bogus = 1 }", "methods.1 (m): HiDLR got an unexpected keyword argument"),
        ("digits", "", HIDLR + "options = { delta = -1 }", "methods.1 (m): delta must be a positive finite number"),
        ("digits", "", HIDLR + "options = { lr_bounds = [1.0, 0.1] }", "methods.1 (m): lr_bounds must be"),
        ("digits", "", HIDLR + "options = { min_r2 = 2 }", "methods.1 (m): min_r2 must be <= 1 or None, got 2"),
        ("digits", "", HIDLR + 'grouping = "bogus"', "methods.1 (m): unknown grouping strategy 'bogus'"),
        ("digits", "", FIXED + "optimizer_options = { betas = 3 }", "methods.1 (m): "),
        ("digits", "", FIXED + "optimizer_options = { bogus = 3 }", "methods.1 (m): "),
        ("digits", "", SAGE + 'optimizer_options = { plain_groups = ["No"] }', "methods.1 (m): plain_groups names"),
    ],
)  # fmt: skip
def test_bad_task_and_method_options_are_refused_before_anything_runs(
    tmp_path, monkeypatch, task, task_options, method, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(METHOD.format(task=task, task_options=task_options, method=method))
    result = CliRunner().invoke(app, ["run", "s.toml"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and message in output, output
    assert "Traceback" not in output and len(result.output.strip().splitlines()) <= 4, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]  # no database, no mlflow.db, no results


def test_report_to_a_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_default_dtype(torch.float32)  # the tasks' data are float32 (conftest's default is float64)
    (tmp_path / "s.toml").write_text(STUDY.format(name="ok", seeds="[0]", method="m") + "[budget]\nepochs = 1\n")
    ran = CliRunner().invoke(app, ["run", "s.toml", "--no-tracking", "--no-progress"])
    assert ran.exit_code == 0, ran.output
    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(app, ["report", "s.toml", "--no-tracking", "--out", "a-file/report"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "cannot write the report to a-file/report: Not a directory" in output, (
        output + ran.output
    )
    assert "Traceback" not in output
