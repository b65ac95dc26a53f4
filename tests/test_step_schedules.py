"""Step placements (`generate(step_schedule=...)`): Karras sigmas and Align Your Steps give diffusers' pixels for the
same settings, and the ones a sampler or model cannot take are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.schedulers import AysSchedules

from core.errors import UserError
from pipelines import Pipeline
from pipelines.schedulers import ays_timesteps


@pytest.fixture(scope="module")
def theirs(base_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(base_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(folder, **kwargs):
    return Pipeline(model=folder).generate("a cat", guidance_scale=3.0, seed=4, output_type="numpy", progress=False,
                                           **kwargs)


def test_karras_sigmas_are_diffusers_karras_sigmas(base_model_dir, theirs):
    ours = _ours(base_model_dir, num_inference_steps=8, step_schedule="karras")
    theirs.scheduler = DPMSolverMultistepScheduler.from_config({**theirs.scheduler.config, "use_karras_sigmas": True})
    expected = theirs("a cat", num_inference_steps=8, guidance_scale=3.0, generator=torch.Generator().manual_seed(4),
                      output_type="np").images
    assert np.abs(ours - expected).max() <= 1 / 255
    assert np.abs(ours - _ours(base_model_dir, num_inference_steps=8)).max() > 1 / 255  # another placement


def test_align_your_steps_is_diffusers_with_its_timesteps(base_model_dir, theirs):
    assert ays_timesteps(10) == AysSchedules["StableDiffusionTimesteps"]
    steps = ays_timesteps(6)
    assert steps[0] == 999 and steps[-1] == 24 and steps == sorted(set(steps), reverse=True)
    ours = _ours(base_model_dir, num_inference_steps=10, step_schedule="ays")
    theirs.scheduler = DPMSolverMultistepScheduler.from_config(Pipeline(model=base_model_dir).scheduler.config)
    expected = theirs("a cat", timesteps=AysSchedules["StableDiffusionTimesteps"], guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(4), output_type="np").images
    assert np.abs(ours - expected).max() <= 1 / 255


def test_step_schedules_a_sampler_or_model_cannot_take_are_one_line(base_model_dir, tiny_components):
    from ldm.diffusion import NoiseSchedule

    pipe = Pipeline(model=base_model_dir)
    for kwargs, message in ((dict(step_schedule="cosine"), "unknown step_schedule 'cosine'; valid: karras, ays"),
                            (dict(step_schedule="karras", scheduler="ddim"), "needs a sampler with Karras sigmas"),
                            (dict(step_schedule="ays", scheduler="unipc"), "takes a list of timesteps")):
        with pytest.raises(UserError, match=message):
            pipe.generate("a cat", num_inference_steps=4, progress=False, **kwargs)
    linear = DPMSolverMultistepScheduler.from_config(NoiseSchedule(beta_schedule="linear").to_scheduler_config())
    with pytest.raises(UserError, match="optimised for Stable Diffusion's noise schedule; .* beta_schedule"):
        Pipeline(**{**tiny_components, "scheduler": linear}).generate("a cat", num_inference_steps=4,
                                                                      step_schedule="ays", progress=False)
