"""Autoguidance (Karras et al. 2024): guide + s (main - guide) with a smaller model of the same task, its call count,
the main model as its own guide, the inpainting pipeline and the command line, and a guide that does not fit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from core.errors import UserError
from ldm.unet import build_unet
from pipelines import InpaintPipeline, Pipeline
from pipelines.guidance import AutoGuidance


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory, text_encoder):
    """The tiny model's components with another (seeded) U-Net: a guide of the same task and latent space."""
    from conftest import _tiny_components

    components = _tiny_components(text_encoder)
    torch.manual_seed(1)
    components["unet"] = build_unet("tiny", latent_size=16, latent_channels=4, cross_attention_dim=384)
    return Pipeline(**components).save_pretrained(tmp_path_factory.mktemp("guide") / "model")


def _draw(pipe, **kwargs):
    return pipe.generate(["a cat", "red apple"], num_inference_steps=6, seed=0, output_type="numpy", progress=False,
                         **kwargs)


def test_the_main_model_as_its_own_guide_is_the_conditional_model(tiny_model_dir):
    guided = _draw(Pipeline(model=tiny_model_dir, guide_model=tiny_model_dir), guidance_scale=4.0)
    unguided = _draw(Pipeline(model=tiny_model_dir), guidance_scale=1.0)
    assert np.array_equal(guided, unguided)


def test_a_guide_pulls_the_main_model_away_from_itself(tiny_model_dir, guide_dir):
    """The guided prediction is guide + s (main - guide) of the two U-Nets at the same x_t, t and prompt; two
    conditional calls per guided step, one (the main model's) outside the interval."""
    pipe = Pipeline(model=tiny_model_dir, guide_model=guide_dir)
    main_calls, guide_calls = [], []
    main_forward, guide_unet = pipe._unet_forward, pipe.guide_unet
    pipe._unet_forward = lambda x, *a, **k: main_calls.append(x.shape[0]) or main_forward(x, *a, **k)
    pipe.guide_unet = lambda x, *a, **k: guide_calls.append(x.shape[0]) or guide_unet(x, *a, **k)
    image = _draw(pipe, guidance_scale=3.0)
    assert main_calls == [2] * 6 and guide_calls == [2] * 6  # both prompts, conditional only
    assert not np.array_equal(image, _draw(Pipeline(model=tiny_model_dir), guidance_scale=3.0))
    main_calls.clear(), guide_calls.clear()
    _draw(pipe, guidance_scale=3.0, guidance_interval=(0.5, 3.0))
    assert main_calls == [2] * 6 and 0 < len(guide_calls) < 6

    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(500)
    context = pipe.text_embeddings(["a cat", "red apple"])
    main = pipe.unet(x, t, encoder_hidden_states=context).sample
    guide = guide_unet(x, t, encoder_hidden_states=context).sample
    guided = AutoGuidance(pipe.denoiser, lambda x_, t_, c: guide_unet(x_, t_, encoder_hidden_states=c).sample,
                          context, 3.0)(x, t)
    torch.testing.assert_close(guided, guide + 3.0 * (main - guide))


