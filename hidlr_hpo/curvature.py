"""Quadratic model of the loss over K group learning rates: designs, least-squares fit, solve, safeguards.

Pure tensor maths; nothing here knows about models, optimizers or Optuna.

The model (DESIGN.md section 2), in coordinates ``x`` (one per group)::

    L(x) ~= L0 - b^T x + 1/2 x^T A x          minimiser  x* = A^{-1} b   (full)
                                                          x*_k = b_k / A_kk  (diag)

The fit works in whatever coordinates the caller uses. :class:`HiDLR` fits in *multiplier* units of the
current rates (x_k = eta_k / eta0_k), so that the least-squares problem is equally well conditioned whatever
the scale of the learning rates, and converts back with :meth:`QuadraticFit.rescale`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

Mode = Literal["diag", "full"]
MODES: tuple[str, ...] = ("diag", "full")

__all__ = [
    "MODES",
    "QuadraticFit",
    "Safeguards",
    "SafeguardResult",
    "apply_safeguards",
    "axial_design",
    "check_mode",
    "features",
    "fit_curvature_known_slope",
    "fit_quadratic",
    "influence",
    "limit_rates",
    "make_design",
    "n_unknowns",
    "unchanged_groups",
    "pairwise_design",
    "random_design",
    "solve",
    "solve_keeping",
]


def check_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def n_unknowns(k: int, mode: str) -> int:
    """Number of coefficients of the quadratic model: 1 + 2K (diag) or 1 + K + K(K+1)/2 (full)."""
    check_mode(mode)
    return 1 + 2 * k if mode == "diag" else 1 + k + k * (k + 1) // 2


# ---------------------------------------------------------------------------------------------------------
# Probe designs: rows are probe points x^(j) in R^K.
# ---------------------------------------------------------------------------------------------------------


def axial_design(k: int, delta: float = 1.0, center: float = 0.0) -> torch.Tensor:
    """Centre plus +-delta along each axis: 2K + 1 points; determines the diagonal model exactly."""
    _check_k_delta(k, delta)
    eye = torch.eye(k, dtype=torch.float64)
    points = torch.cat([torch.zeros(1, k, dtype=torch.float64), delta * eye, -delta * eye])
    return points + center


def pairwise_design(k: int, delta: float = 1.0, center: float = 0.0) -> torch.Tensor:
    """Axial design plus delta * (e_j + e_k) for every pair j < k: exactly the full model's unknowns."""
    _check_k_delta(k, delta)
    eye = torch.eye(k, dtype=torch.float64)
    pairs = [delta * (eye[i] + eye[j]) for i, j in itertools.combinations(range(k), 2)]
    axial = axial_design(k, delta)
    points = torch.cat([axial, torch.stack(pairs)]) if pairs else axial
    return points + center


