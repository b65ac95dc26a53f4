"""Sampler names users pass as `scheduler=` and the diffusers scheduler classes behind them.

All are built from the one scheduler config saved with the model (the training noise schedule), so no sampler can
silently use a different schedule than the U-Net was trained with.
"""

from __future__ import annotations

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.errors import UserError

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,  # ancestral sampling, DDPM algorithm 2
    "ddim": DDIMScheduler,  # deterministic (eta = 0)
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++(2M)
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
}


def make_scheduler(name: str | SchedulerMixin, config: dict) -> SchedulerMixin:
    """A fresh scheduler by name (or a user's scheduler instance, returned as is) from the model's config."""
    if not isinstance(name, str):
        return name
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}'; valid: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)
