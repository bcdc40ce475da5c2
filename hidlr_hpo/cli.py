"""The ``hidlr`` command."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .groups import group_names, group_parameters
from .tasks import get_task
from .training import EpochLog, train

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Hi-DLR: per-group learning rates tuned inside one run."
)
console = Console()


@app.callback()
def main() -> None:
    """Hi-DLR: Hessian-informed differential learning rates."""


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(min=1, help="training epochs")] = 30,
    lr: Annotated[float, typer.Option(help="starting learning rate of every group (AdamW)")] = 1e-3,
    mode: Annotated[str, typer.Option(help="diag or full")] = "diag",
    interval: Annotated[int, typer.Option(min=1, help="refit every N steps")] = 10,
    seed: Annotated[int, typer.Option()] = 0,
    probe: Annotated[str, typer.Option(help="probe batch: heldout (validation) or train")] = "heldout",
    horizon: Annotated[bool, typer.Option(help="scale the rates down linearly over the planned steps")] = True,
    compare: Annotated[bool, typer.Option(help="also train plain AdamW at the same starting lr")] = True,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Train an MLP on scikit-learn's digits with Hi-DLR(AdamW), layer groups, and show what it did."""
    if mode not in ("diag", "full"):
        raise typer.BadParameter(f"mode must be diag or full, got {mode!r}", param_hint="--mode")
    if probe not in ("heldout", "train"):
        raise typer.BadParameter(f"probe must be heldout or train, got {probe!r}", param_hint="--probe")
    if not (lr > 0 and math.isfinite(lr)):
        raise typer.BadParameter(f"lr must be positive, got {lr}", param_hint="--lr")
    task = get_task("digits")
    console.print(
        f"[bold]digits[/bold]: {len(task.train)} train / {len(task.val)} val / {len(task.test)} test, "
        f"MLP 64-128-128-10, groups by layer, AdamW from lr={lr:g}, Hi-DLR {mode}, refit every {interval} steps"
    )

    names = group_names(group_parameters(task.make_model(seed), task.grouping))
    table = Table(title="Hi-DLR(AdamW) on digits")
    for col in ("epoch", "train loss", "val loss", "val acc", *(f"lr[{n}]" for n in names)):
        table.add_column(col, justify="right")

    def show(log: EpochLog) -> None:
        if log.epoch % max(1, epochs // 10) == 0 or log.epoch == epochs - 1:
            table.add_row(
                str(log.epoch),
                f"{log.train_loss:.4f}",
                f"{log.val_loss:.4f}",
                f"{log.val_acc:.3f}",
                *(f"{x:.2e}" for x in log.lrs),
            )

    with console.status("training with Hi-DLR ..."):
        result = train(
            task,
            lr=lr,
            epochs=epochs,
            seed=seed,
            hidlr={"interval": interval, "mode": mode, "horizon": horizon},
            probe=probe,
            on_epoch=show,
            device=device,
        )  # type: ignore[arg-type]
    console.print(table)
    h = result.hidlr
    assert h is not None
    console.print(
        f"Hi-DLR: {len(h.history)} refits, {h.n_rejected} rejected, {h.probe_forwards} probe forwards; "
        f"compute {result.compute:,.0f} forward-equivalents, "
        f"{100 * result.probe_compute / result.compute:.1f}% of it on probes"
    )
    console.print(
        f"Hi-DLR   final val loss {result.final_val_loss:.4f}  test acc {result.test_acc:.3f}  "
        f"({result.wall_seconds:.1f}s)"
    )
    if compare:
        with console.status("training plain AdamW for comparison ..."):
            plain = train(task, lr=lr, epochs=epochs, seed=seed, device=device)
        console.print(
            f"AdamW    final val loss {plain.final_val_loss:.4f}  test acc {plain.test_acc:.3f}  "
            f"(fixed lr={lr:g}, {plain.wall_seconds:.1f}s)"
        )


if __name__ == "__main__":  # pragma: no cover
    app()
