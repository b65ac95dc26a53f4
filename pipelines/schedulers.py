"""Sampler names users pass as `scheduler=` and the diffusers scheduler classes behind them.

All are built from the one scheduler config saved with the model (the training noise schedule), so no sampler can
silently use a different schedule than the U-Net was trained with. A model folder's saved scheduler class is the
default sampler, as it is in diffusers.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import diffusers
import numpy as np
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler,
                       UniPCMultistepScheduler)
from diffusers.schedulers import AysSchedules
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from core.errors import UserError
from pipelines.defaults import SCHEDULER_NAMES, STEP_SCHEDULES
from pipelines.loading import read_json

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,  # ancestral sampling, DDPM algorithm 2
    "ddim": DDIMScheduler,  # deterministic (eta = 0)
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++(2M)
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    "lcm": LCMScheduler,  # a consistency-distilled student's sampler, 1-8 steps (recipes/consistency.py)
    "flow-euler": FlowMatchEulerDiscreteScheduler,  # a flow-matching model's (prediction_type=flow) and only its
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


def is_flow_scheduler(scheduler: SchedulerMixin) -> bool:
    """Whether `scheduler` is one of diffusers' flow-matching samplers (FlowMatchEuler..., FlowMatchHeun..., ...):
    what a flow-matching model (ldm/diffusion.py, prediction_type=flow) samples with, and only it."""
    return type(scheduler).__name__.startswith("FlowMatch")


def check_flow_match(sampler: SchedulerMixin, flow_model: bool) -> None:
    """A flow-matching sampler for a flow-matching model, a diffusion sampler otherwise; one line when not."""
    if flow_model and not is_flow_scheduler(sampler):
        raise UserError(f"this is a flow-matching model (prediction_type=flow): it samples with flow-euler, not "
                        f"{type(sampler).__name__}")
    if is_flow_scheduler(sampler) and not flow_model:
        raise UserError(f"{type(sampler).__name__} (flow-euler) samples flow-matching models (prediction_type=flow); "
                        "this model was trained on a diffusion schedule")


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


# Step placements a sampler can take instead of its default spacing (`generate(step_schedule=...)`):
# "karras": the sigmas of Karras et al. 2022 (EDM eq. 5, rho 7), for samplers with diffusers' use_karras_sigmas;
# "ays": "Align Your Steps" (Sabour et al. 2024), the 10 timesteps optimised for Stable Diffusion 1.5's noise schedule
# (diffusers' AysSchedules), log-linearly interpolated for other step counts as the paper does. That schedule is the
# embedded default's too (scaled linear, 0.00085-0.012, 1000 steps); other schedules refuse it.
AYS_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012}


def with_step_schedule(sampler: SchedulerMixin, step_schedule: str | None) -> SchedulerMixin:
    """`sampler` rebuilt to place its steps by `step_schedule` (None: unchanged); one line when it cannot."""
    if step_schedule is None:
        return sampler
    if step_schedule not in STEP_SCHEDULES:
        raise UserError(f"unknown step_schedule '{step_schedule}'; valid: {', '.join(STEP_SCHEDULES)}")
    if isinstance(sampler, LCMScheduler):
        raise UserError(f"step_schedule={step_schedule}: a consistency student samples on its own timestep grid "
                        "(the lcm sampler); leave step_schedule out")
    if is_flow_scheduler(sampler):
        raise UserError(f"step_schedule={step_schedule}: a flow-matching model samples on flow-euler's own grid "
                        "here; leave step_schedule out")
    name = type(sampler).__name__
    if step_schedule == "karras":
        if "use_karras_sigmas" not in inspect.signature(type(sampler).__init__).parameters:
            raise UserError(f"step_schedule=karras needs a sampler with Karras sigmas (dpm++, euler, euler_a, unipc); "
                            f"{name} has none")
        return type(sampler).from_config({**sampler.config, "use_karras_sigmas": True})
    if "timesteps" not in inspect.signature(sampler.set_timesteps).parameters:
        raise UserError(f"step_schedule=ays needs a sampler that takes a list of timesteps (dpm++, euler); {name} "
                        "does not")
    config = sampler.config
    differs = [k for k, v in AYS_SCHEDULE.items()
               if (config.get(k) != v if isinstance(v, (str, int)) else not math.isclose(config.get(k, 0), v))]
    if differs:
        raise UserError(f"step_schedule=ays was optimised for Stable Diffusion's noise schedule; this model's differs "
                        f"in {', '.join(differs)}")
    return sampler


def ays_timesteps(num_inference_steps: int) -> list[int]:
    """Align Your Steps' timesteps for `num_inference_steps` steps: the stored 10, or their interpolation linear in
    log t (the paper's `loglinear_interp` works on sigmas; on timesteps it keeps both ends), descending, distinct."""
    stored = np.array(AysSchedules["StableDiffusionTimesteps"], dtype=np.float64)
    if num_inference_steps < 2:
        raise UserError("step_schedule=ays needs at least 2 steps (one step would start at its last, low-noise "
                        "timestep); pass step_schedule=None (--step-schedule none) for 1 step")
    if num_inference_steps == len(stored):
        return [int(t) for t in stored]
    xs = np.linspace(0, 1, len(stored))
    new = np.exp(np.interp(np.linspace(0, 1, num_inference_steps), xs, np.log(stored[::-1])))[::-1]
    steps = sorted({int(round(t)) for t in new}, reverse=True)
    if len(steps) != num_inference_steps:
        raise UserError(f"step_schedule=ays gives {len(steps)} distinct timesteps for {num_inference_steps} steps; "
                        "use fewer steps")
    return steps
