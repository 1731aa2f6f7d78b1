"""Noise schedulers by name: the set a caller may ask for and a fresh scheduler per call.

:mod:`ebca_core.pipeline` builds its schedulers here and :mod:`ebca_core.loading` sets a model's
default here, so neither needs the other for it.
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ebca_common import params
from ebca_core.errors import InvalidInputError

_CLASSES: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpm_solver": DPMSolverMultistepScheduler,
    "lms": LMSDiscreteScheduler,
}
#: One class per name of the contract's scheduler set (a name without a class fails at import).
SCHEDULERS: dict[str, type[SchedulerMixin]] = {name: _CLASSES[name] for name in params.SCHEDULERS}


def check_scheduler_name(name: object) -> str:
    """``name`` if it is one of :data:`SCHEDULERS`, else :class:`InvalidInputError` naming ``scheduler``."""
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise InvalidInputError(
            f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}", field="scheduler"
        )
    return name


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """A fresh scheduler of kind ``name`` built from a model's scheduler ``config``.

    A fresh object per generation keeps multistep schedulers (PNDM, DPM-Solver, LMS) from carrying
    their history from one call into the next.
    """
    cls = SCHEDULERS[check_scheduler_name(name)]
    overrides: dict[str, Any] = {}
    params = inspect.signature(cls.__init__).parameters
    # diffusers' Stable Diffusion pipelines fix two outdated scheduler settings on load (their
    # deprecation fix-ups), and gamma = 0 must match them exactly: latent diffusion must not clip x0
    # to [-1, 1], and the timesteps start one step after 0.
    if "clip_sample" in params:
        overrides["clip_sample"] = False
    if "steps_offset" in params and config.get("steps_offset", 1) != 1:
        overrides["steps_offset"] = 1
    return cls.from_config(config, **overrides)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The name under which :data:`SCHEDULERS` knows ``scheduler``'s class ("pndm" as a fallback)."""
    for name, cls in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    return "pndm"
