"""Does a freezing pattern found on one model transfer to a wider one of the same family? (issue 15)

    python studies/peft_transfer.py [--seeds 0 1 2 3 4] [--budget 0.3] [--threshold T] > docs/results/peft/transfer.md

The digits MLP of the digits study at two widths, 64-64-64 (the source) and 256-256-256 (the target), one
group per parameter tensor (each layer's weight and bias: 8 groups with the same names at both widths),
Hi-DLR's study defaults from AdamW's 1e-3, 30 epochs, batch 64. Per seed:

1. **source**: Hi-DLR with ``FreezePolicy(budget=..., threshold=...)`` on the narrow model; its frozen groups at the end
   are the pattern;
2. on the wide model: **full** (Hi-DLR, nothing frozen); **own** (the same policy, choosing on the wide model
   itself); **transferred** (the source's pattern, ``FreezePolicy(groups=...)``, frozen at the step the source
   decided: a user who reuses a pattern skips the measurement, not the warm-up: frozen from step 0, the
   untrained layers of a model trained from scratch stay random); **random** (as many groups, chosen at
   random by the seed, frozen at the same step: the control a transferred pattern must beat).

Reported: test loss (mean +- std), the trainable fraction, the paired verdict of each against full and of
transferred against random (95% t-interval over seeds), and how often the wide model's own choice equals
the transferred pattern (Jaccard overlap of the frozen sets).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch

from hidlr_hpo import FreezePolicy
from hidlr_hpo.report import interval_verdict, mean_std
from hidlr_hpo.tasks.digits import digits_task
from hidlr_hpo.training import train

SOURCE, TARGET = (64, 64, 64), (256, 256, 256)
EPOCHS, BATCH = 30, 64


def _by_tensor(name: str, param: torch.nn.Parameter) -> str:
    return name  # "0.weight", "0.bias", ...: the same names at every width


def _task(hidden: tuple[int, ...]):
    """The digits task at this width, one group per tensor."""
    return dataclasses.replace(digits_task(hidden=hidden), grouping=_by_tensor)


@dataclasses.dataclass
class Run:
    test_loss: float
    trainable: float  # fraction of the parameters at the end
    frozen: frozenset[str]
    decided_at: int | None  # the step of the first freeze; None: nothing froze
    wall_s: float


def _run(hidden: tuple[int, ...], seed: int, policy: FreezePolicy | None = None) -> Run:
    hidlr: dict = {"horizon": True} if policy is None else {"horizon": True, "freeze": policy}
    start = time.perf_counter()
    result = train(_task(hidden), lr=1e-3, epochs=EPOCHS, batch_size=BATCH, seed=seed, hidlr=hidlr)
    freezer = result.hidlr.freezer
    steps = [e.step for e in freezer.events if e.action == "freeze"] if freezer is not None else []
    return Run(
        result.test_loss,
        result.trainable_fraction,
        frozenset(result.hidlr.frozen_groups),
        min(steps, default=None),
        time.perf_counter() - start,
    )


def main(seeds: list[int], budget: float | None, threshold: float | None) -> None:
    policy = FreezePolicy(budget=budget, threshold=threshold)
    torch.set_num_threads(1)  # one thread: the same floating-point sums on every machine
    names = [n for n, _ in _task(SOURCE).make_model(0).named_parameters()]
    rows: dict[str, list[Run]] = {k: [] for k in ("source", "full", "own", "transferred", "random")}
    for seed in seeds:
        src = _run(SOURCE, seed, policy)
        rows["source"].append(src)
        rows["full"].append(_run(TARGET, seed))
        rows["own"].append(_run(TARGET, seed, policy))
        at = src.decided_at or 0  # nothing froze: the pattern is empty, the step does not matter
        rows["transferred"].append(_run(TARGET, seed, FreezePolicy(groups=sorted(src.frozen), warmup=at)))
        chosen = sorted(random.Random(seed).sample(names, len(src.frozen)))
        rows["random"].append(_run(TARGET, seed, FreezePolicy(groups=chosen, warmup=at)))
        print(
            f"<!-- seed {seed}: source froze {sorted(src.frozen)} at step {src.decided_at}; "
            f"wide own {sorted(rows['own'][-1].frozen)}; random {chosen} -->",
            flush=True,
        )

    def test(key: str) -> list[float]:
        return [r.test_loss for r in rows[key]]

    print(f"\nSeeds {seeds}; budget {budget}; threshold {threshold}; widths {SOURCE} -> {TARGET}; {EPOCHS} epochs.\n")
    print("| run | model | test loss | trainable | wall s/run | against full (wide) | against random |")
    print("|---|---|---|---|---|---|---|")
    for key, rs in rows.items():
        model = "narrow" if key == "source" else "wide"
        vs_full = "-" if key in ("source", "full") else interval_verdict(test(key), test("full"))
        vs_random = interval_verdict(test(key), test("random")) if key in ("own", "transferred") else "-"
        print(
            f"| {key} | {model} | {mean_std(test(key))} | "
            f"{statistics.mean(r.trainable for r in rs):.1%} | {statistics.mean(r.wall_s for r in rs):.1f} | "
            f"{vs_full} | {vs_random} |"
        )
    overlaps = []
    for src, own in zip(rows["source"], rows["own"], strict=True):
        union = src.frozen | own.frozen
        overlaps.append(len(src.frozen & own.frozen) / len(union) if union else 1.0)
    same = sum(o == 1.0 for o in overlaps)
    print(
        f"\nThe wide model's own choice equals the narrow model's on {same} of {len(seeds)} seeds "
        f"(Jaccard overlap of the frozen sets {statistics.mean(overlaps):.2f} on average)."
    )


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--budget", type=_optional_float, default=0.3, help="fraction of the parameters kept trainable, or none"
    )
    parser.add_argument("--threshold", type=float, default=None)
    args = parser.parse_args()
    main(args.seeds, args.budget, args.threshold)
