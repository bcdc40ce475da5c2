"""Hi-DLR in a plain PyTorch loop: DataLoaders, mixed precision (autocast + GradScaler) and torch.compile.

    python examples/plain_pytorch.py [--epochs 20] [--compile] [--device cpu|cuda]

Trains an MLP on scikit-learn's digits (offline) with AdamW under Hi-DLR, one learning rate per layer, the
probes drawn from the validation DataLoader when a refit is due, and prints each epoch as it ends.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hidlr_hpo import HiDLR, group_parameters
from hidlr_hpo.tasks import get_task


def main(epochs: int = 20, compile_model: bool = False, device: str = "cpu", verbose: bool = True) -> float:
    torch.manual_seed(0)
    task = get_task("digits").to(device)
    train_loader = DataLoader(TensorDataset(task.train.x, task.train.y), batch_size=64, shuffle=True)
    val_loader = DataLoader(TensorDataset(task.val.x, task.val.y), batch_size=64, shuffle=True)
    model = task.make_model(0).to(device)
    net = torch.compile(model) if compile_model else model  # groups and probes see the same parameters
    amp_dtype = torch.bfloat16 if device == "cpu" else torch.float16

    def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        with torch.autocast(device_type=device, dtype=amp_dtype):  # probes run under the same autocast
            return nn.functional.cross_entropy(module(x), y)

    base = torch.optim.AdamW(group_parameters(net, "layer"), lr=1e-3)
    hidlr = HiDLR(base, net, loss_fn, probes=val_loader, total_steps=epochs * len(train_loader))
    scaler = torch.amp.GradScaler(device)
    for epoch in range(epochs):
        for batch in train_loader:
            scaler.scale(loss_fn(net, batch)).backward()
            scaler.step(hidlr)  # skips the step and the refit if the gradients overflowed
            scaler.update()
            hidlr.zero_grad()
        with torch.no_grad():
            net.eval()
            val_loss = sum(float(loss_fn(net, b)) * len(b[1]) for b in val_loader) / len(task.val)
            net.train()
        hidlr.report_validation(val_loss)  # the plateau guard: halves the rates if the validation loss rises
        if verbose:
            rates = ", ".join(f"{n}={lr:.2e}" for n, lr in zip(hidlr.group_names, hidlr.lrs(), strict=True))
            print(f"epoch {epoch + 1:>3}  val loss {val_loss:.4f}  rates {rates}", flush=True)
    return val_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    main(args.epochs, args.compile, args.device)
