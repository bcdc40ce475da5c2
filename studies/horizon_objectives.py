"""Research variants of HiDLR for issue 11, section 2: a longer-horizon objective and noise-aware fits.

They are subclasses, not options of the library: they are measured by ``studies/defaults.py`` (the labels
"defaults, discounted trajectory mu" and "defaults, (b, A) averaged s") and kept only if they win
(docs/method.md says what they measured). They use HiDLR's seams (``_probe_start``, ``_revised_fit``,
``_after_step``), and checkpoint their own state in ``state_dict()`` (a checkpoint loads only into the same
variant with the same setting).

**Discounted trajectory** (the first-order form of MARTHE, Donini et al. 2020): greedy Hi-DLR probes
``w(t) + x_k u_k``, the last step's update scaled, so the fitted rate is the one that minimises the *next*
loss. MARTHE's hypergradient follows the tangent Z_t = mu * (dPhi/dw) Z_{t-1} + dPhi/deta, the derivative of
the weights with respect to a rate held over the past steps, discounted by mu (mu = 0: greedy; mu = 1: the
whole run). With dPhi/dw ~ I (first order, no Hessian-vector product), Z_t is the discounted sum of the past
updates, D = sum_j mu^j (w(t+1-j) - w(t-j)), and it telescopes:

    D = w(t+1) - e(t),    e(t) = mu * e(t-1) + (1 - mu) * w(t)    (an exponential average of the weights)

so probing along D is probing ``lerp(e(t), w(t+1), c)``: the design's x = 0 is the weights' average instead
of w(t). Along D the oscillating components of the updates (high curvature) cancel and the consistent ones
(low curvature) add up, which is the mechanism of the short-horizon bias (Wu et al., 2018). The fitted
multiplier is applied to the current rate, as if the rates had been constant over the window the average
spans (they changed at refits and with the horizon: an approximation). The step taken is still rescaled
from w(t). Cost: one ``lerp_`` per parameter tensor per step and one copy of the weights.

**(b, A) averaged across refits** (a noise-aware fit): the quadratic's statistics, in rate units, are an
exponential average over refits, b <- s b_prev + (1 - s) b, A <- s A_prev + (1 - s) A (the first fit taken as
it is), and the proposal b_k / A_kk comes from the averages; the rates themselves are then not smoothed
(``smoothing=0``), the trust region still applies. One probe batch's noise in b and A is averaged out instead
of the rates' (GeN smooths the rates).

**Changes within the noise kept** (a noise-aware fit): the probe batch is split in two halves, the design is
evaluated on each, and the pooled losses (their mean) are fitted as usual. For each group the predicted gain
of moving from the current rate eta0 to the rate p the proposal leads to is computed under each half's fit,
G_h = q_h(eta0) - q_h(p); the change is accepted only when mean(G) > z * |G_1 - G_2| / 2 (the
standard error of a mean of two), where p is where the rate-limiting safeguards (trust region, smoothing,
bounds) would take the proposal. Otherwise the group's fit is revised so that its minimum is eta0
(b_k = A_kk eta0_k), and the safeguards keep its rate.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from hidlr_hpo import HiDLR
from hidlr_hpo.controller import mean_over_ranks
from hidlr_hpo.curvature import QuadraticFit, fit_quadratic, limit_rates
from hidlr_hpo.inner import rate_units


def _variant_config(config: dict[str, Any], **setting: Any) -> dict[str, Any]:
    """HiDLR's config with the variant's settings added (merged along a chain of variants)."""
    return {**config, "variant": {**config.get("variant", {}), **setting}}


def _tensors_like(saved: Any, like: list[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Checked copies of a saved list of tensors with the shapes and dtypes of ``like``."""
    ok = isinstance(saved, list) and len(saved) == len(like)
    pairs = zip(saved, like, strict=True) if ok else iter(())
    ok = ok and all(isinstance(t, torch.Tensor) and t.shape == r.shape and t.dtype == r.dtype for t, r in pairs)
    if not ok:
        raise ValueError(f"state_dict['hidlr'][{name!r}] does not match this model's parameters")
    return [t.detach().clone().to(r.device) for t, r in zip(saved, like, strict=True)]


