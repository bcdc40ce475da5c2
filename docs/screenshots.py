"""Take the MLflow UI screenshots of docs/tracking.md: a small real study, a real MLflow server, headless Chromium.

    pip install playwright        # the Python driver only: it drives the system's Chromium, downloads nothing
    apt-get install chromium      # Debian's Chromium
    python docs/screenshots.py    # writes docs/images/mlflow-*.png (about a minute)

The study is digits with one seed and four epochs (Hi-DLR, a 3-point grid, the outer search with successive
halving), run by ``hidlr_hpo.study.run_study`` into a temporary SQLite store; ``mlflow server`` serves it on a
loopback port and Playwright opens the pages a user would, in MLflow's "Model training" view.
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


def serve(uri: str, port: int, root: Path) -> subprocess.Popen:
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [mlflow, "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(  # noqa: S603 - our own command line
        [*command, "--workers", "1", "--default-artifact-root", str(root / "mlartifacts")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"mlflow server did not start on port {port} within 60 s")


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

        def save(name: str) -> None:
            page.wait_for_timeout(1500)  # charts animate in
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
        save("mlflow-compare.png")

        # 3. One Hi-DLR trial: the rate Hi-DLR chose for each group at every refit (b and A_kk below).
        page.goto(f"{base}/runs/{hidlr.info.run_id}/model-metrics?{ML_VIEW}")
        search = page.get_by_placeholder("Search metric charts")
        search.first.wait_for(timeout=60000)
        close_assistant()
        search.first.fill("lr/")
        save("mlflow-hidlr-rates.png")

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


if __name__ == "__main__":
    main()
