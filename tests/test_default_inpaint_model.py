"""The embedded inpainting default: loads offline, fills seeded what it filled when shipped, loads in diffusers'
StableDiffusionInpaintPipeline with the same pixels, and both defaults together stay inside the size budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from pipelines import InpaintPipeline
from pipelines.loading import DEFAULT_INPAINT_MODEL_DIR, DEFAULT_MODEL_DIR

# measured when the inpainting default shipped (2026-11-27)
PINNED_MEAN, PINNED_STD = 0.53162, 0.37493


def _image_and_mask() -> tuple[Image.Image, Image.Image]:
    image = np.full((64, 64, 3), 255, np.uint8)
    image[12:52, 12:52] = (250, 200, 40)  # a yellow square on white, like an emoji face
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 16:48] = 255
    return Image.fromarray(image), Image.fromarray(mask)


@pytest.fixture(scope="module")
def default_inpaint():
    return InpaintPipeline("cat face")


def test_default_inpainting_is_the_nine_channel_fine_tune_of_the_text_to_image_default(default_inpaint):
    assert default_inpaint.is_inpainting_unet and default_inpaint.unet.config.in_channels == 9
    reference = json.loads((DEFAULT_INPAINT_MODEL_DIR / "text_encoder.json").read_text())
    assert reference == json.loads((DEFAULT_MODEL_DIR / "text_encoder.json").read_text())
    assert not (DEFAULT_INPAINT_MODEL_DIR / "text_encoder").exists()
    vae = "vae/diffusion_pytorch_model.safetensors"  # the same autoencoder, byte for byte
    assert (DEFAULT_INPAINT_MODEL_DIR / vae).read_bytes() == (DEFAULT_MODEL_DIR / vae).read_bytes()
    size = sum(p.stat().st_size for d in (DEFAULT_MODEL_DIR, DEFAULT_INPAINT_MODEL_DIR) for p in d.rglob("*")
               if p.is_file())
    assert size < 40e6  # both embedded defaults together


def test_default_inpainting_fills_seeded_with_the_pinned_statistics(default_inpaint):
    image, mask = _image_and_mask()
    out = default_inpaint.generate(image=image, mask_image=mask, num_images=2, num_inference_steps=4, seed=0,
                                   output_type="numpy", progress=False)
    inside = out[:, np.asarray(mask) > 0]
    # a different value means the weights or the inpainting math changed
    assert inside.mean() == pytest.approx(PINNED_MEAN, abs=2e-3)
    assert inside.std() == pytest.approx(PINNED_STD, abs=2e-3)
    # per channel, and per 8x8 cell of the hole (grey), so a channel swap or a flip fails too (2026-12-02)
    assert inside.mean(axis=(0, 1)) == pytest.approx([0.7755, 0.6522, 0.1671], abs=2e-3)
    cells = out[0, 20:44, 16:48].mean(axis=2).reshape(3, 8, 4, 8).mean(axis=(1, 3)).flatten()
    assert cells == pytest.approx([0.6433, 0.6104, 0.6203, 0.6362, 0.2804, 0.6339, 0.6272, 0.1906,
                                   0.5763, 0.4602, 0.4805, 0.5711], abs=3e-3)
    known = np.asarray(image, dtype=np.float32) / 255
    assert np.abs(out[:, np.asarray(mask) == 0] - known[np.asarray(mask) == 0]).max() < 1e-6  # pasted back


def test_save_pretrained_of_the_inpainting_default_matches_diffusers(default_inpaint, tmp_path):
    folder = default_inpaint.save_pretrained(tmp_path / "sd-inpaint")
    theirs = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    image, mask = _image_and_mask()
    expected = theirs("cat face", image=image, mask_image=mask, num_inference_steps=4, guidance_scale=5.0,
                      output_type="np", generator=torch.Generator().manual_seed(3)).images
    got = default_inpaint.generate(image=image, mask_image=mask, num_inference_steps=4, guidance_scale=5.0, seed=3,
                                   paste_back=False, output_type="numpy", progress=False)
    np.testing.assert_allclose(got, expected, atol=1 / 255)
