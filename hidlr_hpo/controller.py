"""``HiDLR``: wrap any torch optimizer and refit its group learning rates from forward-only probes.

Every ``interval`` steps (step 0 included), with the probe batch the caller passes to :meth:`HiDLR.step`:

    1. save w(t); let the base optimizer step once with its current rates eta0: w(t+1) = w(t) + u
    2. for each probe point x^(j) (multipliers of eta0, e.g. the axial design {0, +-e_k}) evaluate
       L_j = L(w(t) + sum_k x_k u_k) on the probe batch, forward only, parameters restored exactly
    3. least-squares fit  L(x) ~= L0 - b^T x + 1/2 x^T A x, rescaled to rates eta = eta0 * x
    4. eta* = b_k / A_kk (diag) or A^{-1} b (full), then the safeguards (R^2, convexity, descent,
       trust region, smoothing, bounds)
    5. the step just taken is rescaled to the new rates, w(t+1) <- w(t) + (eta*_k / eta0_k) u_k, and the
       optimizer's ``lr`` of each group is set to eta*_k.

The update u_k is linear in the group's learning rate for SGD (with momentum), Adam, AdamW and the like,
and their state (moments) does not depend on it, so step 5 is exactly the step the optimizer would have
taken with eta*: its state advances once per step, refit or not. K = 1 (one group) is GeN.

Short-horizon bias: the fitted rate minimises the *next* loss on the probe batch. Pass ``horizon`` (the
planned number of steps) to multiply every rate by 1 - t / horizon, and pass a held-out batch as the probe
batch so that the fitted objective is a validation loss; docs/method.md says what each measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .curvature import Safeguards, apply_safeguards, check_mode, fit_curvature_known_slope, influence, make_design
from .groups import check_param_groups, group_names
from .inner import InnerSolver, Refit, check_inner, refit_rates
from .probe import LossFn, Prober

__all__ = ["HiDLR", "RefitRecord"]

# Below this fraction of the planned horizon the steps are too small to probe reliably: stop refitting.
_MIN_HORIZON_FACTOR_TO_REFIT = 0.1


@dataclass
class RefitRecord:
    """What one refit measured and decided (rates are per group, in the optimizer's group order)."""

    step: int
    prev_lrs: list[float]  # base rates before the refit
    proposed: list[float]  # raw model minimiser (NaN where the model has none)
    lrs: list[float]  # base rates after the safeguards
    applied_lrs: list[float]  # rates given to the optimizer (lrs times the horizon factor)
    b: list[float]
    A: list[list[float]]
    L0: float
    r2: float
    losses: list[float]
    influence: list[float]  # predicted loss decrease per parameter, b_k^2 / (2 A_kk n_k)
    fired: dict[str, list[int]] = field(default_factory=dict)
    used_mode: str = "diag"
    probe_seconds: float = 0.0
    # Model-predicted and measured loss decrease of the step taken, on the probe batch (NaN unless
    # HiDLR(measure_realised=True); the predicted one is NaN when the fit was rejected).
    predicted_decrease: float = math.nan
    realised_decrease: float = math.nan

    @property
    def rejected(self) -> bool:
        return "rejected_fit" in self.fired


class HiDLR:
    r"""Hessian-informed differential learning rates around any ``torch.optim.Optimizer``.

    Example:
        >>> import torch
        >>> from hidlr_hpo import HiDLR, group_parameters
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> def loss_fn(model, batch):
        ...     inputs, targets = batch
        ...     return torch.nn.functional.mse_loss(model(inputs), targets)
        >>> opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-3)
        >>> hidlr = HiDLR(opt, model, loss_fn, interval=5)
        >>> for _ in range(10):
        ...     loss_fn(model, (x, y)).backward()
        ...     hidlr.step((x, y))
        ...     opt.zero_grad()
        >>> len(hidlr.history), hidlr.last_fit.step
        (2, 5)

    Args:
        optimizer: the base optimizer; its param groups are the K groups (see ``group_parameters``).
        model: the module whose parameters the optimizer holds; ``loss_fn`` calls it.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, used for the probes.
        interval: refit every this many steps (step 0 included).
        mode: ``"diag"`` (K axis curvatures; 2K + 1 probes) or ``"full"`` (cross terms too).
        design: ``"axial"`` (default for diag), ``"pairwise"`` (default for full), an int (a random
            design of that many points, which gives a meaningful R^2), or an explicit (P, K) tensor of
            multipliers of the current rates.
        delta: the design's half-width, in multipliers of the current rates.
        trust_ratio: new rate within [eta / r, eta * r] of the previous one (None: off).
        smoothing: eta <- s * eta_prev + (1 - s) * eta_new (0: off); ``smooth_decreases=False`` smooths only
            increases, so a decrease within the trust region applies at once.
        smoothing_bias_correction, log_smoothing, smooth_decreases: see
            :class:`~hidlr_hpo.curvature.Safeguards`.
        min_r2: reject fits whose R^2 is below this (None: off).
        lr_bounds: absolute (lr_min, lr_max) (None: off).
        nondescent_shrink: factor applied to a group's rate when its direction does not descend (1: keep).
        horizon: planned number of steps; rates are multiplied by max(0, 1 - t / horizon) (None: off).
        inner: the inner solver of each refit (see :mod:`hidlr_hpo.inner`): None (Hi-DLR's maths directly),
            ``"hidlr"`` (the same through Optuna's ask-and-tell with :class:`HiDLRSampler`; same rates), or a
            factory ``fn(search_space) -> optuna sampler`` (Grid, TPE, GP, CMA-ES, Random) given the same probe
            budget, whose best probed point becomes the proposal.
        eval_mode: run probes with ``model.eval()``.
        slope: ``"probes"`` (fit b from the probes) or ``"gradient"``: b_k = -G_k . d_k from the gradient the
            step used, L0 and one point per group probed, so a diag refit costs K + 1 probes instead of
            2K + 1. Then the probe batch must be the batch just trained on (the gradient's batch); diag mode
            and the default inner solver only.
        batched_probes: evaluate each design in one ``vmap`` + ``functional_call`` call (see
            :class:`~hidlr_hpo.probe.Prober`; falls back to the sequential path where vmap cannot run), with
            at most ``probe_memory_budget`` bytes of probe-point parameter copies at once.
        measure_realised: after each refit, evaluate the loss at the step actually taken (one or two more
            forwards on the probe batch) and record the realised beside the predicted decrease. A diagnostic:
            it changes nothing in training and is counted in ``diagnostic_forwards``, not ``probe_forwards``.
        seed: seeds the random designs.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        interval: int = 10,
        mode: str = "diag",
        design: str | int | torch.Tensor | None = None,
        delta: float = 1.0,
        trust_ratio: float | None = 2.0,
        smoothing: float = 0.9,
        smoothing_bias_correction: bool = False,
        log_smoothing: bool = False,
        smooth_decreases: bool = True,
        min_r2: float | None = None,
        lr_bounds: tuple[float, float] | None = (1e-8, 10.0),
        nondescent_shrink: float = 1.0,
        horizon: int | None = None,
        inner: InnerSolver = None,
        eval_mode: bool = True,
        slope: str = "probes",
        batched_probes: bool = False,
        probe_memory_budget: int = 256 * 2**20,
        measure_realised: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
            raise ValueError(f"horizon must be None or an int >= 1 (the planned number of steps), got {horizon!r}")
        self.mode = check_mode(mode)
        check_inner(inner)
        if slope not in ("probes", "gradient"):
            raise ValueError(f"slope must be 'probes' or 'gradient', got {slope!r}")
        axial = design is None or (isinstance(design, str) and design == "axial")
        if slope == "gradient" and (self.mode != "diag" or inner is not None or not axial):
            raise ValueError(
                "slope='gradient' fits the diagonal model on its own K + 1 point design: use mode='diag', "
                "inner=None and no design"
            )
        self.slope = slope
        self.inner = inner
        check_param_groups(optimizer.param_groups)
        model_params = {id(p) for p in model.parameters()}
        for name, group in zip(group_names(optimizer.param_groups), optimizer.param_groups, strict=True):
            lr = float(group["lr"])
            if not (lr > 0 and math.isfinite(lr)):
                raise ValueError(f"group {name!r} has lr={lr}; HiDLR needs a positive finite starting rate")
            if any(id(p) not in model_params for p in group["params"]):
                raise ValueError(
                    f"group {name!r} holds parameters that are not in the model; loss_fn could not probe them"
                )

        self.optimizer = optimizer
        self.model = model
        self.interval = interval
        self.horizon = horizon
        self.measure_realised = measure_realised
        self.guards = Safeguards(
            min_r2=min_r2,
            trust_ratio=trust_ratio,
            smoothing=smoothing,
            smoothing_bias_correction=smoothing_bias_correction,
            log_smoothing=log_smoothing,
            smooth_decreases=smooth_decreases,
            lr_bounds=lr_bounds,
            nondescent_shrink=nondescent_shrink,
        )
        self.group_names = group_names(optimizer.param_groups)
        k = len(optimizer.param_groups)
        self._generator = torch.Generator().manual_seed(seed)
        self.design_spec = design if design is not None else ("pairwise" if self.mode == "full" else "axial")
        self.delta = delta
        make_design(self.design_spec, k, self.mode, delta, generator=torch.Generator())  # validate now
        self.prober = Prober(
            model,
            loss_fn,
            [g["params"] for g in optimizer.param_groups],
            eval_mode=eval_mode,
            batched=batched_probes,
            memory_budget=probe_memory_budget,
        )
        self._n_params = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]

        # Mutable state (all of it in state_dict()).
        self.base_lrs = torch.tensor([float(g["lr"]) for g in optimizer.param_groups], dtype=torch.float64)
        self.step_count = 0
        self.history: list[RefitRecord] = []
        self.n_rejected = 0  # refits whose fit was rejected (non-finite or low R^2)
        self.n_nonfinite = 0  # refits with a NaN or infinite probe loss
        self.probe_forwards = 0  # forward passes spent on probes
        self.diagnostic_forwards = 0  # forward passes spent measuring realised decreases
        self.diagnostic_seconds = 0.0  # and the time they took (not the method's cost)

    # ------------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.optimizer.param_groups)

    @property
    def last_fit(self) -> RefitRecord | None:
        return self.history[-1] if self.history else None

    @property
    def refit_due(self) -> bool:
        """Whether the next :meth:`step` refits (when given a probe batch)."""
        return self.step_count % self.interval == 0 and self._horizon_factor(self.step_count) >= (
            _MIN_HORIZON_FACTOR_TO_REFIT if self.horizon else 0.0
        )

    def lrs(self) -> list[float]:
        """The rates the optimizer uses now, per group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _horizon_factor(self, t: int) -> float:
        return 1.0 if self.horizon is None else max(0.0, 1.0 - t / self.horizon)

    def _set_lrs(self, lrs: torch.Tensor) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs.tolist(), strict=True):
            group["lr"] = lr

    # ------------------------------------------------------------------------------------------------
    def step(self, probe_batch: Any = None, closure: Any = None) -> Any:
        """Step the base optimizer; on refit steps (see :attr:`refit_due`) also refit the group rates.

        Args:
            probe_batch: the batch the probes evaluate ``loss_fn`` on. Pass a held-out batch to fit a
                validation loss. ``None`` skips the refit (the step is a plain optimizer step).
            closure: passed to the base optimizer's ``step``.
        """
        factor = self._horizon_factor(self.step_count)
        applied = self.base_lrs * factor
        if self.horizon is not None:
            self._set_lrs(applied)
        if probe_batch is None or not self.refit_due or factor <= 0:
            loss = self.optimizer.step(closure)
        else:
            start = self.prober.snapshot()
            loss = self.optimizer.step(closure)
            self._refit(probe_batch, start, applied, factor)
        self.step_count += 1
        return loss

    def _refit(self, batch: Any, start: list[list[torch.Tensor]], applied: torch.Tensor, factor: float) -> None:
        eta0 = self.base_lrs
        design = make_design(self.design_spec, self.num_groups, self.mode, self.delta, self._generator)
        probe_seconds = 0.0

        def evaluate(points: torch.Tensor) -> torch.Tensor:
            nonlocal probe_seconds
            t0 = time.perf_counter()
            # Probe point x (multipliers of eta0) is w(t) + (x_k eta0_k / applied_k) u_k.
            losses = self.prober.losses(batch, start, points * (eta0 / applied))
            probe_seconds += time.perf_counter() - t0
            self.probe_forwards += points.shape[0]
            return losses

        n_accepted = len(self.history) - self.n_rejected
        if self.slope == "gradient":
            refit = self._refit_known_slope(start, evaluate, eta0, applied, n_accepted)
        else:
            refit = refit_rates(design, evaluate, eta0, self.mode, self.guards, n_accepted, self.inner)
        fit, result, losses = refit.fit, refit.result, refit.losses
        if not torch.isfinite(losses).all():
            self.n_nonfinite += 1
        if result.rejected:
            self.n_rejected += 1
        else:
            new_applied = result.lrs * factor
            self._rescale_last_step(start, new_applied / applied)
            self.base_lrs = result.lrs
            self._set_lrs(new_applied)

        predicted, realised = math.nan, math.nan
        if self.measure_realised:
            taken = torch.tensor(self.lrs(), dtype=torch.float64)
            if not result.rejected:
                predicted = fit.L0 - float(fit.predict(taken.unsqueeze(0))[0])  # L0 - L(eta taken)
            realised = self._realised_decrease(batch, start, refit.points, losses)
        self.history.append(
            RefitRecord(
                step=self.step_count,
                prev_lrs=eta0.tolist(),
                proposed=result.proposed.tolist(),
                lrs=self.base_lrs.tolist(),
                applied_lrs=self.lrs(),
                b=fit.b.tolist(),
                A=fit.A.tolist(),
                L0=fit.L0,
                r2=fit.r2,
                losses=losses.tolist(),
                influence=influence(fit, self._n_params).tolist(),
                fired=result.fired,
                used_mode=result.used_mode,
                probe_seconds=probe_seconds,
                predicted_decrease=predicted,
                realised_decrease=realised,
            )
        )

    @torch.no_grad()
    def _refit_known_slope(
        self,
        start: list[list[torch.Tensor]],
        evaluate: Any,
        eta0: torch.Tensor,
        applied: torch.Tensor,
        n_accepted: int,
    ) -> Refit:
        """Diag refit with b from the gradient the step used and K + 1 probes (the centre and x = delta e_k)."""
        k = self.num_groups
        dots = []  # G_k . u_k per group, kept on the device: one host transfer for all of them
        for group, g_start in zip(self.prober.groups, start, strict=True):
            terms = [
                (p.grad * (p - s)).sum(dtype=torch.float64)
                for p, s in zip(group, g_start, strict=True)
                if p.grad is not None
            ]
            dots.append(
                torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64, device=group[0].device)
            )
        # dL/dx_k at x = 0 is G_k . (eta0_k / applied_k) u_k with u = w(t+1) - w(t); b = -dL/dx.
        slopes = -torch.stack(dots).cpu() * eta0 / applied
        points = torch.cat([torch.zeros(1, k), self.delta * torch.eye(k)]).to(torch.float64)
        losses = evaluate(points)
        fit = fit_curvature_known_slope(points[1:], losses[1:], float(losses[0]), slopes).rescale(eta0)
        return Refit(points, losses, fit, apply_safeguards(eta0, fit, self.guards, n_accepted))

    def _realised_decrease(
        self, batch: Any, start: list[list[torch.Tensor]], design: torch.Tensor, losses: torch.Tensor
    ) -> float:
        """L(w(t)) - L(w(t+1)) on the probe batch, w(t+1) being the parameters now (after any rescale)."""
        k = self.num_groups
        centre = (design == 0).all(dim=1).nonzero()
        coeffs = torch.ones(1, k) if len(centre) else torch.cat([torch.zeros(1, k), torch.ones(1, k)])
        t0 = time.perf_counter()
        values = self.prober.losses(batch, start, coeffs)
        self.diagnostic_seconds += time.perf_counter() - t0
        self.diagnostic_forwards += coeffs.shape[0]
        before = float(losses[int(centre[0])]) if len(centre) else float(values[0])
        return before - float(values[-1])

    @torch.no_grad()
    def _rescale_last_step(self, start: list[list[torch.Tensor]], ratio: torch.Tensor) -> None:
        """w(t+1) <- w(t) + c_k (w(t+1) - w(t)): the step just taken, as if made with the new rates."""
        for group, g_start, c in zip(self.prober.groups, start, ratio.tolist(), strict=True):
            if c == 1.0:
                continue
            for p, s in zip(group, g_start, strict=True):
                p.copy_(torch.lerp(s, p, c))

    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """HiDLR's own state. Like an LR scheduler's, it excludes the optimizer's: save both."""
        return {
            "base_lrs": self.base_lrs.tolist(),
            "step_count": self.step_count,
            "history": [asdict(r) for r in self.history],
            "n_rejected": self.n_rejected,
            "n_nonfinite": self.n_nonfinite,
            "probe_forwards": self.probe_forwards,
            "diagnostic_forwards": self.diagnostic_forwards,
            "generator": self._generator.get_state(),
            "config": {"interval": self.interval, "mode": self.mode, "horizon": self.horizon},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["base_lrs"]) != self.num_groups:
            raise ValueError(f"state_dict has {len(state['base_lrs'])} groups but the optimizer has {self.num_groups}")
        self.base_lrs = torch.tensor(state["base_lrs"], dtype=torch.float64)
        self.step_count = int(state["step_count"])
        self.history = [RefitRecord(**r) for r in state["history"]]
        self.n_rejected = int(state["n_rejected"])
        self.n_nonfinite = int(state["n_nonfinite"])
        self.probe_forwards = int(state["probe_forwards"])
        self.diagnostic_forwards = int(state.get("diagnostic_forwards", 0))
        self._generator.set_state(state["generator"])

    def __repr__(self) -> str:
        rates = ", ".join(f"{n}={lr:.3g}" for n, lr in zip(self.group_names, self.lrs(), strict=True))
        return f"HiDLR({type(self.optimizer).__name__}, mode={self.mode}, interval={self.interval}, lrs: {rates})"
