"""``HiDLR``: a torch optimizer around another that refits its group learning rates from forward-only probes.

The rate group k steps with is

    eta_k(t) = lr_k(t) * m_k * h(t)

where lr_k(t) is the group's ``lr`` as the user or an LR scheduler sets it (read at every step, never
overwritten), m_k is the multiplier HiDLR fits (1 at the start), and h(t) = max(0, 1 - t / total_steps)
the horizon factor (1 with ``total_steps=None``). So an LR scheduler composes: it gives the shape over
time, the fitted m_k give the level and the ratios between groups. HiDLR writes eta_k into ``group["lr"]``
only for the duration of the base optimizer's step and puts lr_k back afterwards, so chainable schedulers
see their own values; :meth:`HiDLR.lrs` gives the rates actually used.

Every ``interval`` steps (step 0 included), with a batch drawn from the probe source (``probes``) or passed
to :meth:`HiDLR.step` (a refit that falls due on a step without one waits for the next step that has one):

    1. save w(t); let the base optimizer step once with the level eta0 = lr * m (times h): w(t+1) = w(t) + u
    2. for each probe point x^(j) (multipliers of eta0, e.g. the axial design {0, +-e_k}) evaluate
       L_j = L(w(t) + sum_k x_k u_k) on the probe batch, forward only, parameters restored exactly
    3. least-squares fit  L(x) ~= L0 - b^T x + 1/2 x^T A x, rescaled to rates eta = eta0 * x
    4. eta* = b_k / A_kk (diag) or A^{-1} b (full), then the safeguards (R^2, convexity, descent,
       trust region, smoothing, bounds)
    5. the step just taken is rescaled to the new rates, w(t+1) <- w(t) + (eta*_k / eta0_k) u_k, and
       m_k <- eta*_k / lr_k.

The update u_k is linear in the group's learning rate for SGD (with momentum), Adam, AdamW and the like,
and their state (moments) does not depend on it, so step 5 is exactly the step the optimizer would have
taken with eta*: its state advances once per step, refit or not. Other optimizers are refused (see
:mod:`hidlr_hpo.rate_linear`). K = 1 (one group) is GeN.

Short-horizon bias: the fitted rate minimises the *next* loss on the probe batch. ``total_steps`` (the
planned number of steps) multiplies every rate by 1 - t / total_steps, and a held-out probe source makes the
fitted objective a validation loss; both are part of the constructor, and going without either is an
explicit ``None``. docs/method.md says what each measured.

``HiDLR`` is itself a ``torch.optim.Optimizer`` sharing the base optimizer's ``param_groups`` and ``state``
(as timm's Lookahead does), so LR schedulers, ``torch.amp.GradScaler``, Hugging Face ``Trainer`` and
Lightning accept it, and its one ``state_dict()`` checkpoints both.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from .curvature import (
    QuadraticFit,
    Safeguards,
    apply_safeguards,
    check_mode,
    fit_curvature_known_slope,
    influence,
    make_design,
    unchanged_groups,
)
from .freezing import FreezePolicy, Freezer
from .groups import check_param_groups, group_names
from .inner import InnerSolver, Refit, check_inner, rate_units, refit_rates
from .probe import LossFn, Prober
from .rate_linear import check_rate_linear

__all__ = ["HiDLR", "RefitRecord"]

_REQUIRED: Any = object()  # marks the constructor's required keyword arguments, for a clearer error

# A gradient changed by more than this relative amount between backward and step was clipped or rescaled.
_GRAD_CHANGE_TOL = 1e-6


@dataclass
class RefitRecord:
    """What one refit measured and decided (rates are per group, in the optimizer's group order)."""

    step: int
    prev_lrs: list[float]  # rate levels lr_k * m_k before the refit
    proposed: list[float]  # raw model minimiser (NaN where the model has none)
    lrs: list[float]  # rate levels after the safeguards
    applied_lrs: list[float]  # rates the step used (lrs times the horizon factor)
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
    scheduled_lrs: list[float] = field(default_factory=list)  # the groups' own lr (a scheduler's) at the refit
    gap: int = 0  # steps since the previous refit (0 for the first); the smoothing is scaled to it
    # HiDLR(freeze=...) only (None without): the groups frozen after this refit, the smoothed influence per
    # parameter its decision used (NaN where not measured), and the trainable fraction of the parameters.
    frozen: list[int] | None = None
    smoothed_influence: list[float] | None = None
    trainable_fraction: float = 1.0

    @property
    def rejected(self) -> bool:
        return "rejected_fit" in self.fired


class HiDLR(torch.optim.Optimizer):
    r"""Hessian-informed differential learning rates: an optimizer around a rate-linear torch optimizer.

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
        >>> validation = [(torch.randn(32, 4), torch.randn(32, 1))]  # any iterable of batches, or a callable
        >>> opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-3)
        >>> hidlr = HiDLR(opt, model, loss_fn, probes=validation, total_steps=10, interval=5)
        >>> for epoch in range(2):
        ...     for _ in range(5):
        ...         loss_fn(model, (x, y)).backward()
        ...         hidlr.step()  # draws a probe batch when a refit is due
        ...         hidlr.zero_grad()
        ...     with torch.no_grad():  # once per epoch: the plateau guard cuts the rates if this rises
        ...         cut = hidlr.report_validation(loss_fn(model, validation[0]))
        >>> len(hidlr.history), hidlr.last_fit.step
        (2, 5)

    The rates: each group steps with ``group["lr"] * m_k * h(t)`` (see the module docstring); HiDLR fits the
    multipliers m_k, an LR scheduler or the user may set ``group["lr"]`` as usual. Checkpoints:
    ``hidlr.state_dict()`` holds the base optimizer's state and HiDLR's own.

    Args:
        optimizer: the base optimizer; its param groups are the K groups (see ``group_parameters``). Its step
            must be linear in lr (SGD, Adam, AdamW, Adagrad, RMSprop, Adamax, NAdam, RAdam, Adadelta, SAGE;
            see :mod:`hidlr_hpo.rate_linear`); others are refused unless ``assume_rate_linear=True``.
        model: the module whose parameters the optimizer holds; ``loss_fn`` calls it.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, used for the probes (wrap its body in
            ``torch.autocast`` to probe under the same autocast as training).
        probes: where probe batches come from, drawn only when a refit is due: an iterable of batches (a
            ``DataLoader`` over a held-out split, restarted when exhausted), an iterator, or a callable
            returning a batch. ``None``: pass them as ``step(probe_batch=...)`` (the batch just trained on,
            say). Required: say ``None`` explicitly.
        total_steps: the planned number of optimizer steps; the rates are multiplied by
            max(0, 1 - t / total_steps) against the short-horizon bias. Required: ``None`` runs without a
            horizon (greedy rates, which overfit on small tasks).
        refit_until: refits stop after this fraction of ``total_steps`` and the fitted multipliers are kept
            (0.9: the last steps are too small to probe reliably; smaller values tune early, then follow
            the horizon and any schedule, at a fraction of the probe cost).
        interval: refit every this many steps (step 0 included); with ``max_interval`` the shortest gap.
        max_interval: let the gap between refits grow up to this many steps while the rates are settled, and
            shrink back towards ``interval`` while they trend (see :func:`next_gap`); ``"4x"`` (default):
            4 * interval; None keeps ``interval`` fixed. The smoothing is per ``interval`` steps: a refit
            after g steps smooths with s^(g / interval), so that the rates' time constant in steps does not
            depend on the gap.
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
        believable_ratio: a proposal within [eta / R, eta * R] of the current rate is taken without
            smoothing (near the probed range the model interpolates), so the rates climb quickly where the
            fit says so; the plateau guard (:meth:`report_validation`) brakes what the climb overshoots, so
            report a validation loss once per epoch (warned when none has come in half the planned steps).
            None: every proposal smoothed (the defaults before 2026-12-02).
        plateau_factor, plateau_threshold, plateau_patience, plateau_jump: the plateau guard of
            :meth:`report_validation`: a reported validation loss more than ``plateau_threshold``
            (relative) above the best since the last cut is a rise; on more than ``plateau_patience`` rises
            in a row, or one rise above ``plateau_jump`` (a divergence), every multiplier is multiplied by
            ``plateau_factor`` and later refits may not raise it above that. ``plateau_factor=None``:
            reports are recorded, nothing is cut.
        min_r2: reject fits whose R^2 is below this (None: off).
        lr_bounds: absolute (lr_min, lr_max) (None: off).
        nondescent_shrink: factor applied to a group's rate when its direction does not descend (1: keep).
        inner: the inner solver of each refit (see :mod:`hidlr_hpo.inner`): None (Hi-DLR's maths directly),
            ``"hidlr"`` (the same through Optuna's ask-and-tell with :class:`HiDLRSampler`; same rates), or a
            factory ``fn(search_space) -> optuna sampler`` (Grid, TPE, GP, CMA-ES, Random) given the same probe
            budget, whose best probed point becomes the proposal.
        eval_mode: run probes with ``model.eval()`` (each module's own mode is restored afterwards).
        slope: ``"probes"`` (fit b from the probes) or ``"gradient"``: b_k = -G_k . d_k from the gradient the
            step used, L0 and one point per group probed, so a diag refit costs K + 1 probes instead of
            2K + 1. The gradient must be that of the very function the probes evaluate: ``p.grad`` exactly as
            ``loss_fn(model, probe_batch).backward()`` left it, on the batch just trained on. So HiDLR refuses
            it with gradient clipping or loss (un)scaling between backward and step (detected: the gradient
            changed), with active dropout (the probes cannot see the training forward's mask), and with
            BatchNorm in train mode under ``eval_mode=True``. Diag mode and the default inner solver only.
        batched_probes: evaluate each design in one ``vmap`` + ``functional_call`` call (see
            :class:`~hidlr_hpo.probe.Prober`; falls back to the sequential path where vmap cannot run), with
            at most ``probe_memory_budget`` bytes of probe-point parameter copies at once.
        measure_realised: after each refit, evaluate the loss at the step actually taken (one or two more
            forwards on the probe batch) and record the realised beside the predicted decrease. A diagnostic:
            it changes nothing in training and is counted in ``diagnostic_forwards``, not ``probe_forwards``.
        freeze: a :class:`~hidlr_hpo.freezing.FreezePolicy`: after each refit, freeze the groups whose
            measured influence per parameter is negligible (automatic PEFT): ``requires_grad_(False)``, no
            gradient, no optimizer state, rate 0, skipped by the probes. None (default): nothing is frozen.
            With ``slope="probes"`` and a named or random design.
        history_size: keep the records of at most this many recent refits in :attr:`history` (None: all).
        assume_rate_linear: accept an optimizer that is not known to be rate-linear (your own, say).
        seed: seeds the random designs.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        probes: Any = _REQUIRED,
        total_steps: int | None = _REQUIRED,
        interval: int = 10,
        max_interval: int | None | str = "4x",
        refit_until: float = 0.9,
        mode: str = "diag",
        design: str | int | torch.Tensor | None = None,
        delta: float = 1.0,
        trust_ratio: float | None = 2.0,
        smoothing: float = 0.9,
        smoothing_bias_correction: bool = False,
        log_smoothing: bool = False,
        smooth_decreases: bool = True,
        believable_ratio: float | None = 4.0,
        plateau_factor: float | None = 0.5,
        plateau_threshold: float = 0.02,
        plateau_patience: int = 1,
        plateau_jump: float | None = 0.2,
        min_r2: float | None = None,
        lr_bounds: tuple[float, float] | None = (1e-8, 10.0),
        nondescent_shrink: float = 1.0,
        inner: InnerSolver = None,
        eval_mode: bool = True,
        slope: str = "probes",
        batched_probes: bool = False,
        probe_memory_budget: int = 256 * 2**20,
        measure_realised: bool = False,
        freeze: FreezePolicy | None = None,
        history_size: int | None = 1000,
        assume_rate_linear: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
        if total_steps is _REQUIRED:
            raise TypeError(
                "HiDLR needs total_steps=the planned number of optimizer steps (the rates decay over it, against "
                "the short-horizon bias of greedy rates), or total_steps=None to run without a horizon"
            )
        if probes is _REQUIRED:
            raise TypeError(
                "HiDLR needs probes=a source of held-out probe batches (a DataLoader, an iterable or a callable), "
                "or probes=None to pass each as step(probe_batch=...)"
            )
        check_rate_linear(optimizer, assume_rate_linear)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        if isinstance(max_interval, str) and max_interval == "4x":
            max_interval = 4 * interval  # measured: same quality, half the refits (docs/method.md)
        if max_interval is not None and (
            isinstance(max_interval, bool) or not isinstance(max_interval, int) or max_interval < interval
        ):
            raise ValueError(
                f'max_interval must be None, "4x" or an int >= interval ({interval}), got {max_interval!r}'
            )
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(
                f"total_steps must be None or an int >= 1 (the planned number of steps), got {total_steps!r}"
            )
        self._probe_source = _ProbeSource(probes) if probes is not None else None
        if not 0.0 < refit_until <= 1.0:
            raise ValueError(f"refit_until must be a fraction of total_steps in (0, 1], got {refit_until!r}")
        self.refit_until = float(refit_until)
        if history_size is not None and (
            isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1
        ):
            raise ValueError(f"history_size must be None or an int >= 1, got {history_size!r}")
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
        if freeze is not None:
            if not isinstance(freeze, FreezePolicy):
                raise TypeError(
                    f"freeze must be a FreezePolicy (from hidlr_hpo.freezing) or None, got {type(freeze).__name__}"
                )
            if slope != "probes" or isinstance(design, torch.Tensor):
                raise ValueError(
                    "freeze= refits the live groups only, on a design built for them: use slope='probes' and a "
                    "named or random design (not an explicit tensor)"
                )
        self.slope = slope
        self.inner = inner
        self.eval_mode = eval_mode
        check_param_groups(optimizer.param_groups)
        model_params = {id(p) for p in model.parameters()}
        for name, group in zip(group_names(optimizer.param_groups), optimizer.param_groups, strict=True):
            lr = float(group["lr"])
            if not (lr >= 0 and math.isfinite(lr)):
                raise ValueError(f"group {name!r} has lr={lr}; a learning rate must be finite and >= 0")
            if any(id(p) not in model_params for p in group["params"]):
                raise ValueError(
                    f"group {name!r} holds parameters that are not in the model; loss_fn could not probe them"
                )

        self._base = optimizer  # private: wrappers (Lightning's) define their own `optimizer` attribute
        # One optimizer to the outside: the base's groups and state, shared (as timm's Lookahead); __setstate__
        # also sets up torch's step hooks and profiling.
        torch.optim.Optimizer.__setstate__(
            self, {"defaults": optimizer.defaults, "state": optimizer.state, "param_groups": optimizer.param_groups}
        )
        self.model = model
        self.interval = interval
        self.max_interval = interval if max_interval is None else max_interval
        self.horizon = total_steps
        self.measure_realised = measure_realised
        self.history_size = history_size
        if plateau_factor is not None and not (0.0 < plateau_factor <= 1.0):
            raise ValueError(
                f"plateau_factor must be None or in (0, 1] (1: cap without cutting), got {plateau_factor!r}"
            )
        if not (plateau_threshold >= 0.0 and math.isfinite(plateau_threshold)):
            raise ValueError(f"plateau_threshold must be a finite relative margin >= 0, got {plateau_threshold!r}")
        if isinstance(plateau_patience, bool) or not isinstance(plateau_patience, int) or plateau_patience < 0:
            raise ValueError(
                f"plateau_patience must be an int >= 0 (rises tolerated in a row), got {plateau_patience!r}"
            )
        if plateau_jump is not None and not (plateau_jump >= plateau_threshold and math.isfinite(plateau_jump)):
            raise ValueError(
                f"plateau_jump must be None or a relative margin >= plateau_threshold, got {plateau_jump!r}"
            )
        self.plateau_factor, self.plateau_threshold = plateau_factor, float(plateau_threshold)
        self.plateau_patience = plateau_patience
        self.plateau_jump = plateau_jump
        self.guards = Safeguards(
            min_r2=min_r2,
            trust_ratio=trust_ratio,
            smoothing=smoothing,
            smoothing_bias_correction=smoothing_bias_correction,
            log_smoothing=log_smoothing,
            smooth_decreases=smooth_decreases,
            believable_ratio=believable_ratio,
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
        self.freezer = None if freeze is None else Freezer(freeze, self._n_params, total_steps, self.group_names)
        self._grad_sumsq: dict[int, torch.Tensor] = {}  # slope='gradient': |grad|^2 as backward left it
        if slope == "gradient":
            self._check_gradient_function()

        # Mutable state (all of it in state_dict()).
        self.multipliers = torch.ones(k, dtype=torch.float64)  # m_k: the rate is lr_k * m_k * h(t)
        self.step_count = 0
        self.next_refit = 0  # the step at (or after) which the next refit is due
        self.gap = interval  # steps from one refit to the next: adapted between interval and max_interval
        self.last_refit: int | None = None  # the step of the last refit
        self.recent_changes: list[list[float]] = []  # per refit: log(m_new / m_old) per group, per interval steps
        self.history: list[RefitRecord] = []
        self.n_refits = 0  # refits done (history may keep fewer records)
        self.n_rejected = 0  # refits whose fit was rejected (non-finite or low R^2)
        self.n_nonfinite = 0  # refits with a NaN or infinite probe loss
        self.probe_forwards = 0  # forward passes spent on probes
        self.diagnostic_forwards = 0  # forward passes spent measuring realised decreases
        self.diagnostic_seconds = 0.0  # and the time they took (not the method's cost)
        self._last_applied: list[float] | None = None  # the rates the last step used
        self._warned: set[str] = set()
        self.best_validation: float | None = None  # the lowest loss reported since the last plateau cut
        self.ceiling: torch.Tensor | None = None  # multipliers may not rise above this after a plateau cut
        self.plateau_cuts: list[int] = []  # the steps at which the plateau guard cut the rates
        self.bad_reports = 0  # consecutive reports above the best (plus threshold)
        if slope == "gradient":  # last: nothing above can fail and leave a hook behind
            self._hooks = _register_grad_hooks(self, [p for g in optimizer.param_groups for p in g["params"]])

    # ------------------------------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The base optimizer HiDLR steps."""
        return self._base

    @property
    def num_groups(self) -> int:
        return len(self._base.param_groups)

    @property
    def last_fit(self) -> RefitRecord | None:
        return self.history[-1] if self.history else None

    @property
    def base_lrs(self) -> torch.Tensor:
        """The rate levels lr_k * m_k now (before the horizon factor)."""
        return self._scheduled_lrs() * self.multipliers

    @property
    def refit_due(self) -> bool:
        """Whether the next :meth:`step` refits when given a probe batch (a due refit waits for one)."""
        in_phase = self.horizon is None or self.step_count < self.refit_until * self.horizon
        return self.step_count >= self.next_refit and in_phase

    def lrs(self) -> list[float]:
        """The rates the last step used, per group (before any step: the rates the first will use)."""
        if self._last_applied is None:
            return (self.base_lrs * self._horizon_factor(self.step_count)).tolist()
        return list(self._last_applied)

    def _horizon_factor(self, t: int) -> float:
        return 1.0 if self.horizon is None else max(0.0, 1.0 - t / self.horizon)

    def _scheduled_lrs(self) -> torch.Tensor:
        """Each group's own ``lr`` as the user or a scheduler set it: read, never assumed."""
        return torch.tensor(self._scheduled_list(), dtype=torch.float64)

    def _scheduled_list(self) -> list[float]:
        # Plain floats: every step reads them, and K tiny tensor operations per step cost more than the maths.
        lrs = [float(g["lr"]) for g in self._base.param_groups]
        for name, lr in zip(self.group_names, lrs, strict=True):
            if not (lr >= 0 and math.isfinite(lr)):
                raise ValueError(f"group {name!r} has lr={lr}; a learning rate must be finite and >= 0")
        return lrs

    def _set_lrs(self, lrs: list[float]) -> None:
        for group, lr in zip(self._base.param_groups, lrs, strict=True):
            group["lr"] = lr

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None, *, probe_batch: Any = None) -> Any:  # type: ignore[override]
        """Step the base optimizer; when a refit is due (see :attr:`refit_due`) also refit the group rates.

        Args:
            closure: passed to the base optimizer's ``step``.
            probe_batch: the batch the probes evaluate ``loss_fn`` on, instead of one drawn from ``probes``
                (a held-out batch fits a validation loss). Without either a due refit waits for the next
                step that has a batch. A batch on a step where no refit is due is not used (warned once).
        """
        if closure is not None and not callable(closure):
            raise TypeError(
                f"step(closure) got a {type(closure).__name__}, not a callable; pass a probe batch as "
                "step(probe_batch=...)"
            )
        due = self.refit_due
        scheduled = self._scheduled_list()
        factor = self._horizon_factor(self.step_count)
        # eta = (lr * m) * h in float64, as plain floats (bit-identical to the tensor form; cheaper per step)
        applied = [lr * m * factor for lr, m in zip(scheduled, self.multipliers.tolist(), strict=True)]
        if self.freezer is not None:  # a frozen group steps with rate 0 (it has no gradient either)
            applied = [0.0 if frozen else rate for rate, frozen in zip(applied, self.freezer.frozen, strict=True)]
        moving = any(rate > 0 for rate in applied)
        if probe_batch is None and due and self._probe_source is not None and moving:
            probe_batch = self._probe_source.draw()
        if probe_batch is not None and not due:
            self._warn_once(
                "unused_batch",
                f"HiDLR.step got a probe batch at step {self.step_count}, where no refit is due; it is not used. "
                "Pass one only when hidlr.refit_due is True (it saves drawing the batch).",
            )
        elif probe_batch is None and due and self.step_count - self.next_refit >= self.interval:
            self._warn_once(
                "starved",
                f"HiDLR has had no probe batch for {self.step_count - self.next_refit} steps since a refit fell due, "
                "so its rates have not been refitted; pass one to step() when hidlr.refit_due is True.",
            )
        refit = probe_batch is not None and due and moving
        if refit and self.best_validation is None and self.plateau_factor is not None:
            self._warn_if_unguarded()
        if refit and self.slope == "gradient":
            self._check_gradient_function()
            if closure is None:
                self._check_gradient_unchanged()
            else:  # the gradient comes from the closure: check it as soon as the closure returns
                closure = _checked_closure(closure, self._check_gradient_unchanged)
        live = None if self.freezer is None else [not f for f in self.freezer.frozen]
        start = self.prober.snapshot(live) if refit else None
        self._set_lrs(applied)
        stepped = False
        try:
            loss = self._base.step(closure)
            stepped = True
            self._last_applied = applied
            if start is not None:
                self.next_refit = self.step_count + self.gap  # also if the probes raise (out of memory)
                gap = 0 if self.last_refit is None else self.step_count - self.last_refit  # 0: the first refit
                before = self.multipliers
                scheduled_t = torch.tensor(scheduled, dtype=torch.float64)
                level = scheduled_t * self.multipliers  # eta0 = lr * m
                applied_t = torch.tensor(applied, dtype=torch.float64)
                refitted = self._refit(probe_batch, start, scheduled_t, level, applied_t, factor, gap)
                self._last_applied = refitted.tolist()
                self._adapt_gap(before, gap)
            self._after_step()
        finally:
            self._set_lrs(scheduled)  # the user's (scheduler's) own values, untouched
            self._grad_sumsq.clear()
            if stepped:  # the optimizer's state advanced: so does HiDLR's count, whatever the probes did
                self.step_count += 1
        return loss

    # Three seams for research variants (studies/horizon_objectives.py subclasses HiDLR through them;
    # docs/method.md says what they measured). In HiDLR itself they are identities.
    def _probe_start(self, start: list[list[torch.Tensor] | None]) -> list[list[torch.Tensor] | None]:
        """The weights the probes scale from (x = 0 of the design): w(t), those before this step."""
        return start

    def _revised_fit(self, fit: QuadraticFit) -> QuadraticFit:
        """The fit (rate units, live groups) the safeguards turn into rates: this refit's own. Called on the
        fast path only (``inner=None``, ``slope="probes"``)."""
        return fit

    def _after_step(self) -> None:
        """Called once the base optimizer stepped (and a refit rescaled the step), before the count advances."""

    def _warn_if_unguarded(self) -> None:
        """Warn once when half the planned steps (or 1000 without a horizon) passed without a validation
        report: the fast climb of believable proposals then runs without its brake."""
        if self.guards.believable_ratio is None or self.step_count < (self.horizon // 2 if self.horizon else 1000):
            return
        self._warn_once(
            "unguarded",
            f"HiDLR has had no validation loss after {self.step_count} steps: its rates climb quickly "
            f"(believable_ratio={self.guards.believable_ratio:g}) and rely on report_validation(val_loss), "
            "called once per epoch, to cut them when the validation loss rises. Call it, or pass "
            "believable_ratio=None for the slower, smoothed climb.",
        )

    def report_validation(self, loss: float) -> bool:
        """Report a validation loss (once per epoch, say, on the whole validation split); returns whether
        the plateau guard cut the rates.

        The fitted objective is the next loss on one probe batch: too short and too noisy to see overfitting
        or a divergence. The validation loss sees both. A report more than ``plateau_threshold`` (relative)
        above the best since the last cut is a rise; after more than ``plateau_patience`` rises in a row
        (one rise on a small validation split can be noise), or at once for a rise above ``plateau_jump``,
        every multiplier is multiplied by ``plateau_factor`` and capped there: as ReduceLROnPlateau, plus a
        ceiling for the refits. The best is then restarted from the report that caused the cut, so that a
        lucky early epoch does not make every later one a rise. A non-finite loss is ignored (no cut on a
        NaN evaluation).
        """
        if isinstance(loss, torch.Tensor):
            loss = float(loss.detach())
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(f"report_validation takes a float loss, got {type(loss).__name__}")
        # Under DDP every rank cuts at the same report: the mean of the ranks' losses (NaN if any is NaN).
        loss = float(mean_over_ranks(torch.tensor([float(loss)], dtype=torch.float64))[0])
        if not math.isfinite(loss):
            return False
        best = self.best_validation
        if best is None or loss < best:
            self.best_validation = loss
        # Margins relative to the best, with a floor so that a best of 0 (an error rate) does not make any
        # positive loss a rise.
        margin = max(abs(best), 1e-6) if best is not None else 0.0  # 1e-6: float32 round-off of a mean
        if best is None or loss <= best + self.plateau_threshold * margin:
            self.bad_reports = 0
            return False
        self.bad_reports += 1
        jump = self.plateau_jump is not None and loss > best + self.plateau_jump * margin
        if self.plateau_factor is None or (self.bad_reports <= self.plateau_patience and not jump):
            return False
        self.bad_reports = 0
        self.best_validation = loss  # compare with what the cut rates reach, not with a lucky early epoch
        self.multipliers = self.multipliers * self.plateau_factor
        self.ceiling = (
            self.multipliers.clone() if self.ceiling is None else torch.minimum(self.ceiling, self.multipliers)
        )
        self.plateau_cuts.append(self.step_count)
        return True

    def _refit(
        self,
        batch: Any,
        start: list[list[torch.Tensor]],
        scheduled: torch.Tensor,
        eta0: torch.Tensor,
        applied: torch.Tensor,
        factor: float,
        gap: int,
    ) -> torch.Tensor:
        """One refit after the step, ``gap`` steps after the previous one; returns the rates the (rescaled)
        step used."""
        k = self.num_groups
        # The live groups (all but the frozen ones) are the refit's axes: the design, fit and safeguards see
        # only them; a frozen group keeps its multiplier and is not probed.
        live = torch.ones(k, dtype=torch.bool) if self.freezer is None else ~torch.tensor(self.freezer.frozen)
        idx = live.nonzero().flatten()
        design = make_design(self.design_spec, len(idx), self.mode, self.delta, self._generator)
        probe_seconds = 0.0
        moving_all = applied > 0  # a group whose rate is 0 now (a scheduler's warm-up from 0) did not move
        moving, eta0_live, applied_live = moving_all[idx], eta0[idx], applied[idx]
        probe_start = self._probe_start(start)

        def evaluate(points: torch.Tensor) -> torch.Tensor:
            nonlocal probe_seconds
            t0 = time.perf_counter()
            # Probe point x (multipliers of eta0) is w(t) + (x_k eta0_k / applied_k) u_k.
            coeffs = torch.zeros(points.shape[0], k, dtype=torch.float64)
            coeffs[:, idx] = points * torch.where(
                moving, eta0_live / applied_live.clamp_min(1e-300), torch.zeros_like(eta0_live)
            )
            losses = mean_over_ranks(self.prober.losses(batch, probe_start, coeffs))
            probe_seconds += time.perf_counter() - t0
            self.probe_forwards += points.shape[0]
            return losses

        unmoved = (~moving_all | self._unmoved_groups(start))[idx]

        def dead(points: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
            """Groups that did not move: rate 0, a zero update, or axis probes bitwise equal to the centre."""
            return unmoved | unchanged_groups(points, losses)

        n_accepted = self.n_refits - self.n_rejected
        guards = self._guards_after(gap)
        if self.slope == "gradient":
            refit = self._refit_known_slope(start, evaluate, eta0, applied, n_accepted, dead, factor, guards)
        else:
            refit = refit_rates(
                design,
                evaluate,
                eta0_live,
                self.mode,
                guards,
                n_accepted,
                self.inner,
                dead,
                applied_scale=factor,
                revise=self._revised_fit,
            )
        fit, result, losses = refit.fit, refit.result, refit.losses
        self.n_refits += 1
        if not torch.isfinite(losses).all():
            self.n_nonfinite += 1
        lrs = eta0.clone()
        lrs[idx] = result.lrs  # a frozen group keeps its level
        if result.rejected:
            self.n_rejected += 1
            new_applied = applied
        else:
            if self.ceiling is not None:  # after a plateau cut the rates may fall, not rise above the cut
                lrs = torch.minimum(lrs, self.ceiling * scheduled)
            new_applied = torch.where(live, lrs * factor, 0.0)
            self._rescale_last_step(start, torch.where(moving_all, new_applied / applied.clamp_min(1e-300), 1.0))
            # m_k = eta*_k / lr_k; a group with lr 0 (or a frozen one) keeps its multiplier.
            self.multipliers = torch.where(live & (scheduled > 0), lrs / scheduled.clamp_min(1e-300), self.multipliers)

        predicted, realised = math.nan, math.nan
        if self.measure_realised:
            if not result.rejected:
                predicted = fit.L0 - float(fit.predict(new_applied[idx].unsqueeze(0))[0])  # L0 - L(eta taken)
            realised = self._realised_decrease(batch, start, refit.points, losses)
        b, a_matrix = _on_all_groups(fit.b, idx, k), _on_all_groups(fit.A, idx, k)
        fired = {name: [int(idx[g]) for g in groups] for name, groups in result.fired.items()}
        frozen, smoothed = self._after_refit(b, a_matrix, fired, rejected=result.rejected)
        self.history.append(
            RefitRecord(
                step=self.step_count,
                prev_lrs=eta0.tolist(),
                proposed=_on_all_groups(result.proposed, idx, k).tolist(),
                lrs=lrs.tolist(),
                applied_lrs=new_applied.tolist(),
                b=b.tolist(),
                A=a_matrix.tolist(),
                L0=fit.L0,
                r2=fit.r2,
                losses=losses.tolist(),
                influence=_on_all_groups(influence(fit, [self._n_params[i] for i in idx]), idx, k).tolist(),
                fired=fired,
                used_mode=result.used_mode,
                probe_seconds=probe_seconds,
                predicted_decrease=predicted,
                realised_decrease=realised,
                scheduled_lrs=scheduled.tolist(),
                gap=gap,
                frozen=frozen,
                smoothed_influence=smoothed,
                trainable_fraction=self.trainable_fraction,
            )
        )
        if self.history_size is not None and len(self.history) > self.history_size:
            del self.history[: len(self.history) - self.history_size]
        return new_applied

    @torch.no_grad()
    def _refit_known_slope(
        self,
        start: list[list[torch.Tensor]],
        evaluate: Any,
        eta0: torch.Tensor,
        applied: torch.Tensor,
        n_accepted: int,
        dead: Any,
        factor: float,
        guards: Safeguards,
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
        slopes = -torch.stack(dots).cpu() * torch.where(applied > 0, eta0 / applied.clamp_min(1e-300), 0.0)
        points = torch.cat([torch.zeros(1, k), self.delta * torch.eye(k)]).to(torch.float64)
        losses = evaluate(points)
        fit = rate_units(fit_curvature_known_slope(points[1:], losses[1:], float(losses[0]), slopes), eta0)
        result = apply_safeguards(eta0, fit, guards, n_accepted, dead(points, losses), factor)
        return Refit(points, losses, fit, result)

    def _after_refit(
        self, b: torch.Tensor, a_matrix: torch.Tensor, fired: dict[str, list[int]], rejected: bool
    ) -> tuple[list[int] | None, list[float] | None]:
        """Give the refit's measurement to the freezer and carry out its decisions; returns the groups frozen
        now and the smoothed influence the decision used (None, None without ``freeze=``)."""
        if self.freezer is None:
            return None, None
        if not rejected:
            self.freezer.observe(self.step_count, b.tolist(), a_matrix.diagonal().tolist(), fired.get("dead", []))
        smoothed = self.freezer.influence()  # before a thaw resets a group's average
        freeze, thaw = self.freezer.decide(self.step_count)
        self._set_frozen(freeze, thaw)
        return [i for i, f in enumerate(self.freezer.frozen) if f], smoothed

    def _set_frozen(self, freeze: list[int], thaw: list[int]) -> None:
        """Freeze for real: no gradient (so backward skips the group), no optimizer state (freed); or thaw."""
        for k in freeze:
            for p in self._base.param_groups[k]["params"]:
                p.requires_grad_(False)
                p.grad = None
                self._base.state.pop(p, None)
        for k in thaw:
            for p in self._base.param_groups[k]["params"]:
                p.requires_grad_(True)

    @property
    def frozen_groups(self) -> list[str]:
        """The names of the groups frozen now (``freeze=``)."""
        if self.freezer is None:
            return []
        return [name for name, f in zip(self.group_names, self.freezer.frozen, strict=True) if f]

    @property
    def trainable_fraction(self) -> float:
        """The fraction of the groups' parameters not frozen (1 without ``freeze=``)."""
        return 1.0 if self.freezer is None else self.freezer.trainable_fraction

    def _guards_after(self, gap: int) -> Safeguards:
        """The safeguards for a refit ``gap`` steps after the last: smoothing s^(gap / interval), so that an
        exponential average over refits keeps its time constant in steps when the gap grows."""
        guards = self.guards
        if gap <= self.interval or guards.smoothing == 0:
            return guards
        return replace(guards, smoothing=guards.smoothing ** (gap / self.interval))

    def _adapt_gap(self, before: torch.Tensor, gap: int) -> None:
        """After a refit ``gap`` steps after the previous one: record the multipliers' change and set the gap
        to the next refit."""
        gap = gap or self.interval  # the first refit: its change counts as one interval's
        self.last_refit = self.step_count
        if self.max_interval == self.interval:
            return
        # log(m_new / m_old) per `interval` steps, so that changes after gaps of different lengths compare.
        change = (torch.log(self.multipliers / before) * (self.interval / gap)).tolist()
        self.recent_changes = [*self.recent_changes, change][-_TREND_WINDOW:]
        self.gap = next_gap(self.recent_changes, self.gap, self.interval, self.max_interval)
        self.next_refit = self.step_count + self.gap

    def _unmoved_groups(self, start: list[list[torch.Tensor] | None]) -> torch.Tensor:
        """Groups whose update u_k is exactly zero (no gradient, no decay), frozen ones (no start) included."""
        return torch.tensor(
            [
                g_start is None or all(torch.equal(p, s) for p, s in zip(group, g_start, strict=True))
                for group, g_start in zip(self.prober.groups, start, strict=True)
            ]
        )

    # ------------------------------------------------------------------------------------------------
    def _record_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook (slope='gradient'): |grad|^2 as backward left it, on refit steps only."""
        if self.refit_due and p.grad is not None:
            self._grad_sumsq[id(p)] = p.grad.detach().pow(2).sum(dtype=torch.float64)

    def close(self) -> None:
        """Remove the gradient hooks (slope='gradient'); also done when the HiDLR is garbage-collected."""
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []

    def _check_gradient_unchanged(self) -> None:
        """slope='gradient' needs p.grad exactly as backward left it: refuse clipping and (un)scaling."""
        for name, group in zip(self.group_names, self._base.param_groups, strict=True):
            for p in group["params"]:
                recorded = self._grad_sumsq.get(id(p))
                if recorded is None or p.grad is None:
                    continue  # not seen by the hook (HiDLR built after backward): cannot check
                now = p.grad.detach().pow(2).sum(dtype=torch.float64)
                ratio = (
                    float((now / recorded).sqrt()) if float(recorded) > 0 else (1.0 if float(now) == 0 else math.inf)
                )
                if not abs(ratio - 1.0) <= _GRAD_CHANGE_TOL:
                    raise ValueError(
                        f"slope='gradient' takes b from p.grad, but the gradient of group {name!r} changed by a "
                        f"factor {ratio:.4g} between backward and step (gradient clipping, loss scaling, or an "
                        "in-place change), so it is no longer the gradient of the loss the probes evaluate. "
                        "Use slope='probes' with clipping or a GradScaler."
                    )

    def _check_gradient_function(self) -> None:
        """slope='gradient': the probes must evaluate the function the gradient was taken of."""
        if not self.model.training:
            return
        for path, module in self.model.named_modules():
            if not module.training:
                continue
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                raise ValueError(
                    f"slope='gradient' cannot be used with active dropout ({path or 'the model'}: "
                    f"{type(module).__name__}(p={module.p})): the gradient was taken under one random mask, "
                    "which the probes cannot reproduce. Use slope='probes'."
                )
            if self.eval_mode and isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise ValueError(
                    f"slope='gradient' with eval_mode=True cannot be used with a BatchNorm in train mode "
                    f"({path}): the gradient used batch statistics, the eval-mode probes the running ones. "
                    "Pass eval_mode=False (probes then use the batch statistics too) or slope='probes'."
                )

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

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults, state and param_groups; HiDLR is more. Hooks are re-made.
        state = {k: v for k, v in self.__dict__.items() if k != "_hooks"}
        if state.get("_probe_source") is not None:
            state["_probe_source"] = state["_probe_source"].restartable()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if getattr(self, "slope", None) == "gradient" and "_hooks" not in self.__dict__:  # unpickled
            self._hooks = _register_grad_hooks(self, [p for g in self.param_groups for p in g["params"]])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "optimizer"):  # after construction the groups are HiDLR's K axes: fixed
            raise ValueError("HiDLR's parameter groups are fixed at construction; build a new HiDLR to add one")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings that shape the trajectory; a checkpoint loads only into a HiDLR with the same ones."""
        design = self.design_spec if isinstance(self.design_spec, (str, int)) else self.design_spec.tolist()
        return {
            "groups": list(self.group_names),
            "interval": self.interval,
            "max_interval": self.max_interval,
            "mode": self.mode,
            "total_steps": self.horizon,
            "refit_until": self.refit_until,
            "design": design,
            "delta": self.delta,
            "slope": self.slope,
            "eval_mode": self.eval_mode,
            "inner": None if self.inner is None else ("hidlr" if self.inner == "hidlr" else "sampler factory"),
            "safeguards": _plain(asdict(self.guards)),
            "plateau": [self.plateau_factor, self.plateau_threshold, self.plateau_patience, self.plateau_jump],
            "freeze": None if self.freezer is None else asdict(self.freezer.policy),
        }

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, with HiDLR's own state under ``"hidlr"``: one object to checkpoint."""
        return {**self._base.state_dict(), "hidlr": self._own_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: everything is checked first, nothing is changed unless all of it loads."""
        if not isinstance(state_dict, dict) or "hidlr" not in state_dict:
            raise ValueError(
                "HiDLR.load_state_dict needs a dict from HiDLR.state_dict() (the base optimizer's state with HiDLR's "
                "under 'hidlr'); a plain optimizer state dict goes to hidlr.optimizer.load_state_dict"
            )
        assign = self._check_own_state(state_dict["hidlr"])
        self._base.load_state_dict({k: v for k, v in state_dict.items() if k != "hidlr"})
        self.param_groups, self.state = self._base.param_groups, self._base.state  # the base made new ones
        assign()

    def _own_state(self) -> dict[str, Any]:
        return {
            "multipliers": self.multipliers.tolist(),
            "last_applied": self.lrs(),
            "step_count": self.step_count,
            "next_refit": self.next_refit,
            "gap": self.gap,
            "last_refit": self.last_refit,
            "recent_changes": self.recent_changes,
            "history": [asdict(r) for r in self.history],
            "n_refits": self.n_refits,
            "n_rejected": self.n_rejected,
            "n_nonfinite": self.n_nonfinite,
            "probe_forwards": self.probe_forwards,
            "diagnostic_forwards": self.diagnostic_forwards,
            "generator": self._generator.get_state(),
            "best_validation": self.best_validation,
            "ceiling": None if self.ceiling is None else self.ceiling.tolist(),
            "plateau_cuts": list(self.plateau_cuts),
            "bad_reports": self.bad_reports,
            "freezer": None if self.freezer is None else self.freezer.state_dict(),
            "config": self.config(),
        }

    def _check_own_state(self, state: dict[str, Any]) -> Any:
        """Validate HiDLR's part of a state dict; return the function that assigns it."""
        if not isinstance(state, dict):
            raise ValueError(f"state_dict['hidlr'] must be a dict from HiDLR.state_dict(), got {type(state).__name__}")
        required = ("multipliers", "last_applied", "step_count", "next_refit", "history",
                    "n_refits", "n_rejected", "n_nonfinite", "probe_forwards", "diagnostic_forwards", "generator",
                    "config")  # fmt: skip
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"state_dict['hidlr'] is missing {missing}; was it saved by HiDLR.state_dict()?")
        mine, saved = self.config(), _plain(state["config"])
        if isinstance(saved, dict) and "plateau" not in saved:  # saved before the plateau guard: it had none
            saved["plateau"] = [None, *mine["plateau"][1:]]
        if isinstance(saved, dict) and "freeze" not in saved:  # saved before automatic freezing: it froze nothing
            saved["freeze"] = None
        if not isinstance(saved, dict) or saved != mine:
            differ = sorted(key for key in mine if not isinstance(saved, dict) or saved.get(key) != mine.get(key))
            detail = (
                "; ".join(f"{key}: saved {saved.get(key)!r}, here {mine[key]!r}" for key in differ[:4])
                if isinstance(saved, dict)
                else repr(saved)
            )
            hint = ""
            if isinstance(saved, dict) and saved.get("plateau", [0])[0] is None and self.plateau_factor is not None:
                hint = " (a checkpoint without the plateau guard: pass believable_ratio=None, plateau_factor=None)"
            raise ValueError(
                f"the checkpoint was saved by a HiDLR with other settings ({detail}); build it alike{hint}"
            )
        k = self.num_groups
        multipliers = _float_vector(state["multipliers"], k, "multipliers", positive=True)
        last_applied = _float_vector(state["last_applied"], k, "last_applied", positive=False)
        counts = {key: state[key] for key in required if key.startswith(("n_", "probe", "diag", "step", "next"))}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict[{key!r}] must be an int >= 0, got {value!r}")
        names = {f.name for f in fields(RefitRecord)}
        if not isinstance(state["history"], list) or not all(
            isinstance(r, dict) and set(r) <= names for r in state["history"]
        ):
            raise ValueError("state_dict['history'] must be a list of RefitRecord dicts")
        try:
            history = [RefitRecord(**r) for r in state["history"]]
        except TypeError as exc:
            raise ValueError(f"state_dict['history'] holds a malformed RefitRecord: {exc}") from exc
        if self.history_size is not None:
            history = history[-self.history_size :]
        gap, last_refit = state.get("gap", self.interval), state.get("last_refit")
        if isinstance(gap, bool) or not isinstance(gap, int) or not self.interval <= gap <= self.max_interval:
            raise ValueError(f"state_dict['gap'] must be an int in [{self.interval}, {self.max_interval}], got {gap!r}")
        if last_refit is not None and (
            isinstance(last_refit, bool) or not isinstance(last_refit, int) or last_refit < 0
        ):
            raise ValueError(f"state_dict['last_refit'] must be None or an int >= 0, got {last_refit!r}")
        recent = state.get("recent_changes", [])
        if not isinstance(recent, list) or not all(
            isinstance(c, list) and len(c) == k and all(isinstance(v, (int, float)) for v in c) for c in recent
        ):
            raise ValueError(f"state_dict['recent_changes'] must be a list of lists of {k} floats")
        best_validation = state.get("best_validation")
        if best_validation is not None and (
            isinstance(best_validation, bool)
            or not isinstance(best_validation, (int, float))
            or not math.isfinite(best_validation)
        ):
            raise ValueError(f"state_dict['best_validation'] must be None or a finite float, got {best_validation!r}")
        ceiling = state.get("ceiling")
        ceiling = None if ceiling is None else _float_vector(ceiling, k, "ceiling", positive=True)
        bad_reports = state.get("bad_reports", 0)
        if isinstance(bad_reports, bool) or not isinstance(bad_reports, int) or bad_reports < 0:
            raise ValueError(f"state_dict['bad_reports'] must be an int >= 0, got {bad_reports!r}")
        cuts = state.get("plateau_cuts", [])
        if not isinstance(cuts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cuts):
            raise ValueError("state_dict['plateau_cuts'] must be a list of step numbers")
        generator = state["generator"]
        if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
            raise ValueError("state_dict['generator'] must be a torch.Generator state (a uint8 tensor)")
        check = torch.Generator()
        check.set_state(generator)  # raises on a malformed state, before anything is assigned
        freezer = None
        if self.freezer is not None:
            freezer = replace(
                self.freezer, frozen=[], frozen_at=[], average=[], averaged=[], measured=[], unbounded=[], events=[]
            )
            freezer.load_state_dict(state.get("freezer"))  # checked here, assigned below

        def assign() -> None:
            self.multipliers, self._last_applied = multipliers, last_applied.tolist()
            self.history = history
            self.gap, self.last_refit, self.recent_changes = gap, last_refit, [list(map(float, c)) for c in recent]
            for key, value in counts.items():
                setattr(self, key, value)
            self._generator.set_state(generator)
            self.best_validation = None if best_validation is None else float(best_validation)
            self.ceiling, self.plateau_cuts, self.bad_reports = ceiling, list(cuts), bad_reports
            if freezer is not None:  # the checkpoint's frozen groups are frozen in this model too
                self.freezer = freezer
                self._set_frozen(
                    [i for i, f in enumerate(freezer.frozen) if f], [i for i, f in enumerate(freezer.frozen) if not f]
                )

        return assign

    def __repr__(self) -> str:
        rates = ", ".join(f"{n}={lr:.3g}" for n, lr in zip(self.group_names, self.lrs(), strict=True))
        return f"HiDLR({type(self._base).__name__}, mode={self.mode}, interval={self.interval}, lrs: {rates})"


class _ProbeSource:
    """Probe batches on demand from an iterable (restarted when exhausted), an iterator or a callable."""

    def __init__(self, probes: Any) -> None:
        if callable(probes) and not hasattr(probes, "__iter__"):
            self._draw, self._iterable, self._iterator = probes, None, None
        elif hasattr(probes, "__next__"):
            self._draw, self._iterable, self._iterator = None, None, probes
        elif hasattr(probes, "__iter__"):
            self._draw, self._iterable, self._iterator = None, probes, None
        else:
            raise TypeError(
                f"probes must be an iterable of batches (a DataLoader), an iterator or a callable returning a batch, "
                f"or None; got {type(probes).__name__}"
            )

    def restartable(self) -> _ProbeSource:
        """A copy without the running iterator (which cannot be pickled); it restarts the iterable."""
        copy = _ProbeSource.__new__(_ProbeSource)
        copy._draw, copy._iterable = self._draw, self._iterable
        copy._iterator = self._iterator if self._iterable is None else None
        return copy

    def draw(self) -> Any:
        if self._draw is not None:
            return self._draw()
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        try:
            return next(self._iterator)
        except StopIteration:
            if self._iterable is None:
                raise ValueError(
                    "the probes iterator is exhausted; pass a re-iterable (a DataLoader, a list)"
                ) from None
            self._iterator = iter(self._iterable)  # a new pass (a DataLoader reshuffles)
            try:
                return next(self._iterator)
            except StopIteration:
                raise ValueError("probes yields no batch (an empty DataLoader or list?)") from None


_TREND_WINDOW = 4  # refits the trend test looks back over


def next_gap(changes: list[list[float]], gap: int, shortest: int, longest: int) -> int:
    """The gap to the next refit: halved (down to ``shortest``) while a group's rate trends, doubled (up to
    ``longest``) while every group's rate is settled.

    ``changes`` holds the last few refits' log(m_new / m_old) per group. A group trends when the mean of its
    changes is more than two standard errors from zero (a one-sample t statistic |t| > 2): its rate keeps
    moving one way, so refits are still needed. Changes of both signs, or none at all (a rejected fit, a dead
    group), are noise around a settled rate, which a refit every few steps only re-measures.
    """
    if len(changes) < 3:
        return gap  # too few refits to tell a trend from noise
    values = torch.tensor(changes, dtype=torch.float64)  # (refits, K)
    mean = values.mean(dim=0)
    standard_error = values.std(dim=0) / math.sqrt(len(changes))
    trending = (mean.abs() > 2.0 * standard_error) & (mean.abs() > 1e-12)
    return max(shortest, gap // 2) if bool(trending.any()) else min(longest, gap * 2)


def _on_all_groups(values: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """A vector (or matrix) over the live groups ``idx`` as one over all K groups, NaN for the frozen ones."""
    if len(idx) == k:
        return values
    shape = (k,) if values.ndim == 1 else (k, k)
    full = torch.full(shape, math.nan, dtype=values.dtype)
    if values.ndim == 1:
        full[idx] = values
    else:
        full[idx.unsqueeze(1), idx] = values
    return full


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: a config compares alike after a JSON or torch.save round trip."""
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _checked_closure(closure: Any, check: Any) -> Any:
    def checked() -> Any:
        loss = closure()
        check()  # before the optimizer uses the gradient the closure left
        return loss

    return checked


def _register_grad_hooks(owner: HiDLR, params: list[torch.Tensor]) -> list[Any]:
    """Post-accumulate-grad hooks that call ``owner._record_grad`` through a weak reference, removed with it."""
    ref = weakref.ref(owner)

    def hook(p: torch.Tensor) -> None:
        live = ref()
        if live is not None:
            live._record_grad(p)

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]
    weakref.finalize(owner, _remove_all, handles)
    return handles


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def _float_vector(value: Any, k: int, name: str, positive: bool) -> torch.Tensor:
    try:
        vector = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"state_dict[{name!r}] must be a list of {k} numbers, got {value!r}") from exc
    ok = (
        vector.shape == (k,)
        and bool(torch.isfinite(vector).all())
        and bool((vector > 0 if positive else vector >= 0).all())
    )
    if not ok:
        raise ValueError(
            f"state_dict[{name!r}] must be {k} finite numbers {'> 0' if positive else '>= 0'}, got {value!r}"
        )
    return vector


def mean_over_ranks(losses: torch.Tensor) -> torch.Tensor:
    """Under ``torch.distributed`` (DDP), the mean of the probe losses over the ranks, each rank having probed
    its own shard: the fit then sees the loss of the union of the shards, and every rank, fitting the same
    numbers with the same code, applies the same rates. Without a process group, ``losses`` unchanged."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return losses
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = losses.to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / dist.get_world_size()).cpu()
