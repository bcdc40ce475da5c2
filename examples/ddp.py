"""Hi-DLR under DistributedDataParallel: every rank trains and probes its own shard of each batch; HiDLR
averages the probe losses over the ranks (an all-reduce), so every rank fits the same quadratic and applies
the same rates.

    torchrun --nproc-per-node 2 examples/ddp.py                  # CPU processes, gloo
    torchrun --nproc-per-node 2 examples/ddp.py --backend nccl   # one GPU per rank, the same code
    python examples/ddp.py --single                              # one process on the union of the shards

``--out rates.json`` writes the group rates after every refit (per rank under torchrun), which
tests/test_ddp.py compares across ranks and with the single process.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hidlr_hpo import HiDLR
from hidlr_hpo.groups import group_parameters
from hidlr_hpo.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (one GPU per rank)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--single", action="store_true", help="one process, batches of the union of 2 shards")
    parser.add_argument("--out", default=None, help="write the rates after every refit to this JSON file")
    args = parser.parse_args()

    distributed = not args.single
    if distributed:
        dist.init_process_group(args.backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 2  # the union of two ranks' shards, in one process
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else "cpu"
    torch.set_num_threads(1)

    task = get_task("digits").to(device)
    model = task.make_model(0).to(device)  # the same initial weights on every rank
    groups = group_parameters(model, "layer")
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    # Probe the plain module: DDP's forward would synchronise buffers at every probe.
    hidlr = HiDLR(optimizer, model, task.loss_fn, probes=None, total_steps=args.steps)
    trained = DistributedDataParallel(model) if distributed else model

    # Every rank draws the same indices and takes its own slice (the union of all slices: --single).
    gen = torch.Generator().manual_seed(0)
    size = args.batch_size
    mine = slice(rank * size, (rank + 1) * size) if distributed else slice(0, world * size)
    rates = []
    for _ in range(args.steps):
        train_idx = torch.randperm(len(task.train), generator=gen)[: world * size][mine]
        probe_idx = torch.randperm(len(task.val), generator=gen)[: world * size][mine]
        x, y = task.train.x[train_idx], task.train.y[train_idx]
        loss = task.loss_fn(trained, (x, y))
        loss.backward()  # DDP averages the gradients over the ranks
        due = hidlr.refit_due
        hidlr.step(probe_batch=(task.val.x[probe_idx], task.val.y[probe_idx]) if due else None)
        optimizer.zero_grad(set_to_none=True)
        if due:
            rates.append(hidlr.lrs())
    if args.out:
        path = args.out.replace(".json", f".rank{rank}.json") if distributed else args.out
        with open(path, "w") as f:
            history = [{"step": r.step, "losses": r.losses, "b": r.b, "A": r.A} for r in hidlr.history]
            json.dump({"rank": rank, "rates": rates, "refits": history}, f)
    print(f"rank {rank}: {len(rates)} refits, final rates {[f'{r:.3g}' for r in hidlr.lrs()]}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
