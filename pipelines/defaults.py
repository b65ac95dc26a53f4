"""Generation defaults shared by the Python API and the `ldm` command, in one place.

No torch or diffusers here: `ldm --help` reads these without paying for the heavy imports.
"""

from __future__ import annotations

SCHEDULER_NAMES = ("ddpm", "ddim", "dpm++", "euler", "euler_a", "unipc", "lcm", "flow-euler")  # schedulers.py maps them
STEP_SCHEDULES = ("karras", "ays")  # pipelines/schedulers.py: where a sampler's steps fall
DEFAULT_SCHEDULER = "dpm++"  # what a training export saves, so diffusers and `generate` sample alike by default
NUM_INFERENCE_STEPS = 30
GUIDANCE_SCALE = 5.0
# a consistency-distilled student (recipes/consistency.py, `fast=True`): the lcm sampler, 1-8 steps
FAST_NUM_INFERENCE_STEPS = 4
LCM_MAX_STEPS = 8

# `ldm eval generate`: the main FIDs' settings and the two sweeps
EVAL_NUM_IMAGES = 1000
EVAL_SWEEP_IMAGES = 200
EVAL_SCHEDULER = "dpm++"
EVAL_NUM_INFERENCE_STEPS = 20
EVAL_GUIDANCE_SCALE = 4.0
EVAL_BATCH_SIZE = 50
# (scheduler, steps) rows of the sampler table, slowest first
SAMPLER_SWEEP = (("ddpm", 1000), ("ddpm", 250), ("ddim", 50), ("dpm++", 20), ("dpm++", 10), ("euler", 30),
                 ("unipc", 10))
GUIDANCE_SWEEP = (1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 9.0)
FAST_SAMPLER_SWEEP = (1, 2, 4, 8)  # lcm steps of a consistency student's sweep

# inpainting: the methods (by the model's U-Net) and how blend / repaint take the pixel mask to latent cells
INPAINT_METHODS = ("unet", "blend", "repaint")
LATENT_MASKS = ("nearest", "cover")
