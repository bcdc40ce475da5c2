"""Hi-DLR in Lightning: ``configure_optimizers`` returns a HiDLR, ``HiDLRCallback`` logs its group rates.

    python examples/lightning_digits.py [--epochs 10]

Needs ``pip install 'hidlr-hpo[lightning]'``. Trains an MLP on scikit-learn's digits (offline); the probes are
drawn from the validation DataLoader when a refit is due; the rates go to Lightning's logger (CSV here).
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hidlr_hpo import HiDLR, group_parameters
from hidlr_hpo.integrations.lightning import HiDLRCallback
from hidlr_hpo.tasks import get_task


def cross_entropy(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


class DigitsModule(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.task = get_task("digits")
        self.net = self.task.make_model(0)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.task.train.x, self.task.train.y), batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.task.val.x, self.task.val.y), batch_size=256)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = cross_entropy(self, batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", cross_entropy(self, batch), prog_bar=True)

    def configure_optimizers(self) -> HiDLR:
        base = torch.optim.AdamW(group_parameters(self.net, "layer"), lr=self.lr)
        probes = DataLoader(TensorDataset(self.task.val.x, self.task.val.y), batch_size=64, shuffle=True)
        # loss_fn must not call self.log: probes run outside Lightning's logging hooks.
        return HiDLR(base, self, cross_entropy, probes=probes, total_steps=int(self.trainer.estimated_stepping_batches))


def main(epochs: int = 10, root: str | None = None) -> pl.Trainer:
    torch.manual_seed(0)
    root = root or tempfile.mkdtemp(prefix="hidlr-lightning-")
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=root,
        logger=pl.loggers.CSVLogger(root),
        callbacks=[HiDLRCallback(), pl.callbacks.ModelCheckpoint(save_top_k=-1)],  # a checkpoint per epoch
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsModule())
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    trainer = main(parser.parse_args().epochs)
    hidlr = trainer.optimizers[0]
    print(f"val loss {float(trainer.callback_metrics['val_loss']):.4f}; {hidlr!r}; {hidlr.n_refits} refits")
