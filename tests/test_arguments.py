"""The one validation layer of generation arguments (pipelines/arguments.py), through the public API: every bad
argument a UserError with the fix, every accepted image kind read as the same picture, limits users can raise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from pipelines import InpaintPipeline, Pipeline
from pipelines.arguments import Limits

FAST = dict(num_inference_steps=2, seed=0, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images": 2.0}, "num_images must be a whole number, got 2.0"),
    ({"num_images": True}, "num_images must be a whole number, got True"),
    ({"height": 32.0}, "height must be a whole number"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be a whole number"),
    ({"guidance_scale": math.inf}, "guidance_scale must be a finite number >= 0, got inf"),
    ({"guidance_scale": math.nan}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": "5"}, "guidance_scale must be a finite number >= 0, got '5'"),
    ({"seed": 2**64}, "seed must be between 0 and 18446744073709551615"),
    ({"seed": -1}, "seed must be between 0"),
    ({"scheduler": 3}, "scheduler must be a sampler name or a diffusers scheduler, got int"),
    ({"prompt": 42}, "prompt must be a string or a list of strings, got int"),
    ({"prompt": ["a cat", None]}, "prompt must be a string or a list of strings"),
    ({"prompt": "caf\udce9"}, "prompt is not valid UTF-8 text"),  # what Python makes of non-UTF-8 argv bytes
    ({"negative_prompt": ["a", "b"]}, "got 2 negative prompts for 1 prompts"),
    ({"num_images": 65}, "65 images in one call is over the limit of 64"),
    ({"height": 2112, "width": 2112}, "is over the limit of 4 MP per image"),
    ({"num_images": 20, "height": 1024, "width": 1024}, "are over the limit of 16 MP per call"),
])
def test_bad_generate_arguments_are_refused_before_any_work(tiny_components, kwargs, message):
    pipe = Pipeline("a cat", **tiny_components)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe.generate(**{**FAST, **kwargs})


def test_limits_can_be_raised_on_purpose(tiny_components):
    pipe = Pipeline("a cat", **tiny_components)
    pipe.limits = Limits(max_images=70)
    assert len(pipe.generate(num_images=65, num_inference_steps=1, progress=False)) == 65


def test_numpy_and_torch_images_of_every_kind_give_the_pil_result(tiny_components):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(32)[None, :] < 16, 255, 0)  # right half transparent
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    pipe = InpaintPipeline("a cat", **tiny_components)
    kwargs = dict(**FAST, output_type="numpy", method="blend")
    expected = pipe.generate(image=Image.fromarray(rgba), mask_image=Image.fromarray(mask), **kwargs)
    on_white = np.asarray(Image.alpha_composite(Image.new("RGBA", (32, 32), "white"), Image.fromarray(rgba)))[..., :3]
    for image in (rgba, rgba.astype(np.float32) / 255, torch.from_numpy(rgba).permute(2, 0, 1),
                  np.asarray(on_white), torch.from_numpy(on_white.astype(np.float32) / 255).permute(2, 0, 1)):
        got = pipe.generate(image=image, mask_image=mask, **kwargs)
        assert np.abs(got - expected).max() <= 1 / 255, type(image)
    with pytest.raises(UserError, match=r"image values must be in \[0, 1\] for float input"):
        pipe.generate(image=rgba.astype(np.float32), mask_image=mask, **kwargs)  # 0-255 floats: refused


def test_a_mask_with_alpha_counts_transparent_pixels_as_keep(tiny_components):
    """An RGBA mask whose transparent background is white: only the opaque white square is repainted."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    square = np.zeros((32, 32), np.uint8)
    square[8:24, 8:24] = 255
    rgba = np.full((32, 32, 4), 255, np.uint8)
    rgba[..., 3] = square  # white everywhere, opaque only on the square
    pipe = InpaintPipeline("a cat", **tiny_components)
    kwargs = dict(**FAST, output_type="numpy", method="blend")
    expected = pipe.generate(image=image, mask_image=Image.fromarray(square), **kwargs)
    for mask in (Image.fromarray(rgba), rgba):
        np.testing.assert_array_equal(pipe.generate(image=image, mask_image=mask, **kwargs), expected)
    outside = np.asarray(image, dtype=np.float32)[square == 0] / 255  # pasted back: untouched outside the square
    assert np.abs(expected[0][square == 0] - outside).max() < 1e-6


def test_inpainting_arguments_and_image_size_limits(tiny_components):
    image = Image.new("RGB", (32, 32), "white")
    mask = Image.new("L", (32, 32), 255)
    pipe = InpaintPipeline("a cat", **tiny_components)
    for kwargs, message in [({"strength": 1.5}, r"strength must be a number in \(0, 1\]"),
                            ({"strength": True}, "strength must be a finite number"),
                            ({"feather": -1.0}, r"feather must be a number in \[0, 64\]"),
                            ({"paste_back": "no"}, "paste_back must be True or False"),
                            ({"method": "repaint", "repaint_jump_length": 2.0}, "repaint_jump_length must be a whole")]:
        with pytest.raises(UserError, match=message):
            pipe.generate(image=image, mask_image=mask, **{**FAST, "method": "blend", **kwargs})
    photo = Image.new("RGB", (4000, 3000), "white")
    with pytest.raises(UserError, match=r"4000x3000 \(12.0 MP\) is over the limit of 4 MP per image"):
        pipe.generate(image=photo, mask_image=Image.new("L", (4000, 3000), 255), method="blend", **FAST)


def test_the_command_line_reports_a_non_utf8_prompt_and_its_limits_can_be_raised(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    ldm = [os.path.join(os.path.dirname(sys.executable), "ldm"), "generate"]
    common = ["--model", str(tiny_model_dir), "--steps", "1"]
    bad = subprocess.run([*ldm, b"caf\xe9", "-o", str(tmp_path / "a.png"), *common], capture_output=True)
    assert bad.returncode != 0 and b"prompt is not valid UTF-8 text" in bad.stderr and b"Traceback" not in bad.stderr
    over = subprocess.run([*ldm, "a cat", "-n", "70", "-o", str(tmp_path / "b.png"), *common], capture_output=True,
                          text=True)
    assert over.returncode != 0 and "raise it on purpose (Pipeline.limits.max_images, --max-images)" in over.stderr
    raised = subprocess.run([*ldm, "a cat", "-n", "70", "--max-images", "70", "-o", str(tmp_path / "b.png"),
                             *common], capture_output=True, text=True)
    assert raised.returncode == 0, raised.stderr
