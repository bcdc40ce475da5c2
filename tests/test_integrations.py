"""Each example in examples/ runs against the real framework on a tiny budget (Lightning, Hugging Face, PyTorch)."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _float32():
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("compile_model", [False, True], ids=["eager", "compiled"])
def test_plain_pytorch_with_dataloaders_autocast_gradscaler_and_compile(compile_model):
    val_loss = example("plain_pytorch").main(epochs=1, compile_model=compile_model, verbose=False)
    assert math.isfinite(val_loss) and val_loss < 2.3  # below chance (ln 10) after one epoch


def test_lightning_runs_hidlr_logs_its_rates_and_checkpoints_it(tmp_path):
    module = example("lightning_digits")
    trainer = module.main(epochs=2, root=str(tmp_path))
    hidlr = trainer.optimizers[0]
    assert hidlr.step_count == 34 and hidlr.n_refits == 4  # 2 epochs x 17 batches; refits at 0, 10, 20, 30
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    logged = [float(r["lr/Linear_0"]) for r in rows if r.get("lr/Linear_0")]
    assert len(logged) == 34 and logged[-1] == pytest.approx(hidlr.lrs()[0])
    # Each epoch's logged val_loss went to the plateau guard (HiDLR.report_validation).
    val_losses = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(val_losses) == 2 and hidlr.best_validation == pytest.approx(min(val_losses), rel=1e-6)
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))  # epoch=0 (17 steps), epoch=1 (34 steps)
    assert torch.load(checkpoints[-1], weights_only=False)["optimizer_states"][0]["hidlr"]["n_refits"] == 4
    # Resuming from the first epoch restores HiDLR through Lightning's optimizer.load_state_dict, and the
    # second half of the run is the uninterrupted one's.
    import lightning.pytorch as pl

    resumed = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=str(tmp_path / "resumed"), enable_checkpointing=False)  # fmt: skip
    resumed.fit(module.DigitsModule(), ckpt_path=str(checkpoints[0]))
    again = resumed.optimizers[0]
    assert again.step_count == 34 and again.n_refits == 4 and again.lrs() == hidlr.lrs()


def test_huggingface_trainer_runs_hidlr_on_minilm_with_lora(tmp_path):
    pytest.importorskip("peft")
    trainer = example("huggingface_minilm").main(samples=160, epochs=1, output_dir=str(tmp_path))
    hidlr = trainer.optimizer.optimizer  # accelerate's wrapper around it
    assert hidlr.n_refits == 1 and hidlr.step_count == 3
    first = hidlr.history[0]
    assert first.fired.get("dead") == [0]  # LoRA's A does not move the loss while B = 0: kept, not fitted
    logs = [entry for entry in trainer.state.log_history if "lr/lora_B" in entry]
    assert logs and logs[-1]["hidlr/refits"] == 1
    evaluated = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluated) == 1 and hidlr.best_validation == pytest.approx(evaluated[0], rel=1e-6)
