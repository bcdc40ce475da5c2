"""Step time and memory after automatic freezing (issue 15), against full fine-tuning, LoRA and BitFit.

    python benchmarks/freezing.py [--budget 0.02] [--steps 8] [--repeats 3] [--threads 2]

On the MiniLM sentence transformer of the sentiment task (22.7M parameters, 55 fine groups):

1. **decide**: one Hi-DLR refit on the full model with ``FreezePolicy(budget=..., warmup=0, min_refits=1)``
   chooses the groups to keep (a diag refit over 55 groups: 111 probe forwards);
2. **measure**, each variant in its own process (so that its peak resident memory is its own): full
   fine-tuning, the Hi-DLR-frozen model (the chosen groups trainable, the rest ``requires_grad=False``),
   LoRA r=8 (q, v) and BitFit (biases and head). Each times ``--steps`` training steps (forward, backward,
   AdamW step) after two warm-up steps, ``--repeats`` times (median), and reports the trainable parameters,
   the bytes of gradients and AdamW state after a step, and how much the process's resident memory grew
   from before the first step to after the last (gradients, optimizer state, activations' high-water mark:
   what training adds to the loaded model; the loading itself peaks the same for every variant).

Step time is a ratio to full fine-tuning measured in the same run; read differences below about 10% as noise
on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from hidlr_hpo import FreezePolicy, HiDLR, group_parameters
from hidlr_hpo.tasks import get_task

VARIANTS = ("full", "frozen", "lora", "bitfit")
_BATCH = 64


def _task(finetune: str):
    return get_task("sentiment", n_samples=1500, finetune=finetune)


def decide(budget: float) -> dict:
    """One refit of Hi-DLR with a budget policy on the full model: the groups it keeps, and why."""
    task = _task("full")
    model = task.make_model(0)
    opt = torch.optim.AdamW(group_parameters(model, task.grouping), lr=1e-4)
    probe = (task.val.x[:_BATCH], task.val.y[:_BATCH])
    policy = FreezePolicy(budget=budget, warmup=0, min_refits=1)
    hidlr = HiDLR(opt, model, task.loss_fn, probes=None, total_steps=100, freeze=policy)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        task.loss_fn(model, (task.train.x[:_BATCH], task.train.y[:_BATCH])).backward()
        hidlr.step(probe_batch=probe)
    record = hidlr.history[-1]
    kept = [name for name in hidlr.group_names if name not in hidlr.frozen_groups]
    return {
        "budget": budget,
        "kept": kept,
        "frozen": hidlr.frozen_groups,
        "trainable_fraction": hidlr.trainable_fraction,
        "refit_seconds": time.perf_counter() - t0,
        "probe_forwards": hidlr.probe_forwards,
        "influence": dict(zip(hidlr.group_names, record.smoothed_influence or [], strict=False)),
    }


def measure(variant: str, steps: int, repeats: int, kept: list[str]) -> dict:
    """Time training steps of one variant; its memory figures. Runs in its own process."""
    task = _task({"full": "full", "frozen": "full", "lora": "lora", "bitfit": "bitfit"}[variant])
    model = task.make_model(0)
    groups = group_parameters(model, task.grouping)
    if variant == "frozen":  # what HiDLR(freeze=...) leaves: the other groups without gradient or state
        for group in groups:
            if group["name"] not in kept:
                for p in group["params"]:
                    p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, lr=1e-4)
    x, y = task.train.x[:_BATCH], task.train.y[:_BATCH]
    rss_before = _rss_mb()

    def one_step() -> None:
        task.loss_fn(model, (x, y)).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients: their bytes are counted below

    one_step()
    one_step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        times.append((time.perf_counter() - t0) / steps)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state_bytes = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    return {
        "variant": variant,
        "ms_per_step": 1e3 * statistics.median(times),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "grad_mb": grad_bytes / 2**20,
        "state_mb": state_bytes / 2**20,
        "rss_growth_mb": _rss_mb() - rss_before,
    }


def _rss_mb() -> float:
    """The process's resident memory now (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    return math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant
    parser.add_argument("--kept", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        kept = json.loads(args.kept) if args.kept else []
        print(json.dumps(measure(args.measure, args.steps, args.repeats, kept)))
        return

    choice = decide(args.budget)
    print(
        f"Hi-DLR's choice at a {args.budget:.1%} budget (one refit, {choice['probe_forwards']} probe forwards, "
        f"{choice['refit_seconds']:.1f} s): keeps {', '.join(choice['kept'])} "
        f"({choice['trainable_fraction']:.2%} of the parameters)\n"
    )
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, str(Path(__file__).resolve()), "--measure", variant]
        command += ["--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        command += ["--kept", json.dumps(choice["kept"])]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    full = rows[0]
    print("| variant | trainable parameters | ms/step | vs full | gradients MB | AdamW state MB | RSS growth MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['trainable']:,} ({r['trainable'] / r['total']:.2%}) | {r['ms_per_step']:.0f} | "
            f"{r['ms_per_step'] / full['ms_per_step']:.2f}x | {r['grad_mb']:.1f} | {r['state_mb']:.1f} | "
            f"{r['rss_growth_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
