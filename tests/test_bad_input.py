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
