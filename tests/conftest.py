from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Exact maths in float64, and every test starts from the same random state."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _mlflow_store_in_tmp(tmp_path, monkeypatch):
    """Studies track to MLflow by default: keep each test's store in its own folder, never the repository's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(autouse=True)
def _cli_does_not_pin_kernels_in_pytest(monkeypatch):
    """`hidlr run` pins torch's CPU kernels to AVX2 (ATEN_CPU_CAPABILITY) for its own process; a CLI test runs
    it inside pytest's, where the variable would outlive the test and torch.compile in a later test produced
    NaN losses under it (seen with torch 2.13 on an AVX-512 CPU). The pinning itself is tested in
    subprocesses (tests/test_reproducible.py)."""
    monkeypatch.setattr("hidlr_hpo.cli.pin_cpu_kernels", lambda: None)


def leave_running_as_killed(study):
    """A trial left RUNNING by a worker of this machine that was killed (its process no longer exists)."""
    import socket
    import subprocess
    import sys

    trial = study.ask()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    trial.set_user_attr("owner", f"{socket.gethostname()}:{int(dead.stdout)}")
    return trial


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on a loopback port and a temporary data folder, for the session; skipped,
    with the reason, where PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does)."""
    import glob
    import os
    import shutil
    import socket
    import subprocess
    import tempfile
    from pathlib import Path

    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if found is None:
        pytest.skip("PostgreSQL is not installed here (Debian: apt-get install postgresql)")
    bindir = Path(found).resolve().parent
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="hidlr-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a 'postgres' user to run PostgreSQL as")
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data / "db"), "-U", "hidlr", "--auth=trust")
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w", "start")
    try:
        yield f"postgresql+psycopg://hidlr@127.0.0.1:{port}/postgres"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)
