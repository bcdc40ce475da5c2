"""Take the MLflow UI and optuna-dashboard screenshots of the docs: a small real study, real servers, headless Chromium.

    pip install playwright        # the Python driver only: it drives the system's Chromium, downloads nothing
    apt-get install chromium      # Debian's Chromium
    python docs/screenshots.py    # writes docs/images/mlflow-*.png and optuna-dashboard-*.png (a few minutes)

The study is digits with one seed and four epochs (Hi-DLR, a 3-point grid, the outer search with successive
halving), run by ``hidlr_hpo.study.run_study`` into a temporary SQLite store; ``mlflow server`` serves it on a
loopback port and Playwright opens the pages a user would, in MLflow's "Model training" view; then
``optuna-dashboard`` serves the study's Optuna storage on another loopback port for the Optuna side.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

STUDY = """
name = "digits-tour"
seeds = [0]
storage = "sqlite:///{root}/optuna.db"
results_dir = "{root}/report"

[task]
name = "digits"

[budget]
epochs = 4
batch_size = 64

[[methods]]
name = "hidlr-diag"
kind = "hidlr"

[[methods]]
name = "grid"
kind = "grid"
lrs = [1e-3, 1e-2, 1e-1]

[[methods]]
name = "hidlr-search"
kind = "hidlr-search"
n_trials = 4
low = 1e-4
high = 0.1
pruner = "successive-halving"
"""

ML_VIEW = "workflowType=machine_learning"  # MLflow 3 otherwise opens its GenAI pages


def run_study(root: Path) -> str:
    from hidlr_hpo.config import load_study_config
    from hidlr_hpo.study import run_study as run

    path = root / "tour.toml"
    path.write_text(STUDY.format(root=root))
    uri = f"sqlite:///{root}/mlflow.db"
    run(load_study_config(path), show_progress=False, tracking_uri=uri)
    return uri


def _wait(server: subprocess.Popen, url: str, what: str) -> subprocess.Popen:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"{what} did not answer {url} within 60 s")


def serve(uri: str, port: int, root: Path) -> subprocess.Popen:
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [mlflow, "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(  # noqa: S603 - our own command line
        [*command, "--workers", "1", "--default-artifact-root", str(root / "mlartifacts")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return _wait(server, f"http://127.0.0.1:{port}/health", "mlflow server")


def serve_dashboard(storage: str, port: int) -> subprocess.Popen:
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or "optuna-dashboard"
    server = subprocess.Popen(  # noqa: S603 - our own command line
        [dashboard, storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return _wait(server, f"http://127.0.0.1:{port}/api/studies", "optuna-dashboard")


def shoot_dashboard(port: int, out: Path) -> list[Path]:
    """The Optuna side: the list of studies (one per method and seed), then the outer search's history."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    base = f"http://127.0.0.1:{port}/dashboard"
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 820})
        page.goto(base)
        page.wait_for_selector("text=digits-tour/hidlr-search/seed0", timeout=60000)
        page.wait_for_timeout(1500)
        shots.append(out / "optuna-dashboard-studies.png")
        page.screenshot(path=str(shots[-1]))
        page.get_by_text("digits-tour/hidlr-search/seed0").first.click()
        page.wait_for_selector("svg.main-svg", state="attached", timeout=120000)  # the history plot (plotly)
        page.wait_for_timeout(3000)  # the plots draw
        shots.append(out / "optuna-dashboard-search.png")
        page.screenshot(path=str(shots[-1]))
        browser.close()
    return shots


def shoot(uri: str, port: int, out: Path) -> list[Path]:
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("digits-tour")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("hidlr.role") == "study")
    hidlr = next(r for r in runs if r.data.params.get("method") == "hidlr-diag")
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 820})

        def close_assistant() -> None:
            close = page.get_by_role("button", name="Close")
            if close.count():
                close.first.click()
                page.wait_for_timeout(300)

        def save(name: str, charts: bool = False) -> None:
            if charts:  # plotly has drawn the charts (on a busy machine they take a while after the page)
                page.wait_for_selector("svg.main-svg", state="attached", timeout=120000)
            page.wait_for_timeout(3000)  # charts animate in
            path = out / name
            page.screenshot(path=str(path))
            shots.append(path)

        # 1. The experiment's runs: the study's parent run, expanded to one child run per Optuna trial.
        page.goto(f"{base}/runs?{ML_VIEW}")
        page.wait_for_selector("text=digits-tour", timeout=60000)
        close_assistant()
        page.locator(".ag-row .ag-cell").filter(has_text="digits-tour").first.locator("button").first.click()
        page.wait_for_selector("text=hidlr-diag seed0 trial0", timeout=30000)
        save("mlflow-runs.png")

        # 2. Every trial's validation loss side by side (the chart view; the parent's summary hidden).
        page.goto(f"{base}/runs?{ML_VIEW}&compareRunsMode=CHART")
        search = page.get_by_placeholder("Search metric charts")
        search.first.wait_for(timeout=60000)
        page.locator(".ag-row").filter(has_text="digits-tour").first.locator("label").first.click()
        search.first.fill("val_loss")
        save("mlflow-compare.png", charts=True)

        # 3. One Hi-DLR trial: the rate Hi-DLR chose for each group at every refit (b and A_kk below).
        page.goto(f"{base}/runs/{hidlr.info.run_id}/model-metrics?{ML_VIEW}")
        search = page.get_by_placeholder("Search metric charts")
        search.first.wait_for(timeout=60000)
        close_assistant()
        search.first.fill("lr/")
        save("mlflow-hidlr-rates.png", charts=True)

        # 4. The parent run: the study's settings as params and each method's result as summary metrics.
        page.goto(f"{base}/runs/{parent.info.run_id}?{ML_VIEW}")
        page.wait_for_selector("text=grid/final_val_loss", timeout=60000)
        close_assistant()
        save("mlflow-parent.png")
        browser.close()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images")
    parser.add_argument("--port", type=int, default=5057)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = run_study(root)
        server = serve(uri, args.port, root)
        try:
            for path in shoot(uri, args.port, args.out):
                print(path)
        finally:
            server.terminate()
            server.wait(timeout=30)
        dashboard = serve_dashboard(f"sqlite:///{root}/optuna.db", args.port + 1)
        try:
            for path in shoot_dashboard(args.port + 1, args.out):
                print(path)
        finally:
            dashboard.terminate()
            dashboard.wait(timeout=30)


if __name__ == "__main__":
    main()
