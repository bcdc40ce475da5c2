from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch
from conftest import leave_running_as_killed
from optuna.trial import TrialState
from typer.testing import CliRunner

from hidlr_hpo.cli import app
from hidlr_hpo.config import StudyConfig, load_study_config
from hidlr_hpo.report import collect, write_report
from hidlr_hpo.study import optuna_study_name, run_study

REPO = Path(__file__).resolve().parents[1]

SMALL = """
name = "small"
seeds = [0]
storage = "sqlite:///{db}"
results_dir = "{out}"

[task]
name = "digits"

[budget]
epochs = 1
batch_size = 128

[[methods]]
name = "hidlr"
kind = "hidlr"

[[methods]]
name = "grid"
kind = "grid"
lrs = [1e-3, 1e-2]

[[methods]]
name = "tpe"
kind = "tpe"
n_trials = 2
"""


@pytest.fixture(autouse=True)
def _float32():
    torch.set_default_dtype(torch.float32)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def small(tmp_path) -> tuple[Path, StudyConfig]:
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(db=tmp_path / "studies.db", out=tmp_path / "report"))
    return path, load_study_config(path)


def trials(cfg, name, state=TrialState.COMPLETE):
    method = next(m for m in cfg.methods if m.name == name)
    study = optuna.load_study(study_name=optuna_study_name(cfg, method, 0), storage=cfg.storage)
    return study, study.get_trials(states=(state,))


def test_every_committed_study_file_is_valid():
    files = sorted((REPO / "studies").glob("*.toml"))
    assert files
    for path in files:
        cfg = load_study_config(path)
        assert cfg.methods and cfg.seeds


