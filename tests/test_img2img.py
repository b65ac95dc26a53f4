"""Image-to-image (SDEdit): Img2ImgPipeline against diffusers' StableDiffusionImg2ImgPipeline on our exports, with
a LoRA adapter and the guidance options, `ldm img2img`, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from core.errors import UserError
from pipelines import Img2ImgPipeline, Pipeline
from pipelines.schedulers import SCHEDULERS
from helpers import BIN, count_denoiser_calls, run


def _image() -> Image.Image:
    y, x = np.mgrid[0:32, 0:32]
    pixels = np.stack([x * 8, y * 8, 255 - x * 4], axis=-1).astype(np.uint8)  # a smooth gradient, not noise
    return Image.fromarray(pixels)


@pytest.fixture()
def folder(tiny_components, tmp_path):
    return Pipeline(**tiny_components).save_pretrained(tmp_path / "t2i")


@pytest.mark.parametrize("scheduler, strength, negative", [
    ("dpm++", 0.8, None), ("ddim", 0.5, "a dog"), ("euler_a", 1.0, None), ("unipc", 0.3, "blurry"),
])
def test_same_pixels_as_diffusers_img2img_pipeline(tiny_components, folder, scheduler, strength, negative):
    theirs = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = SCHEDULERS[scheduler].from_config(theirs.scheduler.config)
    expected = theirs("a cat", image=_image(), strength=strength, negative_prompt=negative, num_inference_steps=8,
                      guidance_scale=3.0, num_images_per_prompt=2, output_type="np",
                      generator=torch.Generator().manual_seed(3)).images
    got = Img2ImgPipeline(**tiny_components).generate(
        "a cat", image=_image(), strength=strength, negative_prompt=negative, num_inference_steps=8,
        guidance_scale=3.0, num_images=2, seed=3, scheduler=scheduler, output_type="numpy", progress=False)
    assert got.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(got - expected).max() <= 1 / 255
    assert np.abs(got[0] - got[1]).max() > 1e-3  # two samples of one image differ
    # the latents, tightly: a wrong order of the random draws (posterior sample, then noise) would show here
    their_latents = theirs("a cat", image=_image(), strength=strength, negative_prompt=negative, num_inference_steps=8,
                           guidance_scale=3.0, num_images_per_prompt=2, output_type="latent",
                           generator=torch.Generator().manual_seed(3)).images
    our_latents = Img2ImgPipeline(**tiny_components).generate(
        "a cat", image=_image(), strength=strength, negative_prompt=negative, num_inference_steps=8,
        guidance_scale=3.0, num_images=2, seed=3, scheduler=scheduler, output_type="latent", progress=False)
    torch.testing.assert_close(our_latents, their_latents, rtol=1e-4, atol=1e-5)


def test_strength_sets_how_much_of_the_image_is_kept_and_how_many_steps_run(tiny_components):
    pipe = Img2ImgPipeline(**tiny_components)
    calls = count_denoiser_calls(pipe)
    # in latent space: the tiny autoencoder is untrained, so its pixels say nothing about what was kept
    source = pipe.vae.encode(pipe.preprocess_image(_image(), 32, 32)).latent_dist.mean * pipe.vae.config.scaling_factor
    errors = []
    for strength, steps_run in ((0.1, 1), (0.5, 5), (1.0, 10)):
        calls.clear()
        out = pipe.generate("a cat", image=_image(), strength=strength, num_inference_steps=10, guidance_scale=1.0,
                            seed=0, output_type="latent", progress=False)
        assert len(calls) == steps_run  # int(10 x strength) steps, one call each without guidance
        errors.append(float((out - source).abs().mean()))
    assert errors[0] < errors[1] < errors[2]


def test_a_lora_adapter_and_the_guidance_options_apply(tiny_components, folder, tmp_path):
    from helpers import write_random_adapter

    pipe = Img2ImgPipeline(model=folder)
    kwargs = dict(image=_image(), strength=0.7, num_inference_steps=6, seed=1, output_type="numpy", progress=False)
    base = pipe.generate("a cat", guidance_scale=3.0, **kwargs)
    interval = pipe.generate("a cat", guidance_scale=3.0, guidance_interval=(0.0, 1.0), **kwargs)
    assert np.abs(base - interval).max() > 1e-4
    write_random_adapter(tmp_path / "lora", pipe.unet, str(folder), seed=0, std=0.3)
    pipe.load_lora(tmp_path / "lora")
    adapted = pipe.generate("a cat", guidance_scale=3.0, **kwargs)
    assert np.abs(base - adapted).max() > 1e-3
    theirs = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(tmp_path / "lora")
    expected = theirs("a cat", image=_image(), strength=0.7, num_inference_steps=6, guidance_scale=3.0,
                      output_type="np", generator=torch.Generator().manual_seed(1)).images
    assert np.abs(adapted - expected).max() <= 1 / 255  # diffusers' adapter loading, same pixels


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": 0}, "strength"), ({"strength": 1.5}, "strength"), ({"strength": float("nan")}, "strength"),
    ({"image": None}, "image-to-image needs an image"),
    ({"image": np.zeros((32, 32, 2), np.uint8)}, "image"),
    ({"image": Image.new("RGB", (31, 32))}, "multiples of the autoencoder's downsampling factor"),
    ({"strength": 0.05}, "leaves no sampling step"),
])
def test_bad_input_is_one_line_before_any_work(tiny_components, kwargs, message):
    pipe = Img2ImgPipeline(**tiny_components)
    pipe.denoiser = lambda *a: pytest.fail("sampling started")
    arguments = {"image": _image(), "num_inference_steps": 10, **kwargs}
    with pytest.raises(UserError, match=message) as error:
        pipe.generate("a cat", progress=False, **arguments)
    assert "\n" not in str(error.value)


def test_an_inpainting_model_is_sent_to_the_inpainting_pipeline(tiny_components):
    import copy

    from ldm.unet import inpainting_unet_from
    unet = inpainting_unet_from(copy.deepcopy(tiny_components["unet"]), 4)
    with pytest.raises(UserError, match="InpaintPipeline"):
        Img2ImgPipeline(**{**tiny_components, "unet": unet})


@pytest.mark.slow
def test_ldm_img2img_command(folder, tmp_path):
    source = tmp_path / "in.png"
    _image().save(source)
    out = tmp_path / "out.png"
    run([str(BIN / "ldm"), "img2img", "a cat", "--image", str(source), "--model", str(folder), "--strength", "0.6",
         "--steps", "4", "--seed", "2", "--output", str(out)])
    expected = Img2ImgPipeline(model=folder).generate("a cat", image=_image(), strength=0.6, num_inference_steps=4,
                                                      seed=2, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    result = run([str(BIN / "ldm"), "img2img", "a cat", "--image", str(source), "--model", str(folder),
                  "--strength", "0", "--output", str(tmp_path / "bad.png")], check=False)
    assert result.returncode != 0 and "strength" in result.stderr and not (tmp_path / "bad.png").exists()
