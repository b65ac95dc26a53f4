"""ControlNet at sampling time: control maps, Pipeline(controlnet=...) against diffusers'
StableDiffusionControlNetPipeline (one and two ControlNets), the base check, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

from core.errors import UserError
from ldm.control import control_map, controlnet_from_unet
from ldm.lora import base_fingerprint
from pipelines import Img2ImgPipeline, Pipeline
from pipelines.controlnet import write_controlnet
from pipelines.schedulers import SCHEDULERS


def _image() -> Image.Image:
    pixels = np.full((32, 32, 3), 255, np.uint8)
    pixels[8:24, 6:26] = (250, 200, 40)
    pixels[12:16, 10:14] = (40, 40, 40)
    return Image.fromarray(pixels)


def _controlnet(pipe: Pipeline, folder, seed: int, base=None) -> None:
    """A ControlNet of the tiny U-Net whose zero convolutions are random (so it changes the image)."""
    torch.manual_seed(seed)
    controlnet = controlnet_from_unet(pipe.unet, pipe.vae_scale_factor)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_cond_embedding.conv_out" in name or "controlnet_mid_block" in name:
                p.normal_(0, 0.05)
    write_controlnet(folder, controlnet, {"base_model": "tiny", "control_type": "canny",
                                          "base_fingerprint": base or base_fingerprint(pipe.unet)})


@pytest.fixture()
def t2i_folder(tiny_components, tmp_path):
    return Pipeline(**tiny_components).save_pretrained(tmp_path / "t2i")


def test_control_maps_are_canny_edges_and_a_coarse_colour_layout():
    edges = np.asarray(control_map(_image(), "canny"))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[8:24, 6:26].any() and not edges[0:4].any()  # edges around the square, none in the blank top
    colour = np.asarray(control_map(_image(), "colour"))
    assert colour.shape == (32, 32, 3) and len(np.unique(colour.reshape(-1, 3), axis=0)) <= 64
    assert np.array_equal(colour[:4, :4], np.asarray(_image())[:4, :4])  # a white cell stays white
    with pytest.raises(UserError, match="unknown control type 'depth'; valid: canny, colour"):
        control_map(_image(), "depth")


@pytest.mark.parametrize("scheduler, scale, negative", [("dpm++", 1.0, None), ("ddim", 0.5, "a dog")])
def test_same_pixels_as_diffusers_controlnet_pipeline(t2i_folder, tmp_path, scheduler, scale, negative):
    _controlnet(Pipeline(model=t2i_folder), tmp_path / "cn", seed=0)
    control = control_map(_image(), "canny")
    theirs = StableDiffusionControlNetPipeline.from_pretrained(
        t2i_folder, controlnet=ControlNetModel.from_pretrained(tmp_path / "cn"), safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = SCHEDULERS[scheduler].from_config(theirs.scheduler.config)
    expected = theirs("a cat", image=control, controlnet_conditioning_scale=scale, negative_prompt=negative,
                      num_inference_steps=6, guidance_scale=3.0, num_images_per_prompt=2, output_type="np",
                      generator=torch.Generator().manual_seed(2)).images
    pipe = Pipeline(model=t2i_folder, controlnet=tmp_path / "cn")
    got = pipe.generate("a cat", control_image=control, controlnet_conditioning_scale=scale, negative_prompt=negative,
                        num_inference_steps=6, guidance_scale=3.0, num_images=2, seed=2, scheduler=scheduler,
                        output_type="numpy", progress=False)
    assert got.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(got - expected).max() <= 1 / 255
    plain = Pipeline(model=t2i_folder).generate("a cat", negative_prompt=negative, num_inference_steps=6,
                                                guidance_scale=3.0, num_images=2, seed=2, scheduler=scheduler,
                                                output_type="numpy", progress=False)
    assert np.abs(got - plain).max() > 2 / 255  # the ControlNet changes the image


def test_two_controlnets_add_their_residuals_as_diffusers_does(t2i_folder, tmp_path):
    base = Pipeline(model=t2i_folder)
    _controlnet(base, tmp_path / "canny", seed=0)
    _controlnet(base, tmp_path / "colour", seed=1)
    maps = [control_map(_image(), "canny"), control_map(_image(), "colour")]
    theirs = StableDiffusionControlNetPipeline.from_pretrained(
        t2i_folder, controlnet=MultiControlNetModel([ControlNetModel.from_pretrained(tmp_path / k)
                                                     for k in ("canny", "colour")]), safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs("a cat", image=maps, controlnet_conditioning_scale=[1.0, 0.6], num_inference_steps=5,
                      guidance_scale=3.0, output_type="np", generator=torch.Generator().manual_seed(4)).images
    pipe = Pipeline(model=t2i_folder, controlnet=[tmp_path / "canny", tmp_path / "colour"])
    got = pipe.generate("a cat", control_image=maps, controlnet_conditioning_scale=[1.0, 0.6], num_inference_steps=5,
                        guidance_scale=3.0, seed=4, output_type="numpy", progress=False)
    assert np.abs(got - expected).max() <= 1 / 255


def test_a_controlnet_of_another_base_is_refused_naming_both_unless_forced(t2i_folder, tmp_path):
    _controlnet(Pipeline(model=t2i_folder), tmp_path / "cn", seed=0, base="f" * 64)
    with pytest.raises(UserError, match=r"trained on base tiny \(U-Net ffffffffffff\), not on this model"):
        Pipeline(model=t2i_folder, controlnet=tmp_path / "cn")
    pipe = Pipeline(model=t2i_folder, controlnet=tmp_path / "cn", controlnet_force=True)
    assert len(pipe.controlnets) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"control_image": None}, "pass control_image=..."),
    ({"control_image": [_image(), _image()]}, "got 2 control images for 1 ControlNets"),
    ({"controlnet_conditioning_scale": float("nan")}, "controlnet_conditioning_scale must be finite"),
    ({"controlnet_conditioning_scale": [1.0, 1.0]}, "has 2 values for 1 ControlNets"),
    ({"control_image": np.zeros((32, 32, 2), np.uint8)}, "control_image"),
])
def test_bad_control_input_is_one_line_before_any_work(t2i_folder, tmp_path, kwargs, message):
    _controlnet(Pipeline(model=t2i_folder), tmp_path / "cn", seed=0)
    pipe = Pipeline(model=t2i_folder, controlnet=tmp_path / "cn")
    pipe.denoiser = lambda *a: pytest.fail("sampling started")
    pipe.controlnets[0].forward = lambda *a, **k: pytest.fail("sampling started")
    arguments = {"control_image": _image(), **kwargs}
    with pytest.raises(UserError, match=message) as error:
        pipe.generate("a cat", num_inference_steps=2, progress=False, **arguments)
    assert "\n" not in str(error.value)


def test_a_control_image_of_another_size_is_resized_with_a_warning(t2i_folder, tmp_path):
    _controlnet(Pipeline(model=t2i_folder), tmp_path / "cn", seed=0)
    pipe = Pipeline(model=t2i_folder, controlnet=tmp_path / "cn")
    big = control_map(_image().resize((64, 64)), "canny")
    with pytest.warns(UserWarning, match="the control image is 64x64; resized to the sample size 32x32"):
        pipe.generate("a cat", control_image=big, num_inference_steps=2, progress=False)


def test_controlnets_are_refused_where_unsupported(t2i_folder, tmp_path):
    _controlnet(Pipeline(model=t2i_folder), tmp_path / "cn", seed=0)
    with pytest.raises(UserError, match="image-to-image and inpainting with a ControlNet are not supported"):
        Img2ImgPipeline(model=t2i_folder, controlnet=tmp_path / "cn")
    with pytest.raises(UserError, match="control_image needs a ControlNet"):
        Pipeline(model=t2i_folder).generate("a cat", control_image=_image(), num_inference_steps=2, progress=False)
    with pytest.raises(UserError, match="not a ControlNet folder"):
        Pipeline(model=t2i_folder, controlnet=tmp_path / "nowhere")


@pytest.mark.slow
def test_ldm_generate_with_a_controlnet_applies_the_detector_and_draws_the_api_pixels(t2i_folder, tmp_path):
    from helpers import BIN, run

    from ldm.control import control_input

    _controlnet(Pipeline(model=t2i_folder), tmp_path / "cn", seed=0)
    photo = _image().resize((96, 96), Image.Resampling.NEAREST)  # larger than the samples: resized, then Canny
    photo.save(tmp_path / "photo.png")
    out = tmp_path / "out.png"
    run([str(BIN / "ldm"), "generate", "a cat", "--model", str(t2i_folder), "--controlnet", str(tmp_path / "cn"),
         "--control", str(tmp_path / "photo.png"), "--control-type", "canny", "--controlnet-scale", "0.7",
         "--steps", "3", "--seed", "1", "-o", str(out)])
    expected = Pipeline(model=t2i_folder, controlnet=tmp_path / "cn").generate(
        "a cat", control_image=control_input(photo, "canny", 32, 32), controlnet_conditioning_scale=0.7,
        num_inference_steps=3, seed=1, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    result = run([str(BIN / "ldm"), "generate", "a cat", "--model", str(t2i_folder), "--control",
                  str(tmp_path / "photo.png"), "-o", str(tmp_path / "bad.png")], check=False)
    assert result.returncode != 0 and "need a ControlNet: add --controlnet DIR" in result.stderr


def test_a_controlnet_with_a_lora_on_its_base_draws_diffusers_pixels(t2i_folder, tmp_path):
    from helpers import write_random_adapter

    base = Pipeline(model=t2i_folder)
    _controlnet(base, tmp_path / "cn", seed=0)
    write_random_adapter(tmp_path / "lora", base.unet, str(t2i_folder), seed=1, std=0.3)
    control = control_map(_image(), "canny")
    kwargs = dict(control_image=control, num_inference_steps=5, guidance_scale=3.0, seed=4, output_type="numpy",
                  progress=False)
    plain = Pipeline(model=t2i_folder, controlnet=tmp_path / "cn").generate("a cat", **kwargs)
    got = Pipeline(model=t2i_folder, controlnet=tmp_path / "cn", lora=tmp_path / "lora").generate("a cat", **kwargs)
    assert np.abs(got - plain).max() > 2 / 255  # the adapter changes the controlled image
    theirs = StableDiffusionControlNetPipeline.from_pretrained(
        t2i_folder, controlnet=ControlNetModel.from_pretrained(tmp_path / "cn"), safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(tmp_path / "lora")
    expected = theirs("a cat", image=control, num_inference_steps=5, guidance_scale=3.0, output_type="np",
                      generator=torch.Generator().manual_seed(4)).images
    assert np.abs(got - expected).max() <= 1 / 255