def test_invalid_study_files_name_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL.format(db="x.db", out="o").replace("lrs = [1e-3, 1e-2]", "lrs = [1e-3, -1.0]"))
    with pytest.raises(ValueError, match=r"bad.toml: invalid study file\n  methods.1.grid.lrs: .*positive"):
        load_study_config(bad)
    bad.write_text(SMALL.format(db="x.db", out="o").replace("epochs = 1", "epochs = 1\nepoch = 3"))
    with pytest.raises(ValueError, match=r"budget.epoch: Extra inputs are not permitted"):
        load_study_config(bad)
    bad.write_text(SMALL.format(db="x.db", out="o").replace('name = "tpe"', 'name = "grid"'))
    with pytest.raises(ValueError, match=r"repeated: \['grid'\]"):
        load_study_config(bad)
    bad.write_text("name = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_study_config(bad)


def test_one_worker_reports_each_seed_as_it_finishes(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(
        SMALL.format(db=tmp_path / "studies.db", out=tmp_path / "report").replace("seeds = [0]", "seeds = [0, 1]")
    )
    cfg = load_study_config(path)
    calls: list[list[int]] = []
    run_study(cfg, show_progress=False, tracking=False, on_seed_done=calls.append)
    assert calls == [[0], [0, 1]]  # seed 0's table before seed 1 starts, then the final one


def test_run_stores_one_trial_per_configuration_and_resumes(small):
    path, cfg = small
    run_study(cfg, show_progress=False)
    study, grid = trials(cfg, "grid")
    assert sorted(t.params["lr"] for t in grid) == [1e-3, 1e-2]
    for t in grid:
        assert t.value == pytest.approx(t.user_attrs["final_val_loss"])
        assert t.user_attrs["compute"] == 3 * 1078  # one epoch, no probes
    _, (hidlr,) = trials(cfg, "hidlr")
    assert hidlr.user_attrs["compute"] > 3 * 1078 and hidlr.user_attrs["probe_compute"] > 0
    assert len(trials(cfg, "tpe")[1]) == 2

    before = {t.number for t in grid}
    run_study(cfg, show_progress=False)  # nothing left to do
    assert {t.number for t in trials(cfg, "grid")[1]} == before

    # A killed worker of this machine left a trial RUNNING, and the grid grew by one value: only that is trained.
    leave_running_as_killed(study)
    bigger = StudyConfig.model_validate(
        {
            **cfg.model_dump(),
            "methods": [
                m.model_dump() if m.name != "grid" else {**m.model_dump(), "lrs": [1e-3, 1e-2, 3e-3]}
                for m in cfg.methods
            ],
        }
    )
    run_study(bigger, show_progress=False)
    _, grid = trials(bigger, "grid")
    assert sorted(t.params["lr"] for t in grid) == [1e-3, 3e-3, 1e-2]
    assert len(trials(bigger, "grid", TrialState.FAIL)[1]) == 1
    assert len(trials(bigger, "grid", TrialState.RUNNING)[1]) == 0


def test_report_writes_table_and_plots(small):
    path, cfg = small
    run_study(cfg, show_progress=False)
    summaries = {s.name: s for s in collect(cfg)}
    grid = summaries["grid"]
    assert grid.trials_per_seed == [2] and grid.compute == [2 * 3 * 1078]
    assert grid.selected[0].value == min(t.value for t in grid.searches[0])
    report = write_report(cfg)
    text = report.read_text()
    for name in ("hidlr", "grid", "tpe"):
        assert f"| {name} |" in text
    assert "## Paired comparisons over seeds" in text
    assert "| `hidlr` | tie " in text  # one seed: no interval, so never called a win or a loss
    for png in ("val_loss_vs_compute.png", "lrs_hidlr.png"):
        data = (report.parent / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_run_and_report(small, tmp_path, monkeypatch):
    path, cfg = small
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--quick"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(path), "--quick"])
    assert result.exit_code == 0, result.output
    # A quick run is kept apart: its own Optuna studies, its own results folder, never the study's.
    assert (tmp_path / "runs" / "quick" / "small" / "report.md").is_file()
    assert not Path(cfg.results_dir).exists()
    names = {s.study_name for s in optuna.get_all_study_summaries(cfg.storage)}
    assert names == {"small-quick/hidlr/seed0", "small-quick/grid/seed0", "small-quick/tpe/seed0"}
    assert "val loss" in result.output and "compute" in result.output  # the terminal table
    assert all(len(line) <= 80 for line in result.output.splitlines())
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("hidlr-hpo ")
    bad = path.with_name("bad.toml")
    bad.write_text(path.read_text().replace("n_trials = 2", "n_trials = 0"))
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 2 and "methods.2.tpe.n_trials" in result.output


BASELINES = """
[[methods]]
name = "gen-preset"
kind = "hidlr"
preset = "gen"

[[methods]]
name = "sage"
kind = "grid"
optimizer = "adamw-sage"
optimizer_options = { plain_groups = ["Linear_4"], beta3 = 0.8 }
lrs = [1e-3, 1e-2]

[[methods]]
name = "cosine"
kind = "fixed"
schedule = "cosine"
warmup = 0.1

[[methods]]
name = "schedulefree"
kind = "fixed"
optimizer = "schedulefree-adamw"
lr = 0.0025
warmup = 0.1
"""


def test_baselines_run_by_name_in_a_study(small):
    path, _ = small
    path.write_text(path.read_text() + BASELINES)
    cfg = load_study_config(path)
    assert next(m for m in cfg.methods if m.name == "gen-preset").grouping == "single"
    run_study(cfg, show_progress=False)
    _, (gen,) = trials(cfg, "gen-preset")
    steps = -(-1078 // 128)
    assert gen.user_attrs["refits"]["step"] == list(range(0, steps, 4))  # GeN's interval 4, one group
    assert len(gen.user_attrs["refits"]["group_names"]) == 1
    _, sage = trials(cfg, "sage")
    assert len(sage) == 2
    effective = sage[0].user_attrs["curve"]["effective_lrs"][-1]
    assert effective[-1] == sage[0].params["lr"]  # the plain head steps at its lr
    assert all(0 < e != sage[0].params["lr"] for e in effective[:-1])  # sensitivity-scaled groups do not
    _, (cosine,) = trials(cfg, "cosine")
    last_step_rate = 1e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 9))  # 9 steps, no warm-up step: p = 8/9 at the last
    assert cosine.params == {} and cosine.user_attrs["curve"]["lrs"][-1] == pytest.approx([last_step_rate] * 3)
    _, (sf,) = trials(cfg, "schedulefree")
    assert sf.value < 2.0  # trained: ln(10) = 2.30 is chance
    report = write_report(cfg).read_text()
    assert "AdamW-SAGE" in report and "cosine decay" in report and "sage_vs_hidlr.png" in report
    assert cfg.results_dir and (Path(cfg.results_dir) / "sage_vs_hidlr.png").is_file()


def test_baseline_fields_are_validated(small):
    path, _ = small
    for text, match in [
        (
            '[[methods]]\nname = "x"\nkind = "fixed"\noptimizer = "adamm"\n',
            r"methods.3.fixed.optimizer: .*unknown optimizer 'adamm'",
        ),
        ('[[methods]]\nname = "x"\nkind = "grid"\nlrs = [1e-3, 1e-2]\nschedule = "step"\n', r"methods.3.grid.schedule"),
        ('[[methods]]\nname = "x"\nkind = "hidlr"\npreset = "gen"\ngrouping = "layer"\n', r"preset 'gen' tunes one"),
        ('[[methods]]\nname = "x"\nkind = "hidlr"\noptions = { slope = "gradient" }\n', r"needs probe = 'train'"),
        ('[[methods]]\nname = "x"\nkind = "hidlr"\noptimizer = "prodigy"\n', r"cannot wrap 'prodigy'"),
    ]:
        path.write_text(SMALL.format(db="x.db", out="o") + text)
        with pytest.raises(ValueError, match=match):
            load_study_config(path)


def test_a_win_or_a_loss_needs_a_paired_interval_that_excludes_zero():
    from optuna.trial import create_trial

    from hidlr_hpo.report import MethodSummary, paired_verdict

    def summary(values, seeds=(0, 1, 2, 3, 4)):
        trials = [create_trial(value=v, user_attrs={"test_loss": v}) for v in values]
        return MethodSummary("m", "hidlr", selected=trials, seeds=list(seeds))

    grid = summary([0.10, 0.12, 0.09, 0.11, 0.10])
    assert paired_verdict(summary([0.08, 0.10, 0.07, 0.09, 0.08]), grid, "final_val_loss").startswith(
        "**better** -0.0200"
    )
    assert paired_verdict(summary([0.12, 0.14, 0.11, 0.13, 0.12]), grid, "test_loss").startswith("**worse** +0.0200")
    noisy = summary([0.05, 0.16, 0.08, 0.15, 0.06])  # lower on average, but not on every seed
    assert paired_verdict(noisy, grid, "final_val_loss").startswith("tie")
    # Paired by seed, not by position: a method run on seeds 1..3 only is compared with the grid's seeds 1..3.
    assert paired_verdict(summary([0.10, 0.07, 0.09], seeds=(1, 2, 3)), grid, "final_val_loss") == (
        "**better** -0.0200 [-0.0200, -0.0200]"
    )


def test_a_setting_added_later_at_its_default_does_not_refuse_stored_studies(small):
    from hidlr_hpo.study import check_budgets

    _, cfg = small
    run_study(cfg, show_progress=False, tracking=False)
    study, _ = trials(cfg, "tpe")
    stored = study.user_attrs["fingerprint"]
    older = {**stored, "method": {k: v for k, v in stored["method"].items() if k != "checks_per_epoch"}}
    study.set_user_attr("fingerprint", older)  # as made by a version without the setting
    check_budgets(cfg, cfg.storage)  # accepted: the setting is at its default
    study.set_user_attr("fingerprint", {**stored, "method": {**stored["method"], "checks_per_epoch": 3}})
    with pytest.raises(
        ValueError, match=r"'small/tpe/seed0' run with other settings \(method.checks_per_epoch 3 -> default\)"
    ):
        check_budgets(cfg, cfg.storage)
