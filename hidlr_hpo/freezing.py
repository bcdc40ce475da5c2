"""Automatic PEFT: freeze the parameter groups whose measured influence is negligible.

Every refit measures, per group k, the loss decrease that moving group k alone to its fitted optimum would
buy, per parameter of the group (DESIGN.md, the per-parameter influence):

    PPI_k = b_k^2 / (2 A_kk n_k)

A :class:`FreezePolicy` says which groups to freeze from these measurements, smoothed over refits; a
:class:`Freezer` keeps the measurements and decides. :class:`~hidlr_hpo.controller.HiDLR` (its ``freeze=``
argument) carries the decisions out: a frozen group gets ``requires_grad_(False)``, no gradient, no optimizer
state and the rate 0, and the probes skip it, so both backward and the refits get cheaper.

The policies:

- ``budget=x``: train at most a fraction x of the parameters: the groups are taken greedily by smoothed
  PPI (the most loss per parameter first), each if it still fits; the others are frozen;
- ``threshold=r``: freeze a group whose smoothed PPI is below r times the largest group's (scale-free: the
  loss's units cancel);

both after a warm-up (no decision before it), and only for groups measured on at least ``min_refits`` refits.
``groups=[names]`` instead reuses a pattern found before (on another run, or a narrower model of the same
family): exactly these groups freeze when the warm-up ends, whatever they measure.
``revisit=n`` thaws a group n steps after it froze; it is measured again and frozen again only if it still
falls outside the policy (so a group whose influence rose comes back).

Example:
    >>> freezer = Freezer(FreezePolicy(budget=0.5, warmup=0, min_refits=1), n_params=[10, 80, 10])
    >>> freezer.observe(step=0, b=[1.0, 1.0, 0.1], a_diag=[1.0, 1.0, 1.0])
    >>> freezer.decide(step=0)  # group 1 holds 80% of the parameters: it cannot fit a 50% budget
    ([1], [])
    >>> freezer.trainable_fraction
    0.2
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FreezeEvent", "FreezePolicy", "Freezer"]


@dataclass(frozen=True)
class FreezePolicy:
    """Which groups to freeze, from their smoothed per-parameter influence.

    Args:
        budget: train at most this fraction of the parameters, in (0, 1] (groups chosen greedily by
            influence per parameter); None: no budget.
        threshold: freeze a group whose smoothed influence per parameter is below this fraction of the
            largest group's, in [0, 1); None: no threshold. At least one of ``budget``, ``threshold`` and
            ``groups``.
        groups: a fixed pattern, the names of the groups to freeze when the warm-up ends (e.g. a previous
            run's ``HiDLR.frozen_groups``); not with ``budget`` or ``threshold``. None: measure and decide.
        warmup: no freezing before this many steps (an int), or this fraction of ``total_steps`` (a float
            in [0, 1)); the first refits measure a model that is still changing fast.
        min_refits: a group is decided only after this many refits measured it (again after a thaw).
        smoothing: s of the exponential average over refits, PPI <- s PPI + (1 - s) PPI_new, bias-corrected
            (the first measurement is taken as it is).
        revisit: thaw a frozen group this many steps after it froze, to measure it again; None: never.
    """

    budget: float | None = None
    threshold: float | None = None
    warmup: int | float = 0.1
    min_refits: int = 3
    smoothing: float = 0.5
    revisit: int | None = None
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.groups is not None:
            if isinstance(self.groups, str) or not all(isinstance(g, str) for g in self.groups):
                raise ValueError(f"groups must be a list of group names, got {self.groups!r}")
            object.__setattr__(self, "groups", tuple(self.groups))  # frozen dataclass: hashable, and a list works
            if self.budget is not None or self.threshold is not None:
                raise ValueError("FreezePolicy(groups=...) is a fixed pattern: leave budget and threshold unset")
        elif self.budget is None and self.threshold is None:
            raise ValueError(
                "FreezePolicy needs budget= (a fraction of the parameters) or threshold=, or both; or groups= "
                "(a fixed pattern of group names)"
            )
        if self.budget is not None and not (0.0 < self.budget <= 1.0):
            raise ValueError(f"budget must be a fraction of the parameters in (0, 1], got {self.budget!r}")
        if self.threshold is not None and not (0.0 <= self.threshold < 1.0):
            raise ValueError(
                f"threshold must be a fraction of the largest group's influence in [0, 1), got {self.threshold!r}"
            )
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float)):
            raise ValueError(f"warmup must be a number of steps (int) or a fraction (float), got {self.warmup!r}")
        if isinstance(self.warmup, int) and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {self.warmup!r}")
        if isinstance(self.warmup, float) and not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"a float warmup is a fraction of total_steps in [0, 1), got {self.warmup!r}")
        if isinstance(self.min_refits, bool) or not isinstance(self.min_refits, int) or self.min_refits < 1:
            raise ValueError(f"min_refits must be an int >= 1, got {self.min_refits!r}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing!r}")
        if self.revisit is not None and (
            isinstance(self.revisit, bool) or not isinstance(self.revisit, int) or self.revisit < 1
        ):
            raise ValueError(f"revisit must be None or a number of steps >= 1, got {self.revisit!r}")

    def warmup_steps(self, total_steps: int | None) -> int:
        """The warm-up in steps; a fractional one needs the planned number of steps."""
        if isinstance(self.warmup, int):
            return self.warmup
        if total_steps is None:
            raise ValueError(
                f"FreezePolicy(warmup={self.warmup}) is a fraction of total_steps, but HiDLR has total_steps=None; "
                "give the warm-up in steps (an int)"
            )
        return math.ceil(self.warmup * total_steps)


@dataclass
class FreezeEvent:
    """One group frozen or thawed, with the smoothed influence per parameter that decided it."""

    step: int
    group: int
    action: str  # "freeze" or "thaw"
    influence: float  # the smoothed PPI at the decision (NaN for a thaw: the group was not measured while frozen)
    trainable_fraction: float  # after the action


@dataclass
class Freezer:
    """The measurements and decisions of a :class:`FreezePolicy` over K groups of ``n_params`` parameters."""

    policy: FreezePolicy
    n_params: list[int]
    total_steps: int | None = None
    names: list[str] | None = None  # the groups' names: needed by FreezePolicy(groups=...)
    frozen: list[bool] = field(default_factory=list)
    frozen_at: list[int | None] = field(default_factory=list)
    average: list[float] = field(default_factory=list)  # the exponential average, not yet bias-corrected
    averaged: list[int] = field(default_factory=list)  # bounded measurements in it (for the bias correction)
    measured: list[int] = field(default_factory=list)  # refits that measured each group since its last thaw
    unbounded: list[bool] = field(default_factory=list)  # the group's latest measurement had no optimum
    events: list[FreezeEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        k = len(self.n_params)
        if k == 0 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.n_params):
            raise ValueError(f"n_params must be a positive parameter count per group, got {self.n_params!r}")
        self.warmup = self.policy.warmup_steps(self.total_steps)
        self.pattern: set[int] = set()
        if self.policy.groups is not None:
            if self.names is None or len(self.names) != k:
                raise ValueError("FreezePolicy(groups=...) needs the groups' names (HiDLR gives them)")
            unknown = sorted(set(self.policy.groups) - set(self.names))
            if unknown:
                raise ValueError(
                    f"FreezePolicy(groups=...) names {unknown}, which are not groups; the groups: {self.names}"
                )
            self.pattern = {self.names.index(g) for g in self.policy.groups}
        budget = self.policy.budget
        if budget is not None and budget * sum(self.n_params) < min(self.n_params):
            raise ValueError(
                f"FreezePolicy(budget={budget}) allows {budget * sum(self.n_params):.0f} trainable parameters, but the "
                f"smallest group has {min(self.n_params)}: no group fits; raise the budget or split the groups finer"
            )
        self.frozen = self.frozen or [False] * k
        self.frozen_at = self.frozen_at or [None] * k
        self.average = self.average or [0.0] * k
        self.averaged = self.averaged or [0] * k
        self.measured = self.measured or [0] * k
        self.unbounded = self.unbounded or [False] * k

    # ------------------------------------------------------------------------------------------------
    @property
    def trainable_fraction(self) -> float:
        """The fraction of the groups' parameters that are not frozen."""
        live = sum(n for n, f in zip(self.n_params, self.frozen, strict=True) if not f)
        return live / sum(self.n_params)

    def influence(self) -> list[float]:
        """The smoothed influence per parameter of each group: +inf while its latest measurement found no
        optimum (the loss still falls along it), NaN where not measured since its last thaw."""
        s = self.policy.smoothing
        values = []
        for k, (avg, n) in enumerate(zip(self.average, self.averaged, strict=True)):
            if self.unbounded[k]:
                values.append(math.inf)
            else:
                values.append(avg / (1.0 - s**n) if n > 0 else math.nan)
        return values

    def observe(self, step: int, b: Sequence[float], a_diag: Sequence[float], dead: Sequence[int] = ()) -> None:
        """Add one refit's measurement: the fitted b_k and A_kk (rate units) of every group.

        A group that did not move (``dead``: no gradient) measures 0. A group that descends without curvature
        (A_kk <= 0 < b_k) has no optimum along its axis: its influence is unbounded, not small, so it counts
        as +inf until a later refit finds an optimum (the average keeps the bounded measurements only). A
        group whose fit says nothing (NaN) or a frozen one is not measured.
        """
        s = self.policy.smoothing
        for k, (bk, ak) in enumerate(zip(b, a_diag, strict=True)):
            if self.frozen[k]:
                continue
            if k in dead:
                value = 0.0
            elif not (math.isfinite(bk) and math.isfinite(ak)):
                continue
            elif ak <= 0 < bk:
                self.unbounded[k] = True
                self.measured[k] += 1
                continue
            else:
                # PPI_k = b_k^2 / (2 A_kk n_k); a direction that does not descend (b_k <= 0) buys nothing.
                value = bk * bk / (2.0 * ak * self.n_params[k]) if bk > 0 else 0.0
            self.unbounded[k] = False
            self.average[k] = s * self.average[k] + (1.0 - s) * value
            self.averaged[k] += 1
            self.measured[k] += 1

    def decide(self, step: int) -> tuple[list[int], list[int]]:
        """The groups to freeze and to thaw now (applied to this state; the caller applies them to the model)."""
        thaw = self._due_thaws(step)
        for k in thaw:
            self.frozen[k], self.frozen_at[k] = False, None
            self.average[k], self.averaged[k], self.measured[k], self.unbounded[k] = 0.0, 0, 0, False
            self.events.append(FreezeEvent(step, k, "thaw", math.nan, self.trainable_fraction))
        if step < self.warmup:
            return [], thaw
        live = [k for k, f in enumerate(self.frozen) if not f]
        if self.policy.groups is not None:  # a fixed pattern: no measurement decides
            return self._freeze(sorted(k for k in live if k in self.pattern), step), thaw
        if any(self.measured[k] < self.policy.min_refits for k in live):
            return [], thaw  # decide on all live groups at once: the budget compares them with each other
        ppi = self.influence()
        freeze: set[int] = set()
        if self.policy.threshold is not None:  # relative to the largest bounded influence; +inf is never frozen
            bounded = [ppi[k] for k in live if math.isfinite(ppi[k])]
            top = max(bounded, default=0.0)
            freeze |= {k for k in live if ppi[k] < self.policy.threshold * top}
        if self.policy.budget is not None:
            freeze |= set(live) - set(self._within_budget(live, ppi))
        return self._freeze(sorted(freeze), step, ppi), thaw

    def _freeze(self, groups: list[int], step: int, ppi: list[float] | None = None) -> list[int]:
        for k in groups:
            self.frozen[k], self.frozen_at[k] = True, step
            influence = math.nan if ppi is None else ppi[k]
            self.events.append(FreezeEvent(step, k, "freeze", influence, self.trainable_fraction))
        return groups

    def _within_budget(self, live: list[int], ppi: list[float]) -> list[int]:
        """Greedy by influence per parameter: the live groups that fit the budget, the most influential first.

        The groups frozen already stay frozen (they do not count against the budget): a thawed group competes
        with the live ones, and the least influential of them all is frozen again.
        """
        room = self.policy.budget * sum(self.n_params)  # type: ignore[operator]
        kept: list[int] = []
        for k in sorted(live, key=lambda j: (-ppi[j], j)):
            if self.n_params[k] <= room:
                kept.append(k)
                room -= self.n_params[k]
        return kept

    def _due_thaws(self, step: int) -> list[int]:
        if self.policy.revisit is None:
            return []
        return [
            k
            for k, at in enumerate(self.frozen_at)
            if self.frozen[k] and at is not None and step - at >= self.policy.revisit
        ]

    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "frozen": list(self.frozen),
            "frozen_at": list(self.frozen_at),
            "average": list(self.average),
            "averaged": list(self.averaged),
            "measured": list(self.measured),
            "unbounded": list(self.unbounded),
            "events": [asdict(e) for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; everything is checked before anything changes."""
        k = len(self.n_params)
        keys = ("frozen", "frozen_at", "average", "averaged", "measured", "unbounded")
        if not isinstance(state, dict) or set(state) != {*keys, "events"}:
            raise ValueError("the freezer's state must be a dict from Freezer.state_dict()")
        lists = {key: state[key] for key in keys}
        if not all(isinstance(v, list) and len(v) == k for v in lists.values()):
            raise ValueError(f"the freezer's state holds lists of {k} entries (one per group); was it another model's?")
        flags_ok = all(isinstance(f, bool) for key in ("frozen", "unbounded") for f in lists[key])
        counts_ok = all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0
            for key in ("averaged", "measured")
            for n in lists[key]
        )
        if not (flags_ok and counts_ok):
            raise ValueError("the freezer's state has a malformed flag or count")
        try:
            events = [FreezeEvent(**e) for e in state["events"]]
        except TypeError as exc:
            raise ValueError(f"the freezer's state holds a malformed event: {exc}") from exc
        self.frozen, self.frozen_at = list(lists["frozen"]), list(lists["frozen_at"])
        self.average, self.averaged = [float(v) for v in lists["average"]], list(lists["averaged"])
        self.measured, self.unbounded = list(lists["measured"]), list(lists["unbounded"])
        self.events = events
