"""Sampler names users pass as `scheduler=` and the diffusers scheduler classes behind them.

All are built from the one scheduler config saved with the model (the training noise schedule), so no sampler can
silently use a different schedule than the U-Net was trained with. A model folder's saved scheduler class is the
default sampler, as it is in diffusers.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from core.errors import UserError
from pipelines.defaults import SCHEDULER_NAMES
from pipelines.loading import read_json

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,  # ancestral sampling, DDPM algorithm 2
    "ddim": DDIMScheduler,  # deterministic (eta = 0)
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++(2M)
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    "lcm": LCMScheduler,  # a consistency-distilled student's sampler, 1-8 steps (recipes/consistency.py)
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def make_scheduler(name: str | SchedulerMixin | None, default: SchedulerMixin) -> SchedulerMixin:
    """A fresh scheduler: by name from `default`'s config, `default`'s own class for None, or a user's instance.

    A learned variance is used by DDPM only; other samplers get the config without it (the pipeline gives them the
    prediction channels alone; DPM-Solver would otherwise cut the output to 3 channels, its pixel-model case).
    """
    if name is None:
        cls = type(default)
    elif not isinstance(name, str):
        return name
    elif name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}'; valid: {', '.join(SCHEDULERS)}")
    else:
        cls = SCHEDULERS[name]
    config = dict(default.config)
    if cls is not DDPMScheduler and config.get("variance_type") in ("learned", "learned_range"):
        config["variance_type"] = None
    return cls.from_config(config)


def uses_learned_variance(scheduler: SchedulerMixin) -> bool:
    """Whether the sampler's step takes the variance channels of a learned-variance model."""
    return isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in ("learned", "learned_range")


def load_scheduler(folder: Path) -> SchedulerMixin:
    """The scheduler saved in a model folder, as the diffusers class it was saved as."""
    config = read_json(folder / "scheduler_config.json")  # whatever class it names
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UserError(f"{folder}/scheduler_config.json names '{config.get('_class_name')}', which is not a "
                        "diffusers scheduler")
    return cls.from_config(config)
