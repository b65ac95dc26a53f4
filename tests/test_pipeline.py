import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from core.errors import UserError
from pipelines import Pipeline
from pipelines.guidance import ClassifierFreeGuidance
from pipelines.schedulers import SCHEDULERS


def test_guidance_wrapper_batches_both_branches_and_skips_uncond_at_scale_1():
    calls = []

    def denoiser(x, t, context):
        calls.append(x.shape[0])
        return x * 0 + context.mean(dim=(1, 2)).view(-1, 1)

    cond, uncond, x = torch.full((2, 3, 4), 3.0), torch.full((2, 3, 4), 1.0), torch.zeros(2, 5)
    guided = ClassifierFreeGuidance(denoiser, cond, uncond, scale=2.5)(x, torch.tensor(1))
    assert calls == [4]  # one batched call for both branches
    torch.testing.assert_close(guided, torch.full((2, 5), 1 + 2.5 * (3 - 1)))
    calls.clear()
    plain = ClassifierFreeGuidance(denoiser, cond, uncond, scale=1.0)(x, torch.tensor(1))
    assert calls == [2]
    torch.testing.assert_close(plain, torch.full((2, 5), 3.0))


def test_generate_returns_pil_of_the_default_size(tiny_components):
    images = Pipeline("a cat", **tiny_components).generate(num_images=2, num_inference_steps=3, seed=0,
                                                           progress=False)
    assert len(images) == 2 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images)


@pytest.mark.parametrize("scheduler, guidance_scale, negative_prompt", [
    ("ddim", 4.0, None),
    ("ddim", 1.0, None),
    ("ddpm", 3.0, "blurry"),
    ("euler_a", 3.0, None),
    ("dpm++", 5.0, "a dog"),
    ("unipc", 2.0, None),
    ("euler", 3.0, None),
])
def test_same_images_as_diffusers_stable_diffusion_pipeline(tiny_model_dir, scheduler, guidance_scale,
                                                            negative_prompt):
    ours = Pipeline.from_pretrained(tiny_model_dir)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = SCHEDULERS[scheduler].from_config(theirs.scheduler.config)
    negatives = [negative_prompt] * 2 if negative_prompt else None  # diffusers wants a list beside a list
    expected = theirs(["a cat", "red apple"], negative_prompt=negatives, num_images_per_prompt=2,
                      num_inference_steps=6, guidance_scale=guidance_scale, output_type="np",
                      generator=torch.Generator().manual_seed(7)).images
    got = ours.generate(["a cat", "red apple"], negative_prompt=negative_prompt, num_images=2, num_inference_steps=6,
                        guidance_scale=guidance_scale, scheduler=scheduler, output_type="numpy", seed=7,
                        progress=False)
    assert got.shape == expected.shape == (4, 32, 32, 3)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got[0] - got[2]).max() > 1e-3  # different prompts give different images


@pytest.mark.parametrize("saved", ["dpm++", "ddpm"])
def test_default_arguments_sample_like_diffusers(tiny_components, tmp_path, saved):
    """The folder's saved scheduler is the default sampler both here and in diffusers."""
    components = {**tiny_components, "scheduler": SCHEDULERS[saved].from_config(tiny_components["scheduler"].config)}
    folder = Pipeline(**components).save_pretrained(tmp_path / "model")
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs("a cat", num_inference_steps=5, guidance_scale=3.0, output_type="np",
                      generator=torch.Generator().manual_seed(1)).images
    got = Pipeline.from_pretrained(folder).generate("a cat", num_inference_steps=5, guidance_scale=3.0, seed=1,
                                                    output_type="numpy", progress=False)
    assert type(theirs.scheduler) is SCHEDULERS[saved]
    assert np.abs(got - expected).max() <= 1e-4


def test_output_types_and_given_latents(tiny_components):
    pipe = Pipeline(**tiny_components)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pipe.generate("a cat", latents=latents, num_inference_steps=2, output_type="latent", progress=False)
    assert out.shape == (1, 4, 16, 16)
    array = pipe.generate("a cat", latents=latents, num_inference_steps=2, output_type="numpy", progress=False)
    tensor = pipe.generate("a cat", latents=latents, num_inference_steps=2, output_type="torch", progress=False)
    np.testing.assert_allclose(array, tensor.permute(0, 2, 3, 1).numpy())
    assert 0 <= array.min() and array.max() <= 1


def test_empty_prompt_is_unconditional(tiny_components):
    """"" samples the unconditional branch itself: the same latents as a denoiser fed the empty prompt's states."""
    pipe = Pipeline(**tiny_components)
    assert pipe.generate("", num_inference_steps=2, seed=0, progress=False)[0].size == (32, 32)
    got = pipe.generate("", num_inference_steps=3, seed=0, guidance_scale=5.0, output_type="latent", progress=False)
    empty = pipe.text_encoder.encode([""]).hidden_states
    sampler = pipe.prepare_scheduler(None, 3)
    latents = pipe.prepare_latents(1, 32, 32, torch.Generator().manual_seed(0), None, sampler)
    with torch.no_grad():
        for t in sampler.timesteps:  # guidance of "" against "" is the unconditional prediction itself
            latents = sampler.step(pipe.denoiser(latents, t, empty), t, latents).prev_sample
    torch.testing.assert_close(got, latents, rtol=0, atol=1e-5)
    conditional = pipe.generate("a cat", num_inference_steps=3, seed=0, output_type="latent", progress=False)
    assert (conditional - got).abs().max() > 1e-3  # the prompt matters, so the check above can fail


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 33}, "height=33 is not a multiple of the autoencoder's downsampling factor 2"),
    ({"width": 0}, "width=0 is not a multiple"),
    ({"num_inference_steps": 0}, "between 1 and 1000"),
    ({"num_inference_steps": 1001}, "between 1 and 1000"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a number >= 0"),
    ({"guidance_scale": math.nan}, "guidance_scale must be a finite number >= 0"),
    ({"num_images": 0}, "num_images must be at least 1"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, r"latents have shape \(1, 4, 8, 8\); expected \(1, 4, 16, 16\)"),
    ({"scheduler": "heun"}, "unknown scheduler 'heun'; valid: ddpm, ddim"),
    ({"output_type": "jpeg"}, "unknown output_type"),
])
def test_bad_generate_arguments(tiny_components, kwargs, message):
    with pytest.raises(UserError, match=message):
        Pipeline(**tiny_components).generate("a cat", progress=False, **kwargs)


