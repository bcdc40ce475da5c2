"""The methods Hi-DLR is compared with: SAGE, GeN, learning-rate schedules and learning-rate-free optimizers."""

from __future__ import annotations

from .gen import GEN_DEFAULTS, GeN
from .optimizers import OPTIMIZERS, make_optimizer, set_eval_mode
from .sage import AdamaxSAGE, AdamWSAGE
from .schedules import SCHEDULES, make_schedule, schedule_factor

__all__ = [
    "GEN_DEFAULTS",
    "OPTIMIZERS",
    "SCHEDULES",
    "AdamWSAGE",
    "AdamaxSAGE",
    "GeN",
    "make_optimizer",
    "make_schedule",
    "schedule_factor",
    "set_eval_mode",
]
