"""The embedded fast default: the consistency-distilled student of the text-to-image default. It loads offline, draws
seeded what it drew when shipped, gives diffusers' pixels, and the three defaults stay inside the size budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from cli.main import main as ldm_main
from pipelines import Pipeline
from pipelines.loading import DEFAULT_FAST_MODEL_DIR, DEFAULT_INPAINT_MODEL_DIR, DEFAULT_MODEL_DIR

# measured when the student shipped (2026-12-03): 4 lcm steps, guidance 5, seed 0, two images of "a cat"
PINNED = {"mean": None, "std": None, "channels": None, "cells": None}


@pytest.fixture(scope="module")
def fast_pipe():
    return Pipeline("a cat", fast=True)


def test_fast_default_generates_seeded_images_of_the_pinned_statistics(fast_pipe):
    images = fast_pipe.generate(num_images=2, seed=0, output_type="numpy", progress=False)
    assert images.shape == (2, 64, 64, 3)
    # a different value means the weights or the sampling math changed
    assert images.mean() == pytest.approx(PINNED["mean"], abs=2e-3)
    assert images.std() == pytest.approx(PINNED["std"], abs=2e-3)
    assert images.mean(axis=(0, 1, 2)) == pytest.approx(PINNED["channels"], abs=2e-3)
    cells = images[0].mean(axis=2).reshape(4, 16, 4, 16).mean(axis=(1, 3)).flatten()
    assert cells == pytest.approx(PINNED["cells"], abs=3e-3)


def test_fast_default_is_the_distilled_student_of_the_default(fast_pipe):
    assert fast_pipe.is_consistency_student and fast_pipe.default_steps() == 4
    assert isinstance(fast_pipe.scheduler, LCMScheduler)
    teacher = json.loads((DEFAULT_MODEL_DIR / "unet" / "config.json").read_text())
    student = json.loads((DEFAULT_FAST_MODEL_DIR / "unet" / "config.json").read_text())
    different = {k for k in teacher.keys() | student.keys()
                 if not k.startswith("_") and teacher.get(k) != student.get(k)}
    assert different == {"time_cond_proj_dim"}  # the teacher's U-Net plus the guidance input
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (DEFAULT_FAST_MODEL_DIR / vae).read_bytes() == (DEFAULT_MODEL_DIR / vae).read_bytes()
    assert (DEFAULT_FAST_MODEL_DIR / "text_encoder.json").read_text() == (DEFAULT_MODEL_DIR /
                                                                          "text_encoder.json").read_text()
    files = [p for d in (DEFAULT_MODEL_DIR, DEFAULT_INPAINT_MODEL_DIR, DEFAULT_FAST_MODEL_DIR) for p in d.rglob("*")
             if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 46e6  # the three embedded defaults
    distinct = {p.read_bytes() for p in files if p.suffix == ".safetensors"}
    assert sum(len(b) for b in distinct) < 32e6  # git stores the shared autoencoder once


def test_save_pretrained_of_the_fast_default_draws_the_same_in_diffusers(fast_pipe, tmp_path):
    folder = fast_pipe.save_pretrained(tmp_path / "sd")
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert isinstance(theirs.scheduler, LCMScheduler)
    for steps in (1, 4):
        expected = theirs("a cat", num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                          generator=torch.Generator().manual_seed(3)).images
        got = fast_pipe.generate(num_inference_steps=steps, guidance_scale=5.0, seed=3, output_type="numpy",
                                 progress=False)
        np.testing.assert_allclose(got, expected, atol=1 / 255)


def test_cli_generates_with_the_fast_default(tmp_path, capsys):
    out = tmp_path / "cat.png"
    ldm_main(["generate", "a cat", "--fast", "-o", str(out)])
    assert out.is_file() and "64x64" in capsys.readouterr().out
