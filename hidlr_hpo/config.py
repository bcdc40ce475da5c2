"""Study files (``studies/*.toml``): the task, the methods to compare, the budget, the seeds, the storage.

Example ``studies/digits.toml``::

    name = "digits"
    seeds = [0, 1, 2]
    storage = "sqlite:///hidlr-studies.db"
    results_dir = "docs/results/digits"

    [task]
    name = "digits"

    [budget]
    epochs = 30
    batch_size = 64

    [[methods]]
    name = "hidlr-diag"
    kind = "hidlr"
    mode = "diag"

    [[methods]]
    name = "grid"
    kind = "grid"
    lrs = [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1, 3.16e-1]

Every field is validated; an error names the field and the file.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["MethodConfig", "StudyConfig", "describe_method", "load_study_config"]


#: study and method names become folder, file and Optuna study names: letters, digits, _ . -, no leading dot
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=100)]
#: a seed seeds torch and NumPy, whose seeds are 32-bit unsigned
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Strict):
    name: str = Field(description="a built-in task (digits, nam, multitask, sentiment) or 'package.module:factory'")
    options: dict[str, object] = Field(default_factory=dict, description="keyword arguments of the task factory")

    @model_validator(mode="after")
    def _resolvable(self) -> TaskConfig:
        from .tasks import resolve_task  # checked at load time: the factory imports and takes these options

        resolve_task(self.name, self.options)
        return self


class BudgetConfig(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)


def _positive_lr(value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"a learning rate must be positive and finite, got {value}")
    return value


def _check_grid(values: list[float]) -> list[float]:
    for v in values:
        _positive_lr(v)
    if len(set(values)) != len(values):
        raise ValueError(f"the grid repeats a value: {values}")
    return values


def _known_optimizer(name: str) -> str:
    from .baselines.optimizers import OPTIMIZERS

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return name


class _BaseOptimizer(_Strict):
    """The base optimizer of a method, by name (see ``hidlr_hpo.baselines.OPTIMIZERS``), and its options."""

    optimizer: str = "adamw"
    optimizer_options: dict[str, object] = Field(
        default_factory=dict, description="optimizer keyword arguments; plain_groups=[...] for SAGE"
    )

    _optimizer = field_validator("optimizer")(_known_optimizer)


class _Scheduled(_BaseOptimizer):
    """A uniform-lr method with a schedule: constant, linear decay or cosine, after a linear warm-up."""

    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of the steps spent warming up")


class HiDLRMethod(_BaseOptimizer):
    """Hi-DLR over the task's groups (``grouping="single"`` makes it GeN; ``preset="gen"`` GeN's defaults)."""

    kind: Literal["hidlr"]
    name: Name
    preset: Literal["hidlr", "gen"] = "hidlr"
    lr: float = 1e-3
    mode: Literal["diag", "full"] = "diag"
    interval: int = Field(10, ge=1)
    probe: Literal["heldout", "train"] = "heldout"
    horizon: bool = True
    grouping: str | None = None
    options: dict[str, object] = Field(default_factory=dict, description="more HiDLR keyword arguments")
    freeze: dict[str, object] | None = Field(
        None, description="automatic PEFT: FreezePolicy's fields (budget, threshold, warmup, ...); none: no freezing"
    )

    _lr = field_validator("lr")(_positive_lr)

    @field_validator("freeze")
    @classmethod
    def _valid_freeze(cls, value: dict[str, object] | None) -> dict[str, object] | None:
        if value is not None:
            from .freezing import FreezePolicy

            known = set(FreezePolicy.__dataclass_fields__)
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"freeze has unknown keys {unknown}; it takes {sorted(known)}")
            FreezePolicy(**value)  # type: ignore[arg-type]  # its own checks, at load time
        return value

    @model_validator(mode="after")
    def _valid_combination(self) -> HiDLRMethod:
        if self.options.get("slope") == "gradient" and self.probe != "train":
            raise ValueError("options.slope = 'gradient' needs probe = 'train' (b comes from the training gradient)")
        if self.optimizer in ("prodigy", "dadapt-adam", "schedulefree-adamw"):
            raise ValueError(
                f"Hi-DLR cannot wrap {self.optimizer!r}: its update is not linear in lr and its state depends on "
                "lr, so rescaling the step to new rates is not the step it would take"
            )
        return self

    @model_validator(mode="after")
    def _gen_is_one_group(self) -> HiDLRMethod:
        if self.preset == "gen":
            if self.grouping not in (None, "single"):
                raise ValueError(f"preset 'gen' tunes one learning rate: leave grouping unset, not {self.grouping!r}")
            self.grouping = "single"
        return self


Pruner = Literal["none", "successive-halving", "hyperband"]


class HiDLRSearchMethod(HiDLRMethod):
    """The outer search: TPE over Hi-DLR's starting rate, each trial one Hi-DLR run reporting its validation loss
    every epoch, pruned by Optuna's successive-halving or Hyperband pruner (pruned trials' compute counts)."""

    kind: Literal["hidlr-search"]  # type: ignore[assignment]
    n_trials: int = Field(12, ge=1)
    low: float = 1e-4
    high: float = 1e-1
    pruner: Pruner = "successive-halving"
    checks_per_epoch: int = Field(
        1, ge=1, le=20, description="validation checks per epoch that the pruner sees (rungs below one epoch)"
    )

    @model_validator(mode="after")
    def _search_range(self) -> HiDLRSearchMethod:
        _check_range(self.low, self.high)
        if self.preset != "hidlr":
            raise ValueError("hidlr-search searches Hi-DLR's own settings: leave preset unset")
        return self


class FixedMethod(_Scheduled):
    """The base optimizer at one fixed learning rate (e.g. AdamW's default 1e-3)."""

    kind: Literal["fixed"]
    name: Name
    lr: float = 1e-3

    _lr = field_validator("lr")(_positive_lr)


class GridMethod(_Scheduled):
    """Grid search over a uniform learning rate with Optuna's GridSampler; selects on final val loss."""

    kind: Literal["grid"]
    name: Name
    lrs: list[float] = Field(min_length=2)

    _lrs = field_validator("lrs")(_check_grid)


class GroupGridMethod(_Scheduled):
    """Grid search over one learning rate per group (the product grid), for tasks with few groups."""

    kind: Literal["group-grid"]
    name: Name
    lrs: list[float] = Field(min_length=2)
    max_configs: int = Field(64, ge=1, description="refuse product grids larger than this")

    _lrs = field_validator("lrs")(_check_grid)


class TPEMethod(_Scheduled):
    """Optuna's TPESampler over a uniform log learning rate."""

    kind: Literal["tpe"]
    name: Name
    n_trials: int = Field(8, ge=1)
    low: float = 1e-5
    high: float = 1.0
    pruner: Pruner = Field("none", description="stop poor trials early on their per-epoch validation loss")
    checks_per_epoch: int = Field(
        1, ge=1, le=20, description="validation checks per epoch that the pruner sees (rungs below one epoch)"
    )

    @model_validator(mode="after")
    def _range(self) -> TPEMethod:
        _check_range(self.low, self.high)
        return self


def _check_range(low: float, high: float) -> None:
    _positive_lr(low)
    _positive_lr(high)
    if not low < high:
        raise ValueError(f"low must be < high, got low={low}, high={high}")


SearchMethod = TPEMethod | HiDLRSearchMethod

MethodConfig = Annotated[
    HiDLRMethod | HiDLRSearchMethod | FixedMethod | GridMethod | GroupGridMethod | TPEMethod,
    Field(discriminator="kind"),
]


class StudyConfig(_Strict):
    name: Name
    task: TaskConfig
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    storage: str = "sqlite:///hidlr-studies.db"
    results_dir: str = "results"
    methods: list[MethodConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> StudyConfig:
        names = [m.name for m in self.methods]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"method names must be unique; repeated: {duplicated}")
        return self

    def quick(self) -> StudyConfig:
        """A smoke run of the same study, kept apart from it: 2 epochs, the first seed, at most 3 grid values
        (2 per group) and 3 search trials, under its own name (``<name>-quick``: its own Optuna studies and
        MLflow experiment) and results folder (``runs/quick/<name>``), so it never mixes with the full study."""
        methods = []
        for m in self.methods:
            update: dict[str, object] = {}
            if isinstance(m, GridMethod | GroupGridMethod):
                values = sorted(m.lrs)
                keep = 2 if isinstance(m, GroupGridMethod) else 3
                update["lrs"] = sorted({values[0], values[len(values) // 2], values[-1]})[:keep]
            if isinstance(m, TPEMethod | HiDLRSearchMethod):
                update["n_trials"] = min(m.n_trials, 3)
            methods.append(m.model_copy(update=update))
        return self.model_copy(
            update={
                "name": f"{self.name}-quick",
                "results_dir": f"runs/quick/{self.name}",
                "budget": BudgetConfig(epochs=2, batch_size=self.budget.batch_size),
                "seeds": self.seeds[:1],
                "methods": methods,
            }
        )


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a study file; errors name the file and the offending fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study file at {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: invalid study file"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}: {err['msg']}")
        raise ValueError("\n".join(lines)) from None


_OPTIMIZER_LABELS = {
    "adamw": "AdamW",
    "adam": "Adam",
    "adamax": "Adamax",
    "sgd": "SGD",
    "adamw-sage": "AdamW-SAGE",
    "adamax-sage": "Adamax-SAGE",
    "prodigy": "Prodigy",
    "dadapt-adam": "D-Adapt Adam",
    "schedulefree-adamw": "Schedule-Free AdamW",
}


def describe_method(method: MethodConfig) -> str:
    """A short description of a method's configuration for the table."""
    opt = _OPTIMIZER_LABELS.get(method.optimizer, method.optimizer)
    pruned = "" if getattr(method, "pruner", "none") == "none" else f", {method.pruner} pruning"  # type: ignore[union-attr]
    if pruned and getattr(method, "checks_per_epoch", 1) > 1:
        pruned += f" ({method.checks_per_epoch} checks per epoch)"  # type: ignore[union-attr]
    if isinstance(method, HiDLRSearchMethod):
        return (
            f"TPE over Hi-DLR {method.mode}'s starting lr in [{method.low:g}, {method.high:g}], "
            f"{method.n_trials} trials{pruned}, on {opt}, probe {method.probe}"
        )
    if isinstance(method, HiDLRMethod):
        if method.preset == "gen":
            return f"GeN preset (interval 4, R^2 >= 0.99) on {opt}, from lr={method.lr:g}, probe {method.probe}"
        groups = "one group (GeN)" if method.grouping == "single" else "task groups"
        freeze = method.freeze or {}
        frozen = ", freezing " + ", ".join(f"{k}={v}" for k, v in freeze.items()) if freeze else ""
        return f"Hi-DLR {method.mode} on {opt}, {groups}, from lr={method.lr:g}, probe {method.probe}{frozen}"
    schedule = "" if method.schedule == "constant" else f", {method.schedule} decay"
    if method.warmup:
        schedule += f", warm-up {method.warmup:.0%}"
    if isinstance(method, FixedMethod):
        return f"{opt}, fixed lr={method.lr:g}{schedule}"
    if isinstance(method, GridMethod):
        return f"{opt}, uniform lr grid, {len(method.lrs)} values {min(method.lrs):g}..{max(method.lrs):g}{schedule}"
    if isinstance(method, GroupGridMethod):
        return f"{opt}, per-group lr grid, {len(method.lrs)} values per group{schedule}"
    return f"{opt}, TPE over uniform lr in [{method.low:g}, {method.high:g}]{schedule}{pruned}"