def test_missing_component_file_is_named(tiny_model_dir):
    (tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="missing unet/diffusion_pytorch_model.safetensors"):
        Pipeline.from_pretrained(tiny_model_dir)


def test_pickled_weights_need_explicit_opt_in(tiny_model_dir):
    weights = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), tiny_model_dir / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match="only pickled weights.*allow_pickle=True"):
        Pipeline.from_pretrained(tiny_model_dir)
    assert Pipeline.from_pretrained(tiny_model_dir, allow_pickle=True).vae is not None


def test_model_not_on_disk():
    with pytest.raises(UserError, match="not on disk, and models cannot be downloaded"):
        Pipeline("a cat", model="CompVis/stable-diffusion-v1-4")


def test_no_prompt_anywhere(tiny_components):
    with pytest.raises(UserError, match="no prompt"):
        Pipeline(**tiny_components).generate()


def test_partial_components_are_refused(tiny_components):
    with pytest.raises(UserError, match="all four components"):
        Pipeline(vae=tiny_components["vae"])


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_loads_a_diffusers_stable_diffusion_folder_with_clip(clip_sd_folder, scheduler):
    ours = Pipeline.from_pretrained(clip_sd_folder)
    assert type(ours.text_encoder.model).__name__ == "CLIPTextModel" and ours.text_encoder.max_length == 20
    theirs = StableDiffusionPipeline.from_pretrained(clip_sd_folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = SCHEDULERS[scheduler].from_config(theirs.scheduler.config)
    expected = theirs("a cat", negative_prompt="dog", num_inference_steps=5, guidance_scale=3.0, output_type="np",
                      generator=torch.Generator().manual_seed(3)).images
    got = ours.generate("a cat", negative_prompt="dog", num_inference_steps=5, guidance_scale=3.0, seed=3,
                        scheduler=scheduler, output_type="numpy", progress=False)
    assert got.shape == (1, 16, 16, 3)
    assert np.abs(got - expected).max() <= 1e-4


def test_slim_folder_loads_the_text_encoder_from_its_package_and_checks_checksums(tiny_components, tmp_path):
    from pipelines.loading import save_slim_model_folder

    full = Pipeline(**tiny_components)
    slim_dir = save_slim_model_folder(tmp_path / "slim", full.vae, full.unet, full.scheduler, "minilm", 16,
                                      dtype=torch.float32)
    assert not (slim_dir / "text_encoder").exists() and (slim_dir / "text_encoder.json").is_file()
    slim = Pipeline.from_pretrained(slim_dir)
    kwargs = dict(num_inference_steps=3, seed=0, output_type="numpy", progress=False)
    np.testing.assert_array_equal(slim.generate("a cat", **kwargs), full.generate("a cat", **kwargs))
    # save_pretrained of a slim model writes a complete diffusers folder
    complete = slim.save_pretrained(tmp_path / "complete")
    theirs = StableDiffusionPipeline.from_pretrained(complete, safety_checker=None)
    assert theirs.text_encoder.config.hidden_size == 384

    weights = slim_dir / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="unet/diffusion_pytorch_model.safetensors is corrupted.*re-export"):
        Pipeline.from_pretrained(slim_dir)
    weights.unlink()
    with pytest.raises(UserError, match="missing unet/diffusion_pytorch_model.safetensors"):
        Pipeline.from_pretrained(slim_dir)


def test_slim_folder_in_half_precision_is_close_to_full(tiny_components, tmp_path):
    from pipelines.loading import save_slim_model_folder

    full = Pipeline(**tiny_components)
    slim_dir = save_slim_model_folder(tmp_path / "slim", full.vae, full.unet, full.scheduler, "minilm", 16)
    slim = Pipeline.from_pretrained(slim_dir)
    assert slim.unet.dtype == torch.float32  # stored in fp16, run in fp32
    kwargs = dict(num_inference_steps=3, seed=0, output_type="numpy", progress=False)
    assert np.abs(slim.generate("a cat", **kwargs) - full.generate("a cat", **kwargs)).max() < 0.02


def test_ldm_export_writes_a_slim_folder_and_refuses_a_different_encoder(tiny_model_dir, tmp_path, capsys):
    from cli.main import main as ldm_main

    out = tmp_path / "slim"
    with pytest.raises(SystemExit):  # no config.yaml beside the model: the text encoder must be named
        ldm_main(["export", "--model", str(tiny_model_dir), "--out", str(out)])
    assert "pass --text-encoder NAME" in capsys.readouterr().err
    ldm_main(["export", "--model", str(tiny_model_dir), "--out", str(out), "--text-encoder", "minilm"])
    assert (out / "checksums.json").is_file() and Pipeline.from_pretrained(out).unet.dtype == torch.float32
    other = Pipeline.from_pretrained(tiny_model_dir).vae
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(2)
    other.save_pretrained(tmp_path / "other_vae")
    with pytest.raises(SystemExit):
        ldm_main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--text-encoder",
                  "minilm", "--vae", str(tmp_path / "other_vae")])
    assert "does not encode like the model's autoencoder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
