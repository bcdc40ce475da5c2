"""Textbook black-box test functions as seeded instances, for benchmarks/samplers.py.

    from benchmarks.functions import FUNCTIONS, make
    problem = make("rosenbrock", dim=5, seed=0)
    problem(x), problem.regret(x), problem.low, problem.high, problem.f_star, problem.x_opt

Each function g is written in its own coordinates z, with its minimiser z* and minimum f* = g(z*). An instance
(function, dim, seed) draws, from ``numpy.random.default_rng([seed, dim, crc32(name)])``:

* a shift: the instance's minimiser x* uniform in the central 80% of each range of the box (kept 10% of the
  range away from each edge);
* a rotation Q: the QR factorisation of a standard Gaussian matrix, with the columns' signs fixed so that
  R has a positive diagonal (a Haar-random orthogonal matrix),

and evaluates f(x) = g(z* + Q (x - x*)). Then f(x*) = g(z*) = f* exactly and f >= f* everywhere, since every g
here is bounded below by f* on all of R^d (Schwefel's by a penalty outside [-500, 500], see ``schwefel``).
The separable ellipsoid is shifted but not rotated (rotation is what the rotated ellipsoid adds); Branin and
Hartmann-6 keep their fixed domain and published minimiser: no shift, no rotation (Q = I, x* = z*).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["FUNCTIONS", "Problem", "dims_for", "make", "random_rotation"]


def sphere(z: np.ndarray) -> float:
    """f(z) = sum_i z_i^2; f* = 0 at z = 0."""
    return float(np.sum(z**2))


def ellipsoid(z: np.ndarray) -> float:
    """f(z) = sum_i 10^(6 (i-1)/(d-1)) z_i^2 (condition number 1e6); f* = 0 at z = 0."""
    d = len(z)
    weights = 10.0 ** (6.0 * np.arange(d) / max(d - 1, 1))  # 10^(6 (i-1)/(d-1)), i = 1..d
    return float(np.sum(weights * z**2))  # sum_i w_i z_i^2


def rosenbrock(z: np.ndarray) -> float:
    """f(z) = sum_{i<d} 100 (z_{i+1} - z_i^2)^2 + (1 - z_i)^2; f* = 0 at z = (1, ..., 1)."""
    return float(np.sum(100.0 * (z[1:] - z[:-1] ** 2) ** 2 + (1.0 - z[:-1]) ** 2))


def bent_cigar(z: np.ndarray) -> float:
    """f(z) = z_1^2 + 1e6 sum_{i>1} z_i^2; f* = 0 at z = 0."""
    return float(z[0] ** 2 + 1e6 * np.sum(z[1:] ** 2))


def discus(z: np.ndarray) -> float:
    """f(z) = 1e6 z_1^2 + sum_{i>1} z_i^2; f* = 0 at z = 0."""
    return float(1e6 * z[0] ** 2 + np.sum(z[1:] ** 2))


def rastrigin(z: np.ndarray) -> float:
    """f(z) = 10 d + sum_i (z_i^2 - 10 cos(2 pi z_i)); f* = 0 at z = 0."""
    return float(10.0 * len(z) + np.sum(z**2 - 10.0 * np.cos(2.0 * np.pi * z)))


# Schwefel's one-dimensional minimiser: sqrt(z) solves tan(u) = -u/2 near u = 20.5 (z = 420.9687...), where
# z sin(sqrt(z)) = 418.98288727243374; the textbook constant 418.9829 rounds that, so f* = d * 1.27e-5, not 0.
SCHWEFEL_Z = 420.9687463599821
SCHWEFEL_MAX = 418.98288727243374


def schwefel(z: np.ndarray) -> float:
    """The textbook form f(z) = 418.9829 d - sum_i z_i sin(sqrt|z_i|) on [-500, 500]^d, plus a penalty outside.

    f* = d (418.9829 - 418.98288727243374) = d * 1.2727566e-5 at z_i = 420.9687463599821. Outside [-500, 500]
    (where a rotated box reaches) the sum above is unbounded below, so each coordinate is clipped to the edge
    (c_i = clip(z_i, -500, 500), where -c_i sin(sqrt|c_i|) = 181.2 > -418.98) and sum_i (|z_i| - 500)_+^2 is
    added: the instance stays bounded below by f* and continuous.
    """
    c = np.clip(z, -500.0, 500.0)  # c_i = clip(z_i, -500, 500)
    penalty = np.sum(np.maximum(np.abs(z) - 500.0, 0.0) ** 2)  # sum_i (|z_i| - 500)_+^2
    return float(418.9829 * len(z) - np.sum(c * np.sin(np.sqrt(np.abs(c)))) + penalty)


def ackley(z: np.ndarray) -> float:
    """f(z) = -20 exp(-0.2 sqrt(mean z_i^2)) - exp(mean cos(2 pi z_i)) + 20 + e; f* = 0 at z = 0."""
    term1 = -20.0 * np.exp(-0.2 * np.sqrt(np.mean(z**2)))  # -a exp(-b sqrt((1/d) sum z_i^2)), a = 20, b = 0.2
    term2 = -np.exp(np.mean(np.cos(2.0 * np.pi * z)))  # -exp((1/d) sum cos(c z_i)), c = 2 pi
    return float(term1 + term2 + 20.0 + math.e)  # ... + a + e


def branin(z: np.ndarray) -> float:
    """f(x1, x2) = a (x2 - b x1^2 + c x1 - r)^2 + s (1 - t) cos(x1) + s on [-5, 10] x [0, 15].

    a = 1, b = 5.1 / (4 pi^2), c = 5 / pi, r = 6, s = 10, t = 1 / (8 pi); f* = 5 / (4 pi) = 0.397887... at
    (-pi, 12.275), (pi, 2.275) and (9.42478, 2.475).
    """
    x1, x2 = z
    a, b, c, r, s, t = 1.0, 5.1 / (4.0 * np.pi**2), 5.0 / np.pi, 6.0, 10.0, 1.0 / (8.0 * np.pi)
    return float(a * (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1.0 - t) * np.cos(x1) + s)


_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_H6_A = np.array(
    [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
)
_H6_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)
# The published minimiser (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573), f* = -3.32237, polished
# to double precision (BFGS then Nelder-Mead from it); the published point is 2.4e-11 above this f*.
HARTMANN6_X = np.array([0.2016895143546786, 0.15001069292118097, 0.4768739775473111, 0.27533243018030845,
                        0.3116516151076288, 0.6573005338278364])  # fmt: skip
HARTMANN6_F = -3.3223680114155147


def hartmann6(z: np.ndarray) -> float:
    """f(x) = -sum_{i=1..4} alpha_i exp(-sum_{j=1..6} A_ij (x_j - P_ij)^2) on [0, 1]^6; f* = -3.32237."""
    inner = np.sum(_H6_A * (z - _H6_P) ** 2, axis=1)  # sum_j A_ij (x_j - P_ij)^2, for each i
    return float(-np.sum(_H6_ALPHA * np.exp(-inner)))  # -sum_i alpha_i exp(-inner_i)


@dataclass(frozen=True)
class Spec:
    """A function in its own coordinates: its box [low, high] (scalars: every coordinate), minimiser z* and f*."""

    base: Callable[[np.ndarray], float]
    low: float | tuple[float, ...]
    high: float | tuple[float, ...]
    z_opt: Callable[[int], np.ndarray]
    f_star: Callable[[int], float]
    rotate: bool = True
    shift: bool = True
    dim: int | None = None  # a fixed dimension (Branin 2, Hartmann-6 6); None: any d >= 2


_zero_f = lambda d: 0.0  # noqa: E731

FUNCTIONS: dict[str, Spec] = {
    "sphere": Spec(sphere, -5.0, 5.0, np.zeros, _zero_f),
    "ellipsoid": Spec(ellipsoid, -5.0, 5.0, np.zeros, _zero_f, rotate=False),
    "rotated_ellipsoid": Spec(ellipsoid, -5.0, 5.0, np.zeros, _zero_f),
    "rosenbrock": Spec(rosenbrock, -5.0, 5.0, np.ones, _zero_f),
    "bent_cigar": Spec(bent_cigar, -5.0, 5.0, np.zeros, _zero_f),
    "discus": Spec(discus, -5.0, 5.0, np.zeros, _zero_f),
    "rastrigin": Spec(rastrigin, -5.12, 5.12, np.zeros, _zero_f),
    "schwefel": Spec(
        schwefel, -500.0, 500.0, lambda d: np.full(d, SCHWEFEL_Z), lambda d: d * (418.9829 - SCHWEFEL_MAX)
    ),
    "ackley": Spec(ackley, -32.768, 32.768, np.zeros, _zero_f),
    "branin": Spec(
        branin,
        (-5.0, 0.0),
        (10.0, 15.0),
        lambda d: np.array([np.pi, 2.275]),
        lambda d: 5 / (4 * np.pi),
        rotate=False,
        shift=False,
        dim=2,
    ),  # fmt: skip
    "hartmann6": Spec(
        hartmann6, 0.0, 1.0, lambda d: HARTMANN6_X.copy(), lambda d: HARTMANN6_F, rotate=False, shift=False, dim=6
    ),
}


def dims_for(name: str, dims: list[int]) -> list[int]:
    """The dimensions a function runs at: its own one for a fixed-dimension function, else ``dims``."""
    fixed = FUNCTIONS[name].dim
    return [fixed] if fixed is not None else list(dims)


def random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    """A Haar-random orthogonal matrix: Q of G = QR (G standard Gaussian), columns times sign(diag R)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))  # Q diag(sign(R_ii)): R gets a positive diagonal, making QR unique