class DiscountedTrajectory(HiDLR):
    """HiDLR whose probes scale the discounted sum of the recent updates, w(t+1) - e(t), not the last one.

    e(-1) is the weights at construction (w(0) when training starts right after).
    """

    def __init__(self, *args: Any, discount: float, **kwargs: Any) -> None:
        if not 0.0 <= discount < 1.0:
            raise ValueError(f"discount must be in [0, 1) (0: greedy Hi-DLR), got {discount!r}")
        if kwargs.get("slope", "probes") != "probes" or kwargs.get("freeze") is not None:
            raise ValueError(
                "the discounted trajectory fits b from the probes, on every group: slope='probes', no freeze"
            )
        super().__init__(*args, **kwargs)
        self.discount = discount
        self._average = self.prober.snapshot()  # e(t), the weights' exponential average, group by group

    def _after_step(self) -> None:
        super()._after_step()
        with torch.no_grad():
            for group, average in zip(self.prober.groups, self._average, strict=True):
                for p, e in zip(group, average, strict=True):
                    e.lerp_(p, 1.0 - self.discount)  # e(t+1) = mu e(t) + (1 - mu) w(t+1), after the rescale

    def _probe_start(self, start: list[list[torch.Tensor] | None]) -> list[list[torch.Tensor] | None]:
        return [None if s is None else e for s, e in zip(start, self._average, strict=True)]

    def config(self) -> dict[str, Any]:
        return _variant_config(super().config(), discount=self.discount)

    def _own_state(self) -> dict[str, Any]:
        return {**super()._own_state(), "trajectory_average": [e.clone() for g in self._average for e in g]}

    def _check_own_state(self, state: dict[str, Any]) -> Any:
        assign = super()._check_own_state(state)
        flat = _tensors_like(
            state.get("trajectory_average"), [e for g in self._average for e in g], "trajectory_average"
        )

        def assign_all() -> None:
            assign()
            values = iter(flat)
            self._average = [[next(values) for _ in g] for g in self._average]

        return assign_all


class AveragedFit(HiDLR):
    """HiDLR whose proposals come from (b, A) averaged over refits, with the rates themselves unsmoothed."""

    def __init__(self, *args: Any, fit_smoothing: float, **kwargs: Any) -> None:
        if not 0.0 <= fit_smoothing < 1.0:
            raise ValueError(f"fit_smoothing must be in [0, 1), got {fit_smoothing!r}")
        if kwargs.get("freeze") is not None or kwargs.get("inner") is not None:
            raise ValueError("the averaged fit averages every group's statistics on the fast path: no freeze, no inner")
        if kwargs.get("slope", "probes") != "probes":
            raise ValueError("the averaged fit revises the probes' fit: slope='probes' (the known slope has its own)")
        kwargs.setdefault("smoothing", 0.0)
        super().__init__(*args, **kwargs)
        self.fit_smoothing = fit_smoothing
        self._b: torch.Tensor | None = None
        self._a: torch.Tensor | None = None

    def _revised_fit(self, fit: QuadraticFit) -> QuadraticFit:
        fit = super()._revised_fit(fit)
        if not fit.is_finite:  # rejected by the safeguards anyway; the averages keep what they had
            return fit
        s = self.fit_smoothing
        if self._b is None or self._a is None:
            self._b, self._a = fit.b, fit.A
        else:
            self._b = s * self._b + (1.0 - s) * fit.b  # b <- s b_prev + (1 - s) b
            self._a = s * self._a + (1.0 - s) * fit.A  # A <- s A_prev + (1 - s) A
        return replace(fit, b=self._b.clone(), A=self._a.clone())

    def config(self) -> dict[str, Any]:
        return _variant_config(super().config(), fit_smoothing=self.fit_smoothing)

    def _own_state(self) -> dict[str, Any]:
        saved = None if self._b is None or self._a is None else [self._b.clone(), self._a.clone()]
        return {**super()._own_state(), "averaged_fit": saved}

    def _check_own_state(self, state: dict[str, Any]) -> Any:
        assign = super()._check_own_state(state)
        saved = state.get("averaged_fit")
        k = self.num_groups
        if saved is not None:
            like = [torch.zeros(k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)]
            saved = _tensors_like(saved, like, "averaged_fit")

        def assign_all() -> None:
            assign()
            self._b, self._a = (None, None) if saved is None else saved

        return assign_all


class DiscountedAveragedFit(DiscountedTrajectory, AveragedFit):
    """Both at once: probes along the discounted trajectory, proposals from (b, A) averaged over refits."""


