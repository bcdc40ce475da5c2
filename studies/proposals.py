"""What the quadratic fit proposes, against the rate it is fitted at: how much of Hi-DLR is the fit, how much
the safeguards.

    python studies/proposals.py --tasks digits multitask --seeds 3 --out docs/results/proposals.md

For every refit of the default configuration (held-out probe, horizon, trust ratio 2, smoothing 0.9) from
lr 1e-3, the raw proposal eta*_k = b_k / A_kk of each live group is divided by the group's current rate:
a ratio near 1 means the fit agrees with the rate; a ratio above the trust ratio means the safeguards, not
the fit, decide the step (it is clipped to 2x, then smoothed to +10%).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from hidlr_hpo.tasks import get_task
from hidlr_hpo.training import train


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["digits", "multitask"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# Raw proposals against the current rates",
        "",
        f"Command: `python studies/proposals.py --tasks {' '.join(args.tasks)} --seeds {args.seeds}"
        + (f" --out {args.out}`  " if args.out else "`  "),
        f"Default Hi-DLR (held-out probe, horizon, diag, axial design delta 1, trust ratio 2, smoothing 0.9), "
        f"AdamW from lr {args.lr:g}, 30 epochs, seeds 0..{args.seeds - 1}; one row per task, all refits and "
        "groups pooled. Ratio = raw proposal b_k / A_kk over the group's rate at the refit.",
        "",
        "| task | refits x groups | median ratio | ratio > 2 (clipped up) | ratio in [0.8, 1.25] | ratio < 0.5 "
        "| no minimum or no descent | rate changed by the cap (x1.1 or x0.95) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.tasks:
        ratios, none, capped, total = [], 0, 0, 0
        for seed in range(args.seeds):
            result = train(get_task(name), lr=args.lr, epochs=30, seed=seed, hidlr={"horizon": True}, probe="heldout")
            assert result.hidlr is not None
            for record in result.hidlr.history:
                for proposed, prev, new in zip(record.proposed, record.prev_lrs, record.lrs, strict=True):
                    total += 1
                    change = new / prev if prev > 0 else 1.0
                    capped += math.isclose(change, 1.1, rel_tol=1e-9) or math.isclose(change, 0.95, rel_tol=1e-9)
                    if math.isnan(proposed) or proposed <= 0:
                        none += 1
                    else:
                        ratios.append(proposed / prev)
        lines.append(
            f"| {name} | {total} | {statistics.median(ratios):.1f} | {_share(sum(r > 2 for r in ratios), total)} "
            f"| {_share(sum(0.8 <= r <= 1.25 for r in ratios), total)} | {_share(sum(r < 0.5 for r in ratios), total)} "
            f"| {_share(none, total)} | {_share(capped, total)} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