@dataclass(frozen=True, eq=False)
class Problem:
    """One instance: f(x) = g(z* + Q (x - x*)) on the box [low, high]; f(x*) = f*."""

    name: str
    dim: int
    seed: int
    low: np.ndarray
    high: np.ndarray
    f_star: float
    x_opt: np.ndarray
    rotation: np.ndarray
    z_opt: np.ndarray
    base: Callable[[np.ndarray], float]

    def __call__(self, x) -> float:
        z = self.z_opt + self.rotation @ (np.asarray(x, dtype=float) - self.x_opt)  # z = z* + Q (x - x*)
        return self.base(z)

    def regret(self, x) -> float:
        """f(x) - f*."""
        return self(x) - self.f_star


def make(name: str, dim: int, seed: int) -> Problem:
    """The instance (name, dim, seed) of a function in ``FUNCTIONS``."""
    spec = FUNCTIONS[name]
    if (spec.dim is not None and dim != spec.dim) or dim < 2:
        raise ValueError(f"{name} is defined for d = {spec.dim or '2, 3, ...'}, got d = {dim}")
    rng = np.random.default_rng([seed, dim, zlib.crc32(name.encode())])
    low = np.broadcast_to(np.asarray(spec.low, dtype=float), (dim,)).copy()
    high = np.broadcast_to(np.asarray(spec.high, dtype=float), (dim,)).copy()
    z_opt = spec.z_opt(dim)
    # x* = low + (0.1 + 0.8 u) (high - low), u ~ U[0, 1]^d: the central 80% of the box
    x_opt = low + (0.1 + 0.8 * rng.uniform(size=dim)) * (high - low) if spec.shift else z_opt.copy()
    rotation = random_rotation(rng, dim) if spec.rotate else np.eye(dim)
    return Problem(name, dim, seed, low, high, float(spec.f_star(dim)), x_opt, rotation, z_opt, spec.base)
