"""Hi-DLR under DDP with two real processes on the gloo backend (examples/ddp.py under torchrun): every rank
applies bitwise-identical rates, and what it fits is the loss of the union of the ranks' shards, the same
as one process probing the union."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp.py"


def test_two_gloo_ranks_apply_the_same_rates_as_one_process_on_the_union(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    ranks = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", str(EXAMPLE), "--steps", "40", "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ranks.returncode == 0, ranks.stdout + ranks.stderr
    single = subprocess.run(
        [sys.executable, str(EXAMPLE), "--single", "--steps", "40", "--out", str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    rank0, rank1, union = (json.loads((tmp_path / n).read_text()) for n in ("r.rank0.json", "r.rank1.json", "s.json"))
    assert rank0["rates"] and rank0["rates"] == rank1["rates"]  # bitwise: the same numbers in every refit
    assert rank0["refits"] == rank1["refits"]
    assert len(rank0["refits"]) == len(union["refits"]) >= 3
    for ddp, one in zip(rank0["refits"], union["refits"], strict=True):
        # The all-reduced probe losses are the mean over the two shards = the loss on their union.
        assert ddp["losses"] == pytest.approx(one["losses"], rel=1e-6)  # float32 sums in two orders
        assert ddp["b"] == pytest.approx(one["b"], rel=1e-4)  # differences of losses: 1e-7 becomes 1e-5
    flat = [r for refit in rank0["rates"] for r in refit]
    assert flat == pytest.approx([r for refit in union["rates"] for r in refit], rel=1e-6)