def test_the_inpainting_pipeline_and_the_command_line_take_a_guide(tiny_model_dir, guide_dir, tmp_path):
    from PIL import Image

    from cli.main import main as ldm_main

    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    kwargs = dict(image=image, mask_image=mask, num_inference_steps=4, seed=0, output_type="numpy", progress=False)
    self_guided = InpaintPipeline(model=tiny_model_dir, guide_model=tiny_model_dir).generate("a cat", **kwargs,
                                                                                           guidance_scale=3.0)
    unguided = InpaintPipeline(model=tiny_model_dir).generate("a cat", **kwargs, guidance_scale=1.0)
    assert np.array_equal(self_guided, unguided)

    out = tmp_path / "cat.png"
    ldm_main(["generate", "a cat", "--model", str(tiny_model_dir), "--guide-model", str(guide_dir), "-o", str(out),
              "--num-inference-steps", "4", "--guidance-scale", "2", "--seed", "1"])
    expected = Pipeline(model=tiny_model_dir, guide_model=guide_dir).generate(
        "a cat", num_inference_steps=4, guidance_scale=2.0, seed=1, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def _variant(tiny_components, tmp_path, name, **changes):
    components = {k: copy.deepcopy(v) if k != "text_encoder" else v for k, v in tiny_components.items()}
    components.update(changes)
    return Pipeline(**components).save_pretrained(tmp_path / name)


def test_a_guide_that_does_not_fit_is_one_line_naming_both(tiny_model_dir, tiny_components, tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from ldm.diffusion import NoiseSchedule
    from ldm.unet import inpainting_unet_from
    from recipes.consistency import student_from

    vae = copy.deepcopy(tiny_components["vae"])
    vae.register_to_config(scaling_factor=0.5)
    v_prediction = DPMSolverMultistepScheduler.from_config(
        NoiseSchedule(prediction_type="v_prediction").to_scheduler_config())
    linear = DPMSolverMultistepScheduler.from_config(NoiseSchedule(beta_schedule="linear").to_scheduler_config())
    cases = [
        (dict(vae=vae), "does not encode as"),
        (dict(scheduler=v_prediction), "predicts v_prediction, .* epsilon"),
        (dict(scheduler=linear), "another noise schedule \\(linear"),
        (dict(unet=student_from(tiny_components["unet"], 8)), "is a consistency-distilled student"),
        (dict(unet=build_unet("tiny", 16, 4, 32)), "attends to 32-d text states"),
    ]
    for i, (changes, message) in enumerate(cases):
        folder = _variant(tiny_components, tmp_path, f"guide{i}", **changes)
        with pytest.raises(UserError, match=f"guide {folder}.*{message}|{message}.*"):
            Pipeline(model=tiny_model_dir, guide_model=folder)
    inpaint = inpainting_unet_from(copy.deepcopy(tiny_components["unet"]), 4)
    folder = InpaintPipeline(**{**tiny_components, "unet": inpaint}).save_pretrained(tmp_path / "inpaint")
    with pytest.raises(UserError, match="takes 9 input channels, .* 4"):
        Pipeline(model=tiny_model_dir, guide_model=folder)
    short = tmp_path / "short"
    from ldm.text_encoders import load_text_encoder
    Pipeline(**{**tiny_components, "text_encoder": load_text_encoder("minilm", 8)}).save_pretrained(short)
    with pytest.raises(UserError, match="at 8 tokens, .* at 16 tokens"):
        Pipeline(model=tiny_model_dir, guide_model=short)
    with pytest.raises(UserError, match="not on disk"):
        Pipeline(model=tiny_model_dir, guide_model=tmp_path / "nowhere")


def test_a_guide_with_an_active_lcm_lora_is_refused_until_it_is_switched_off(tiny_model_dir, guide_dir, tmp_path):
    from ldm.lora import add_lora, base_fingerprint, write_adapter

    pipe = Pipeline(model=tiny_model_dir, guide_model=guide_dir)
    unet = copy.deepcopy(pipe.unet)
    fingerprint = base_fingerprint(unet)
    add_lora(unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    folder = tmp_path / "lcm-lora"
    folder.mkdir()
    write_adapter(folder, unet, {"base_model": str(tiny_model_dir), "base_fingerprint": fingerprint,
                                 "consistency": {"original_inference_steps": 50, "timestep_scaling": 10.0}})
    pipe.load_lora(folder, name="fast")
    with pytest.raises(UserError, match="an LCM-LoRA is active, and a consistency student cannot be autoguided"):
        _draw(pipe)
    pipe.activate_lora({})
    assert np.array_equal(_draw(pipe, guidance_scale=3.0),
                          _draw(Pipeline(model=tiny_model_dir, guide_model=guide_dir), guidance_scale=3.0))
