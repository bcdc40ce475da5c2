"""A bad Optuna storage URL is one clear error at the boundary, before anything is written (issue 13)."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from hidlr_hpo.cli import app
from hidlr_hpo.config import load_study_config
from hidlr_hpo.storage import check_storage_url
from hidlr_hpo.study import run_study

STUDY = """
name = "tiny"
seeds = [0]
results_dir = "report"

[task]
name = "digits"

[budget]
epochs = 1
batch_size = 256

[[methods]]
name = "adamw"
kind = "fixed"
lr = 1e-3
"""


@pytest.mark.parametrize(
    "url, message",
    [
        ("notaurl", "is not a database URL; use one like sqlite:///"),
        ("sqlite:///no/such/folder/x.db", "the folder 'no/such/folder' does not exist"),
        (
            "mysql+mysqldb://user@127.0.0.1/db",
            "needs the database driver 'MySQLdb', which is not installed: pip install 'mysqlclient'",
        ),
        ("nosuchdb://user@host/db", "SQLAlchemy knows no database 'nosuchdb'"),
        ("postgresql+psycopg://user@127.0.0.1/db", "pip install 'psycopg[binary]'"),  # brackets survive rich
    ],
)
def test_bad_storage_urls_fail_at_the_cli_with_one_message_and_no_files(tmp_path, monkeypatch, url, message):
    driver = {"mysql+mysqldb": "MySQLdb", "postgresql+psycopg": "psycopg"}.get(url.split(":")[0])
    if driver:  # installed or not (the tests install psycopg), this process cannot import it
        monkeypatch.setitem(sys.modules, driver, None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(STUDY)
    for command in ("run", "report"):
        result = CliRunner().invoke(app, [command, "tiny.toml", "--storage", url])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output  # rich may wrap the line
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]  # no database, no mlflow.db, no report


def test_the_study_files_own_storage_is_checked_and_the_library_checks_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = STUDY.replace("results_dir", 'storage = "sqlite:///missing/x.db"\nresults_dir')
    (tmp_path / "tiny.toml").write_text(own)
    result = CliRunner().invoke(app, ["run", "tiny.toml"])
    assert result.exit_code == 2 and "'missing' does not exist" in " ".join(result.output.split())
    cfg = load_study_config(tmp_path / "tiny.toml")
    with pytest.raises(ValueError, match="'missing' does not exist"):
        run_study(cfg, show_progress=False, tracking=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_good_urls_pass_unchanged(tmp_path):
    for url in (f"sqlite:///{tmp_path / 'x.db'}", "sqlite:///relative.db", "sqlite://", "sqlite:///:memory:"):
        assert check_storage_url(url) == url
    assert not (tmp_path / "x.db").exists()  # checked, not created


def test_report_on_a_study_never_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(STUDY)
    result = CliRunner().invoke(app, ["report", "tiny.toml"])
    assert result.exit_code == 1 and "there is no database 'hidlr-studies.db'" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]  # no empty database, folder or mlflow.db