class _HalvesProber:
    """A Prober that evaluates the design on the two halves of an (x, y) probe batch and returns the mean."""

    def __init__(self, prober: Any) -> None:
        self.inner = prober
        self.halves: tuple[torch.Tensor, torch.Tensor] | None = None
        self.coeffs: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:  # snapshot, restore, groups: the wrapped prober's
        if name == "inner":  # not set yet (while unpickling): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def losses(self, batch: Any, start: Any, coeffs: torch.Tensor) -> torch.Tensor:
        x, y = batch
        n = len(y) // 2
        if n < 1:
            raise ValueError(f"the noise gate splits the probe batch in two halves; got a batch of {len(y)} example(s)")
        # Each half's losses are reduced over the ranks (DDP) before the gate compares them: every rank gates alike.
        first = mean_over_ranks(self.inner.losses((x[:n], y[:n]), start, coeffs))
        second = mean_over_ranks(self.inner.losses((x[n : 2 * n], y[n : 2 * n]), start, coeffs))
        self.halves, self.coeffs = (first, second), coeffs
        return (first + second) / 2  # an odd batch's last example is left out


class NoiseGated(HiDLR):
    """HiDLR that keeps a group's rate when the two probe half-batches do not agree that moving it gains."""

    def __init__(self, *args: Any, gate_z: float, **kwargs: Any) -> None:
        if not gate_z >= 0:
            raise ValueError(f"gate_z must be >= 0, got {gate_z!r}")
        if kwargs.get("mode", "diag") != "diag" or kwargs.get("freeze") is not None or kwargs.get("inner") is not None:
            raise ValueError("the noise gate is for the diag fit on the fast path: mode='diag', no freeze, no inner")
        if kwargs.get("slope", "probes") != "probes" or kwargs.get("batched_probes", False):
            raise ValueError("the noise gate splits the probe batch: slope='probes', batched_probes=False")
        super().__init__(*args, **kwargs)
        self.gate_z = gate_z
        self.prober = _HalvesProber(self.prober)  # type: ignore[assignment]
        self._context: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.n_gated = 0  # group changes kept at the current rate by the gate

    def _refit(self, batch, start, scheduled, eta0, applied, factor, gap):  # type: ignore[no-untyped-def]
        # eta0: the levels the fit is in units of; applied: what the step used; gap: for the safeguards' smoothing
        self._context = (eta0, applied, gap)
        return super()._refit(batch, start, scheduled, eta0, applied, factor, gap)

    def _revised_fit(self, fit: QuadraticFit) -> QuadraticFit:
        fit = super()._revised_fit(fit)
        prober, context = self.prober, self._context
        assert isinstance(prober, _HalvesProber) and prober.halves is not None and context is not None
        if not fit.is_finite:
            return fit
        eta0, applied, gap = context
        # The design in multipliers of eta0 from the probes' coefficients: c_k = x_k eta0_k / applied_k.
        points = prober.coeffs * torch.where(applied > 0, applied / eta0.clamp_min(1e-300), 0.0)
        halves = [rate_units(fit_quadratic(points, losses, "diag"), eta0) for losses in prober.halves]
        b, a = fit.b.clone(), fit.A.diagonal().clone()
        # Where the safeguards would take each proposal (trust region, smoothing, bounds): the change to judge.
        n_accepted = self.n_refits - self.n_rejected
        proposal = torch.where((a > 0) & (b > 0), b / a.clamp_min(1e-300), eta0)
        targets = limit_rates(eta0, proposal, self._guards_after(gap), n_accepted).tolist()
        for k in range(len(b)):
            if not (a[k] > 0 and b[k] > 0):
                continue  # no minimum or no descent: the safeguards keep the rate anyway
            target, now = targets[k], float(eta0[k])
            # G = q(now) - q(target) along axis k, with q(r) = L0 - b r + 1/2 A r^2
            gains = [-float(h.b[k]) * (now - target) + 0.5 * float(h.A[k, k]) * (now**2 - target**2) for h in halves]
            if not sum(gains) / 2 > self.gate_z * abs(gains[0] - gains[1]) / 2:
                b[k] = a[k] * now  # the revised fit's minimum is the current rate
                self.n_gated += 1
        return replace(fit, b=b)

    def config(self) -> dict[str, Any]:
        return _variant_config(super().config(), gate_z=self.gate_z)

    def _own_state(self) -> dict[str, Any]:
        return {**super()._own_state(), "n_gated": self.n_gated}

    def _check_own_state(self, state: dict[str, Any]) -> Any:
        assign = super()._check_own_state(state)
        n_gated = state.get("n_gated")
        if isinstance(n_gated, bool) or not isinstance(n_gated, int) or n_gated < 0:
            raise ValueError(f"state_dict['hidlr']['n_gated'] must be an int >= 0, got {n_gated!r}")

        def assign_all() -> None:
            assign()
            self.n_gated = n_gated

        return assign_all
