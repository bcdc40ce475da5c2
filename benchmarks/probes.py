"""Hi-DLR's performance figures, each a ratio measured in one run (docs/benchmarks.md).

    python benchmarks/probes.py [--device cpu|cuda] [--only overhead,batched,refit,target] [--repeats 5]

1. overhead: time per step of HiDLR(AdamW) over plain AdamW at the default interval (10), on the digits MLP
   and on the MiniLM + LoRA transformer (needs the [text] extra), sequential and batched probes;
2. batched: batched against sequential probe evaluation of P = 4K points, for K in {2, 8, 32} groups (a
   K-layer MLP, one group per layer);
3. refit: the cost of one refit as K grows, diag and full: the fit alone and the whole refit with probes;
4. target: compute-to-target from the finished studies: the forward-equivalents Hi-DLR needs to first reach
   the grid search's final validation loss, over the grid search's total compute (per seed, then the mean);
5. memory: the peak memory a refit adds, in copies of the trainable parameters (a 4-group MLP of about 100M
   parameters, each measurement in a fresh process: peak resident memory after a plain step and after a
   refit; CPU only).

Timings alternate the compared variants and report the median over repeats, so machine noise hits both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from hidlr_hpo import HiDLR, group_parameters
from hidlr_hpo.curvature import Safeguards, apply_safeguards, fit_quadratic, make_design
from hidlr_hpo.probe import Prober

REPO = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], object], device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- 1. per-step overhead -------------------------------------------------------------------------------------
def _steps(task, device: str, n_steps: int, batch_size: int, hidlr: dict | None) -> float:
    """Seconds per training step over ``n_steps`` (forward, backward, step; refits included)."""
    model = task.make_model(0).to(device)
    opt = torch.optim.AdamW(group_parameters(model, task.grouping), lr=1e-3)
    controller = (
        HiDLR(opt, model, task.loss_fn, probes=None, total_steps=n_steps, **hidlr) if hidlr is not None else None
    )
    gen = torch.Generator().manual_seed(0)
    batches = [b for _, b in zip(range(n_steps), _cycle(task.train, batch_size, gen), strict=False)]
    probe = (task.val.x[:batch_size], task.val.y[:batch_size])
    on_train_batch = controller is not None and controller.slope == "gradient"  # b from this batch's gradient
    _sync(device)
    t0 = time.perf_counter()
    for x, y in batches:
        task.loss_fn(model, (x, y)).backward()
        if controller is None:
            opt.step()
        else:
            due = controller.refit_due
            controller.step(probe_batch=((x, y) if on_train_batch else probe) if due else None)
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - t0) / n_steps


def _cycle(split, batch_size, gen):
    while True:
        yield from split.batches(batch_size, gen)


def overhead(device: str, repeats: int) -> None:
    from hidlr_hpo.tasks import get_task

    cases = [("digits MLP", lambda: get_task("digits"), 510)]  # a whole 30-epoch run: the adaptive gap grows
    try:
        import peft  # noqa: F401
        import sentence_transformers  # noqa: F401

        cases.append(("MiniLM + LoRA", lambda: get_task("sentiment", n_samples=600), 30))
    except ImportError:
        print("(MiniLM + LoRA skipped: pip install '.[text]')")
    print("\n### 1. Per-step overhead, HiDLR(AdamW) / AdamW, total_steps = the steps timed\n")
    print(
        "| model | AdamW ms/step | Hi-DLR ms/step: default (gap 10-40), fixed interval 10, batched, gradient "
        "slope | ratios to AdamW |"
    )
    print("|---|---|---|---|")
    for name, make, n_steps in cases:
        task = make().to(device)
        variants = {
            "plain": None,
            "default": {},
            "fixed": {"max_interval": None},
            "batched": {"batched_probes": True},
            "gradient": {"slope": "gradient"},
        }
        _steps(task, device, 10, 64, variants["default"])  # warm-up
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for key, hidlr in variants.items():
                times[key].append(_steps(task, device, n_steps, 64, hidlr))
        plain, *others = (statistics.median(times[k]) for k in variants)
        ms = ", ".join(f"{t * 1e3:.2f}" for t in others)
        ratios = ", ".join(f"{t / plain:.3f}" for t in others)
        print(f"| {name} | {plain * 1e3:.2f} | {ms} | {ratios} |")


# -- 2. batched against sequential ----------------------------------------------------------------------------
def _deep_mlp(k: int, width: int = 64) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(32, width), nn.Tanh()]
    for _ in range(k - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _mse(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _stepped_prober(k: int, device: str, batched: bool) -> tuple[Prober, list, tuple]:
    torch.manual_seed(0)
    model = _deep_mlp(k).to(device)
    groups = [g["params"] for g in group_parameters(model, "layer")]
    assert len(groups) == k
    prober = Prober(model, _mse, groups, batched=batched)
    start = prober.snapshot()
    with torch.no_grad():
        for g in groups:
            for p in g:
                p.add_(1e-3 * torch.randn_like(p))
    batch = (torch.randn(64, 32, device=device), torch.randn(64, 1, device=device))
    return prober, start, batch


def batched(device: str, repeats: int) -> None:
    print("\n### 2. Batched against sequential probes, P = 4K points, K-layer MLP (width 64, batch 64)\n")
    print("| K | P | sequential ms | batched ms | speed-up |")
    print("|---|---|---|---|---|")
    for k in (2, 8, 32):
        seq, start, batch = _stepped_prober(k, device, batched=False)
        bat = Prober(seq.model, _mse, seq.groups, batched=True)
        coeffs = torch.rand(4 * k, k, generator=torch.Generator().manual_seed(k)) * 2
        bat.losses(batch, start, coeffs)  # warm-up
        seq.losses(batch, start, coeffs)
        t_seq, t_bat = [], []
        for _ in range(repeats):
            t_seq.append(_median_time(lambda: seq.losses(batch, start, coeffs), device, 3))
            t_bat.append(_median_time(lambda: bat.losses(batch, start, coeffs), device, 3))
        s, b = statistics.median(t_seq), statistics.median(t_bat)
        assert bat.fallback_reason is None, bat.fallback_reason
        print(f"| {k} | {4 * k} | {s * 1e3:.2f} | {b * 1e3:.2f} | {s / b:.2f}x |")


# -- 3. refit cost as K grows ---------------------------------------------------------------------------------
def refit(device: str, repeats: int) -> None:
    print("\n### 3. Refit cost as K grows (K-layer MLP, width 64, batch 64; sequential probes)\n")
    print("| K | mode | probes P | fit + solve ms | whole refit ms |")
    print("|---|---|---|---|---|")
    guards = Safeguards()
    for k in (2, 8, 32):
        for mode in ("diag", "full"):
            design = make_design("pairwise" if mode == "full" else "axial", k, mode, 1.0, torch.Generator())
            losses = torch.rand(design.shape[0], dtype=torch.float64)
            prev = torch.full((k,), 1e-3, dtype=torch.float64)

            def fit_only() -> None:
                fit = fit_quadratic(design, losses, mode)
                apply_safeguards(prev, fit.rescale(prev), guards, 1)

            fit_time = _median_time(fit_only, "cpu", repeats * 5)
            torch.manual_seed(0)
            model = _deep_mlp(k).to(device)
            opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-3)
            controller = HiDLR(opt, model, _mse, probes=None, total_steps=None, interval=1, mode=mode)
            batch = (torch.randn(64, 32, device=device), torch.randn(64, 1, device=device))

            def one_refit() -> None:
                _mse(model, batch).backward()
                controller.step(probe_batch=batch)
                opt.zero_grad()

            one_refit()  # warm-up
            total = _median_time(one_refit, device, repeats)
            print(f"| {k} | {mode} | {design.shape[0]} | {fit_time * 1e3:.3f} | {total * 1e3:.1f} |")


# -- 4. compute-to-target -------------------------------------------------------------------------------------
def target() -> None:
    import optuna

    from hidlr_hpo.config import load_study_config
    from hidlr_hpo.study import optuna_study_name

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("\n### 4. Compute-to-target: Hi-DLR diag's compute to first reach the grid's final val loss / grid's\n")
    print("| task | per seed | mean | goal <= 1/8 |")
    print("|---|---|---|---|")
    for name in ("digits", "nam", "multitask", "sentiment"):
        cfg = load_study_config(REPO / "studies" / f"{name}.toml")
        methods = {m.name: m for m in cfg.methods}
        fractions = []
        try:
            for seed in cfg.seeds:
                grid = optuna.load_study(study_name=optuna_study_name(cfg, methods["grid"], seed), storage=cfg.storage)
                hidlr = optuna.load_study(
                    study_name=optuna_study_name(cfg, methods["hidlr-diag"], seed), storage=cfg.storage
                )
                done = [t for t in grid.trials if t.value is not None]
                best, spent = min(t.value for t in done), sum(t.user_attrs["compute"] for t in done)
                curve = hidlr.best_trial.user_attrs["curve"]
                reached = [
                    c for c, v in zip(curve["compute"], curve["val_loss"], strict=True) if v is not None and v <= best
                ]
                fractions.append(reached[0] / spent if reached else None)
        except KeyError:
            print(f"| {name} | study not run ({cfg.storage}) | | |")
            continue
        cells = ", ".join("not reached" if f is None else f"{f:.3f}" for f in fractions)
        finite = [f for f in fractions if f is not None]
        mean = f"{statistics.mean(finite):.3f} ({len(finite)}/{len(fractions)} seeds)" if finite else "not reached"
        verdict = "met" if len(finite) == len(fractions) and max(finite) <= 1 / 8 else "not met"
        print(f"| {name} | {cells} | {mean} | {verdict} |")


# -- 5. peak memory of a refit ----------------------------------------------------------------------------
_MEMORY_CHILD = """
import resource, sys, torch
from torch import nn
from hidlr_hpo import HiDLR, group_parameters
batched = sys.argv[1] == "batched"
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(5000, 5000) for _ in range(4)])  # 4 groups, 100M parameters, 400 MB
for p in model.parameters():
    p.requires_grad_(True)
opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)  # no optimizer state: only Hi-DLR's copies
loss_fn = lambda m, b: m(b).pow(2).mean()
hidlr = HiDLR(opt, model, loss_fn, probes=None, total_steps=None, interval=2, batched_probes=batched,
              probe_memory_budget=1)
batch = torch.randn(8, 5000)
for _ in range(2):  # two plain steps (no probe batch: no refit): the baseline peak
    loss_fn(model, batch).backward(); hidlr.step(); opt.zero_grad(set_to_none=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss_fn(model, batch).backward(); hidlr.step(probe_batch=batch); opt.zero_grad(set_to_none=False)  # step 2 refits
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = sum(p.numel() * p.element_size() for p in model.parameters()) / 1024
print((peak - base) / params)
"""


def memory() -> None:
    import subprocess
    import sys

    print("\n### 5. Peak memory a refit adds, in copies of the trainable parameters (100M-parameter MLP, CPU)\n")
    print("| probes | extra copies at the refit's peak | goal <= 1 |")
    print("|---|---|---|")
    for path in ("sequential", "batched"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, path], capture_output=True, text=True, check=True)
        copies = float(out.stdout.strip().splitlines()[-1])
        print(f"| {path} | {copies:.2f} | {'met' if copies <= 1.05 else 'not met'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="overhead,batched,refit,target,memory")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"## Hi-DLR benchmarks on {name}, torch {torch.__version__}")
    chosen = set(args.only.split(","))
    if "overhead" in chosen:
        overhead(args.device, args.repeats)
    if "batched" in chosen:
        batched(args.device, args.repeats)
    if "refit" in chosen:
        refit(args.device, args.repeats)
    if "target" in chosen:
        target()
    if "memory" in chosen and not args.device.startswith("cuda"):
        memory()


if __name__ == "__main__":
    main()
