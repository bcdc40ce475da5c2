"""benchmarks/functions.py: each instance's minimum is f* at its minimiser in the box; benchmarks/samplers.py runs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repository root

from benchmarks.functions import FUNCTIONS, dims_for, make, random_rotation  # noqa: E402

CASES = [(name, d, seed) for name in FUNCTIONS for d in dims_for(name, [2, 5]) for seed in range(3)]


@pytest.mark.parametrize(("name", "dim", "seed"), CASES)
def test_instance_minimum_is_f_star_inside_the_box(name, dim, seed):
    p = make(name, dim, seed)
    assert p(p.x_opt) == pytest.approx(p.f_star, rel=1e-9, abs=1e-9)
    assert np.all(p.low <= p.x_opt) and np.all(p.x_opt <= p.high)
    np.testing.assert_allclose(p.rotation.T @ p.rotation, np.eye(dim), rtol=0, atol=1e-12)
    points = np.random.default_rng(seed).uniform(p.low, p.high, size=(200, dim))
    assert min(p(x) for x in points) >= p.f_star - 1e-9


@pytest.mark.parametrize("d", [2, 5, 10])
def test_random_rotation_is_orthogonal(d):
    q = random_rotation(np.random.default_rng(d), d)
    np.testing.assert_allclose(q.T @ q, np.eye(d), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [n for n, spec in FUNCTIONS.items() if spec.shift])
def test_seed_makes_the_instance(name):
    a, b, c = make(name, 5, 0), make(name, 5, 0), make(name, 5, 1)
    np.testing.assert_array_equal(a.x_opt, b.x_opt)
    np.testing.assert_array_equal(a.rotation, b.rotation)
    assert not np.allclose(a.x_opt, c.x_opt)


def test_one_cell_of_the_sampler_benchmark():
    from benchmarks.samplers import run_cell

    best = run_cell("sphere", 2, 0, "random", 10)["best"]
    assert len(best) == 10
    assert np.all(np.diff(best) <= 0)