def random_design(
    k: int,
    n_points: int,
    delta: float = 1.0,
    center: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The centre plus ``n_points - 1`` points drawn uniformly from the cube center +- delta."""
    _check_k_delta(k, delta)
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2 for a random design, got {n_points}")
    cube = torch.rand(n_points - 1, k, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    points = torch.cat([torch.zeros(1, k, dtype=torch.float64), delta * cube])
    return points + center


def make_design(
    design: str | int | torch.Tensor,
    k: int,
    mode: str,
    delta: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Build a design by name ("axial", "pairwise"), by size (an int: a random design) or pass one through.

    The design must have at least as many points as the model has unknowns.
    """
    if isinstance(design, torch.Tensor):
        points = design.to(torch.float64)
        if points.ndim != 2 or points.shape[1] != k:
            raise ValueError(f"an explicit design must have shape (P, {k}), got {tuple(points.shape)}")
    elif isinstance(design, bool):
        raise ValueError(f"design must be 'axial', 'pairwise', an int or a tensor, got {design!r}")
    elif isinstance(design, int):
        points = random_design(k, design, delta, generator=generator)
    elif design == "axial":
        points = axial_design(k, delta)
    elif design == "pairwise":
        points = pairwise_design(k, delta)
    else:
        raise ValueError(f"design must be 'axial', 'pairwise', an int or a tensor, got {design!r}")
    needed = n_unknowns(k, mode)
    if points.shape[0] < needed:
        hint = " (use design='pairwise' or a random design)" if mode == "full" else ""
        raise ValueError(
            f"a {mode} model with K={k} groups has {needed} unknowns but the design has only "
            f"{points.shape[0]} points{hint}"
        )
    return points


def _check_k_delta(k: int, delta: float) -> None:
    if k < 1:
        raise ValueError(f"the number of groups K must be >= 1, got {k}")
    if not (delta > 0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a positive finite number, got {delta}")


# ---------------------------------------------------------------------------------------------------------
# Least-squares fit.
# ---------------------------------------------------------------------------------------------------------


def features(points: torch.Tensor, mode: str) -> torch.Tensor:
    """Design matrix Phi with L = Phi @ theta, theta = (L0, b_1..b_K, A_11..A_KK[, A_jk for j < k]).

    Columns: 1, -x_k, x_k^2 / 2, and in full mode x_j x_k for j < k (the two symmetric entries of
    1/2 x^T A x add up to A_jk x_j x_k).
    """
    check_mode(mode)
    p, k = points.shape
    cols = [torch.ones(p, 1, dtype=points.dtype), -points, 0.5 * points**2]
    if mode == "full" and k > 1:
        pairs = list(itertools.combinations(range(k), 2))
        cols.append(torch.stack([points[:, i] * points[:, j] for i, j in pairs], dim=1))
    return torch.cat(cols, dim=1)


@dataclass
class QuadraticFit:
    """The fitted model L(x) = L0 - b^T x + 1/2 x^T A x and its quality.

    ``r2`` is 1 - SS_res / SS_tot; on a design with exactly as many points as unknowns (the default axial
    and pairwise designs) the residual is zero by construction and ``r2`` is 1: use a larger random
    design when R^2 should mean something.
    """

    mode: str
    L0: float
    b: torch.Tensor  # (K,)
    A: torch.Tensor  # (K, K), symmetric; off-diagonal zero in diag mode
    r2: float
    residuals: torch.Tensor  # (P,)
    n_points: int

    @property
    def k(self) -> int:
        return int(self.b.numel())

    @property
    def is_finite(self) -> bool:
        return bool(math.isfinite(self.L0) and torch.isfinite(self.b).all() and torch.isfinite(self.A).all())

    def predict(self, points: torch.Tensor) -> torch.Tensor:
        """Model loss at each row of ``points``."""
        x = points.to(torch.float64)
        return self.L0 - x @ self.b + 0.5 * torch.einsum("pi,ij,pj->p", x, self.A, x)

    def rescale(self, scale: torch.Tensor) -> QuadraticFit:
        """The same model in coordinates eta = scale * x: b_k -> b_k / s_k, A_jk -> A_jk / (s_j s_k)."""
        s = scale.to(torch.float64)
        return QuadraticFit(
            mode=self.mode,
            L0=self.L0,
            b=self.b / s,
            A=self.A / torch.outer(s, s),
            r2=self.r2,
            residuals=self.residuals,
            n_points=self.n_points,
        )


def fit_quadratic(points: torch.Tensor, losses: torch.Tensor, mode: str = "diag") -> QuadraticFit:
    """Least-squares fit of the quadratic model to ``losses[j] = L(points[j])``, in float64.

    Non-finite losses do not raise: they give a fit whose coefficients are NaN (``is_finite`` is False),
    which the safeguards reject.
    """
    check_mode(mode)
    x = points.to(torch.float64)
    y = losses.detach().to(torch.float64).reshape(-1)
    p, k = x.shape
    if y.numel() != p:
        raise ValueError(f"got {y.numel()} losses for {p} probe points")
    needed = n_unknowns(k, mode)
    if p < needed:
        raise ValueError(f"a {mode} model with K={k} has {needed} unknowns; {p} points cannot determine it")
    if not torch.isfinite(y).all():
        nan = torch.full((k,), math.nan, dtype=torch.float64)
        return QuadraticFit(
            mode,
            math.nan,
            nan,
            torch.full((k, k), math.nan, dtype=torch.float64),
            math.nan,
            torch.full((p,), math.nan, dtype=torch.float64),
            p,
        )
    phi = features(x, mode)
    # Centre the targets before solving: losses are ~O(1) apart from tiny probe differences, and
    # subtracting the mean keeps those differences from drowning in the constant.
    y_mean = y.mean()
    theta = torch.linalg.lstsq(phi, (y - y_mean).unsqueeze(1), driver="gelsd").solution.squeeze(1)
    residuals = y - y_mean - phi @ theta
    ss_res = float(residuals @ residuals)
    ss_tot = float(((y - y_mean) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0  # all losses equal: the (flat) fit is exact

    b = theta[1 : 1 + k]
    A = torch.diag(theta[1 + k : 1 + 2 * k])
    if mode == "full" and k > 1:
        for idx, (i, j) in enumerate(itertools.combinations(range(k), 2)):
            A[i, j] = A[j, i] = theta[1 + 2 * k + idx]
    return QuadraticFit(mode, float(theta[0] + y_mean), b, A, r2, residuals, p)


def fit_curvature_known_slope(
    points: torch.Tensor,
    losses: torch.Tensor,
    L0: float,
    b: torch.Tensor,  # noqa: N803
) -> QuadraticFit:
    """The diagonal model with L0 and b known, A_kk fitted: the known-linear-term lever of DESIGN.md.

    When the probe batch is the batch whose gradient G was just computed, b_k = -dL/dx_k = -G_k . u_k is a
    dot product of tensors in hand, so only the curvatures remain: every point gives

        L(x) - L0 + b^T x = 1/2 sum_k A_kk x_k^2,

    solved in least squares for the A_kk (K points on the axes determine it exactly). ``r2`` is that of
    the curvature fit to the residual targets (1 when exactly determined).

    Example:
        >>> import torch
        >>> points = torch.eye(2, dtype=torch.float64)  # x = e_1, e_2
        >>> b, A = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([4.0, 2.0], dtype=torch.float64)
        >>> losses = 3.0 - (points @ b) + 0.5 * (points**2 @ A)
        >>> fit_curvature_known_slope(points, losses, 3.0, b).A.diagonal().tolist()
        [4.0, 2.0]
    """
    x = points.to(torch.float64)
    y = losses.detach().to(torch.float64).reshape(-1)
    b = b.to(torch.float64).reshape(-1)
    p, k = x.shape
    if y.numel() != p or b.numel() != k:
        raise ValueError(f"got {y.numel()} losses and {b.numel()} slopes for {p} points of dimension {k}")
    if p < k:
        raise ValueError(f"{p} points cannot determine {k} curvatures")
    if not (torch.isfinite(y).all() and torch.isfinite(b).all() and math.isfinite(L0)):
        nan = torch.full((k,), math.nan, dtype=torch.float64)
        return QuadraticFit("diag", math.nan, nan, torch.diag(nan), math.nan, torch.full((p,), math.nan), p)
    target = y - L0 + x @ b  # = 1/2 sum_k A_kk x_k^2
    phi = 0.5 * x**2
    a_diag = torch.linalg.lstsq(phi, target.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    residuals = target - phi @ a_diag
    ss_tot = float(((target - target.mean()) ** 2).sum())
    r2 = 1.0 - float(residuals @ residuals) / ss_tot if ss_tot > 0 else 1.0
    return QuadraticFit("diag", float(L0), b, torch.diag(a_diag), r2, residuals, p)


# ---------------------------------------------------------------------------------------------------------
# Solve and influence.
# ---------------------------------------------------------------------------------------------------------


def solve(fit: QuadraticFit, mode: str | None = None) -> torch.Tensor:
    """Unconstrained minimiser of the model: b_k / A_kk (diag) or A^{-1} b (full).

    Diag: entries with A_kk <= 0 are NaN (no minimum along that axis). Full: all NaN when A is not
    positive definite. Use :func:`apply_safeguards` to turn this into learning rates.
    """
    mode = check_mode(mode or fit.mode)
    diag = torch.diagonal(fit.A)
    if mode == "diag":
        return torch.where(diag > 0, fit.b / diag, torch.full_like(diag, math.nan))
    chol, info = torch.linalg.cholesky_ex(fit.A)
    if int(info) != 0 or not fit.is_finite:
        return torch.full_like(fit.b, math.nan)
    return torch.cholesky_solve(fit.b.unsqueeze(1), chol).squeeze(1)  # eta* = A^{-1} b


def influence(fit: QuadraticFit, n_params: torch.Tensor | list[int] | None = None) -> torch.Tensor:
    """Predicted loss decrease from moving group k alone to its optimum: b_k^2 / (2 A_kk).

    With ``n_params`` (parameters per group) it is divided by the count: the per-parameter influence PPI_k.
    Groups without a minimum along their axis (A_kk <= 0) get 0.
    """
    diag = torch.diagonal(fit.A)
    decrease = torch.where(diag > 0, fit.b**2 / (2.0 * diag), torch.zeros_like(diag))
    if n_params is None:
        return decrease
    counts = torch.as_tensor(n_params, dtype=torch.float64)
    return decrease / counts


# ---------------------------------------------------------------------------------------------------------
# Safeguards.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Safeguards:
    """Each safeguard of DESIGN.md section 2; every one can be switched off.

    Args:
        min_r2: reject the whole fit when R^2 is below this (None = off).
        trust_ratio: the new rate stays in [eta / r, eta * r] of the previous one (None = off; GeN: 2).
        smoothing: eta <- s * eta_prev + (1 - s) * eta_new (0 = off; GeN: 0.9).
        smoothing_bias_correction: treat the smoothing as an exponential moving average of the accepted
            proposals with Adam's bias correction, so that the starting rate carries no weight: after n
            accepted fits the effective factor is s (1 - s^n) / (1 - s^(n+1)) (0 for the first fit, then
            rising to s). Without it a poor starting rate is forgotten only at rate s per refit.
        log_smoothing: smooth log eta instead of eta (a geometric average), so that a proposal twice as
            large and one half as large pull equally hard; arithmetic smoothing drifts upwards when the
            proposals are heavy-tailed, as ratios b_k / A_kk of noisy estimates are.
        smooth_decreases: smooth decreases of the rate too; False applies decreases at once (within the
            trust region) and smooths only increases, which leaves an unstable rate quickly.
        believable_ratio: a proposal within [eta / R, eta * R] of the current rate is taken without smoothing
            (near the probed range the model interpolates); None = off. Alone it lets multi-task climb but
            makes digits unstable; HiDLR's default (4) pairs it with the plateau guard of
            ``HiDLR.report_validation`` (docs/method.md).
        lr_bounds: absolute (lr_min, lr_max) (None = off).
        nondescent_shrink: when b_k <= 0 (or the solve gives eta*_k <= 0) the previous rate is multiplied
            by this factor; 1.0 keeps it.
        full_fallback_diag: in full mode, when A is not positive definite, use the diagonal model.
    """

    min_r2: float | None = None
    trust_ratio: float | None = None
    smoothing: float = 0.0
    smoothing_bias_correction: bool = False
    log_smoothing: bool = False
    smooth_decreases: bool = True
    believable_ratio: float | None = None
    lr_bounds: tuple[float, float] | None = None
    nondescent_shrink: float = 1.0
    full_fallback_diag: bool = True

    def __post_init__(self) -> None:
        if self.min_r2 is not None and not (self.min_r2 <= 1.0):
            raise ValueError(f"min_r2 must be <= 1 or None, got {self.min_r2}")
        if self.trust_ratio is not None and not (self.trust_ratio >= 1.0 and math.isfinite(self.trust_ratio)):
            raise ValueError(f"trust_ratio must be a finite number >= 1 or None, got {self.trust_ratio}")
        if self.believable_ratio is not None and not (
            self.believable_ratio >= 1.0 and math.isfinite(self.believable_ratio)
        ):
            raise ValueError(f"believable_ratio must be a finite number >= 1 or None, got {self.believable_ratio}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.lr_bounds is not None:
            if len(self.lr_bounds) != 2:
                raise ValueError(f"lr_bounds must be (lr_min, lr_max), got {self.lr_bounds}")
            object.__setattr__(self, "lr_bounds", tuple(float(v) for v in self.lr_bounds))  # a list compares alike
            lo, hi = self.lr_bounds
            if not (0.0 <= lo < hi):
                raise ValueError(f"lr_bounds must be (lr_min, lr_max) with 0 <= lr_min < lr_max, got {self.lr_bounds}")
        if not 0.0 < self.nondescent_shrink <= 1.0:
            raise ValueError(f"nondescent_shrink must be in (0, 1], got {self.nondescent_shrink}")


@dataclass
class SafeguardResult:
    """Rates after the safeguards, the raw proposal, and which safeguards fired (group indices)."""

    lrs: torch.Tensor
    proposed: torch.Tensor
    fired: dict[str, list[int]] = field(default_factory=dict)
    used_mode: str = "diag"

    @property
    def rejected(self) -> bool:
        return "rejected_fit" in self.fired


def unchanged_groups(points: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Groups whose probes along their own axis leave the loss bitwise equal to the centre's: they do not move.

    A group with no gradient (a frozen branch, LoRA's A while B = 0, an unused expert) changes no probe loss,
    so its b_k and A_kk are least-squares round-off that can pass any sign test. The test is exact, not a
    threshold: the design must hold the centre and at least one point on the group's axis (the axial,
    pairwise and known-slope designs do; a random design does not, and then no group is flagged here).

    Example:
        >>> import torch
        >>> points = axial_design(2)
        >>> losses = 1.0 - points[:, 0] + 0.5 * points[:, 0] ** 2  # group 1 changes nothing
        >>> unchanged_groups(points, losses).tolist()
        [False, True]
    """
    # Plain floats: a handful of comparisons, which as tensor operations cost more than the probes' maths.
    x = points.to(torch.float64).tolist()
    y = losses.reshape(-1).tolist()
    k = points.shape[1]
    centres: list[float] = []
    on_axis: list[list[float]] = [[] for _ in range(k)]  # losses of the points on each group's own axis
    for row, loss in zip(x, y, strict=True):
        moved = [j for j, v in enumerate(row) if v != 0]
        if not moved:
            centres.append(loss)
        elif len(moved) == 1:
            on_axis[moved[0]].append(loss)
    if not centres or not all(math.isfinite(v) for v in centres):
        return torch.zeros(k, dtype=torch.bool)
    l0 = centres[0]
    return torch.tensor([bool(ys) and all(v == l0 for v in ys) for ys in on_axis], dtype=torch.bool)


def apply_safeguards(
    prev: torch.Tensor,
    fit: QuadraticFit,
    guards: Safeguards,
    n_accepted: int = 0,
    dead: torch.Tensor | None = None,
    applied_scale: float = 1.0,
) -> SafeguardResult:
    """Turn a fit (in learning-rate coordinates) into new learning rates, starting from ``prev``.

    ``n_accepted`` is the number of fits accepted before this one (for the smoothing's bias correction);
    ``dead`` marks groups that did not move (see :func:`unchanged_groups`): they keep their rate and stay
    out of the solve. ``applied_scale`` is the factor between these rates and the rates the step uses (the
    horizon factor): the final no-gain check compares the model at the rates actually applied.

    Order: reject the fit (non-finite, R^2) -> solve (full: with the kept groups fixed, falling back to diag
    when A is not positive definite) -> per-group keep on non-convex / non-descent -> trust region ->
    smoothing -> absolute bounds -> in full mode, keep ``prev`` if the model predicts no gain over it.

    Example (full mode, one group does not descend; re-solving with it fixed beats keeping both):
        >>> import torch
        >>> A = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 0.5], dtype=torch.float64)
        >>> fit = QuadraticFit("full", 0.0, b, A, 1.0, torch.zeros(6), 6)
        >>> result = apply_safeguards(torch.ones(2, dtype=torch.float64), fit, Safeguards())
        >>> [round(x, 6) for x in result.lrs.tolist()], result.fired
        ([0.1, 1.0], {'nondescent': [1]})
    """
    prev = prev.to(torch.float64)
    k = prev.numel()
    all_groups = list(range(k))
    fired: dict[str, list[int]] = {}
    nan = torch.full_like(prev, math.nan)
    dead = torch.zeros(k, dtype=torch.bool) if dead is None else dead.to(torch.bool)

    if not fit.is_finite:
        return SafeguardResult(prev.clone(), nan, {"rejected_fit": all_groups, "nonfinite": all_groups}, fit.mode)
    if guards.min_r2 is not None and not fit.r2 >= guards.min_r2:
        return SafeguardResult(prev.clone(), nan, {"rejected_fit": all_groups, "low_r2": all_groups}, fit.mode)
    _record(fired, "dead", dead)

    used_mode = fit.mode
    proposed = solve(fit)  # the unconstrained minimiser, recorded as the proposal
    proposed[dead] = math.nan
    new = None
    if fit.mode == "full":
        new, nondescent = solve_keeping(fit, prev, dead, guards.nondescent_shrink)
        if new is None:
            fired["nonconvex_full"] = torch.nonzero(~dead).flatten().tolist()
            if guards.full_fallback_diag:
                used_mode = "diag"
                proposed = solve(fit, "diag")
                proposed[dead] = math.nan
            else:
                new, nondescent = prev.clone(), torch.zeros(k, dtype=torch.bool)
                _record(fired, "nonconvex", ~dead)
    if new is None:  # diag: each group on its own axis
        nonconvex = ~torch.isfinite(proposed) & ~dead
        nondescent = (fit.b <= 0) & ~nonconvex & ~dead
        # torch.where, not masked assignment: the same values, cheaper on these K-vectors
        new = torch.where(nonconvex | dead, prev, proposed)
        new = torch.where(nondescent, prev * guards.nondescent_shrink, new)
        _record(fired, "nonconvex", nonconvex)
    _record(fired, "nondescent", nondescent)
    new = limit_rates(prev, new, guards, n_accepted, fired)
    new = torch.where(dead, prev, new)  # exactly: smoothing's s * prev + (1 - s) * prev may round; no bounds
    is_dead = dead.tolist()
    for name in [n for n in fired if n != "dead"]:
        fired[name] = [g for g in fired[name] if not is_dead[g]]
        if not fired[name]:
            del fired[name]
    if used_mode == "full" and _predicts_no_gain(fit, new, prev, applied_scale):
        # The trust region clips coordinates independently; with strong cross terms that can cost more
        # than it gains. Never choose rates the model itself predicts to be worse than the current ones.
        new = prev.clone()
        fired["no_predicted_gain"] = all_groups
    return SafeguardResult(new, proposed, fired, used_mode)


def _predicts_no_gain(fit: QuadraticFit, new: torch.Tensor, prev: torch.Tensor, applied_scale: float) -> bool:
    """Whether the model predicts the new rates to be worse than the previous ones (at the applied scale)."""
    chosen, current = fit.predict(torch.stack([new, prev]) * applied_scale).tolist()
    return chosen > current


def solve_keeping(
    fit: QuadraticFit, prev: torch.Tensor, kept: torch.Tensor, shrink: float = 1.0
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Full model minimised over the free groups, the ``kept`` ones fixed at ``prev``; a small active set.

    With F the free and C the fixed groups, the minimiser of L0 - b^T eta + 1/2 eta^T A eta over eta_F is

        eta_F = A_FF^{-1} (b_F - A_FC eta_C).

    Groups whose solution is <= 0 (their direction does not descend once the others move) join the fixed
    set at ``prev * shrink`` and the rest is solved again. Returns (rates, non-descending groups), or
    (None, ...) when A_FF is not positive definite.
    """
    k = prev.numel()
    value = prev.clone()
    kept = kept.clone()
    nondescent = torch.zeros(k, dtype=torch.bool)
    for _ in range(k):
        free = ~kept
        if not free.any():
            break
        a_ff = fit.A[free][:, free]
        rhs = fit.b[free] - fit.A[free][:, kept] @ value[kept]  # b_F - A_FC eta_C
        chol, info = torch.linalg.cholesky_ex(a_ff)
        if int(info) != 0:
            return None, nondescent
        eta_free = torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1)
        bad = eta_free <= 0
        if not bad.any():
            value[free] = eta_free
            break
        newly = torch.nonzero(free).flatten()[bad]
        nondescent[newly] = True
        kept[newly] = True
        value[newly] = prev[newly] * shrink
    return value, nondescent


def limit_rates(
    prev: torch.Tensor,
    new: torch.Tensor,
    guards: Safeguards,
    n_accepted: int = 0,
    fired: dict[str, list[int]] | None = None,
) -> torch.Tensor:
    """The rate-limiting safeguards alone: trust region -> smoothing -> absolute bounds.

    Used on a fit's solution by :func:`apply_safeguards`, and on the best probe point when another Optuna
    sampler is Hi-DLR's inner solver. ``fired`` collects the groups each safeguard clipped.
    """
    fired = {} if fired is None else fired
    prev = prev.to(torch.float64)
    new = new.to(torch.float64)
    believable = None  # proposals near the probed range, taken unsmoothed (before the trust region clips them)
    if guards.believable_ratio is not None:
        ratio = new / prev
        believable = (ratio >= 1.0 / guards.believable_ratio) & (ratio <= guards.believable_ratio)
    if guards.trust_ratio is not None:
        lo, hi = prev / guards.trust_ratio, prev * guards.trust_ratio
        clipped = (new < lo) | (new > hi)
        new = torch.minimum(torch.maximum(new, lo), hi)
        _record(fired, "trust_region", clipped)
    if guards.smoothing > 0:
        s = guards.smoothing
        if guards.smoothing_bias_correction:
            s = s * (1.0 - s**n_accepted) / (1.0 - s ** (n_accepted + 1))
        if guards.log_smoothing:
            smoothed = prev**s * new ** (1.0 - s)  # log eta <- s log eta_prev + (1 - s) log eta_new
        else:
            smoothed = s * prev + (1.0 - s) * new  # eta <- s * eta_prev + (1 - s) * eta_new
        smoothed = smoothed if guards.smooth_decreases else torch.where(new < prev, new, smoothed)
        new = smoothed if believable is None else torch.where(believable, new, smoothed)
    if guards.lr_bounds is not None:
        lo_b, hi_b = guards.lr_bounds
        clipped = (new < lo_b) | (new > hi_b)
        new = new.clamp(lo_b, hi_b)
        _record(fired, "lr_bounds", clipped)
    return new


def _record(fired: dict[str, list[int]], name: str, mask: torch.Tensor) -> None:
    idx = torch.nonzero(mask).flatten().tolist()
    if idx:
        fired[name] = idx
