"""Learned reverse variances (improved DDPM's hybrid objective): the variance math against diffusers' DDPM, sampling
with every sampler, the training loss (the bound trains only the variance), export and the bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion import NoiseSchedule
from ldm.unet import build_unet
from pipelines import Pipeline
from pipelines.guidance import ClassifierFreeGuidance
from pipelines.schedulers import SCHEDULERS


def test_learned_range_variance_matches_diffusers_ddpm():
    schedule = NoiseSchedule(learned_variance=True)
    # steps_offset 0: every timestep's predecessor is t - 1 (with SD's offset 1, diffusers treats t = 1 as last)
    scheduler = DDPMScheduler(**{**schedule.to_scheduler_config(), "steps_offset": 0})
    assert scheduler.config.variance_type == "learned_range"
    scheduler.set_timesteps(1000)
    v = torch.tensor([-1.0, -0.3, 0.4, 1.0])
    for t in (1, 10, 500, 999):
        ours = schedule.learned_variance_from(v.view(4, 1, 1, 1), torch.full((4,), t)).flatten()
        theirs = torch.exp(scheduler._get_variance(t, predicted_variance=v))  # diffusers returns the log
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)  # ours via float64, diffusers' float32
    # at t = 0 the lower end is clipped to t = 1's posterior variance (improved DDPM); diffusers clamps to 1e-20
    at_zero = schedule.learned_variance_from(torch.full((1, 1, 1, 1), -1.0), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(at_zero.flatten(), schedule.model_variance(torch.ones(1, dtype=torch.long),
                                                                          at_zero).flatten())


@pytest.fixture()
def learned_components(tiny_components):
    torch.manual_seed(3)
    unet = build_unet("tiny", 16, 4, 384, learned_variance=True)
    with torch.no_grad():  # a visible variance output, so using it or not makes a difference
        unet.conv_out.bias[4:].fill_(0.8)
    schedule = NoiseSchedule(learned_variance=True)
    return {**tiny_components, "unet": unet, "scheduler": DDPMScheduler(**schedule.to_scheduler_config())}


def test_ddpm_samples_with_the_learned_variance_as_diffusers_steps_do(learned_components):
    pipe = Pipeline(**learned_components)
    assert pipe.predicts_variance
    got = pipe.generate("a cat", num_inference_steps=5, guidance_scale=3.0, seed=2, output_type="latent",
                        progress=False)
    # the same loop written with diffusers' learned_range DDPM step and IF-style guidance (variance from cond)
    generator = torch.Generator().manual_seed(2)
    scheduler = DDPMScheduler.from_config(learned_components["scheduler"].config)
    scheduler.set_timesteps(5)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.cat([pipe.text_embeddings([""]), pipe.text_embeddings(["a cat"])])
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond, cond = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            output = torch.cat([uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], dim=1)
            latents = scheduler.step(output, t, latents, generator=generator).prev_sample
    torch.testing.assert_close(got, latents, rtol=0, atol=1e-5)
    fixed = DDPMScheduler.from_config({**learned_components["scheduler"].config, "variance_type": "fixed_small"})
    other = pipe.generate("a cat", num_inference_steps=5, guidance_scale=3.0, seed=2, scheduler=fixed,
                          output_type="latent", progress=False)
    assert (other - got).abs().max() > 1e-3  # the learned variance changed the samples


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler", "unipc"])
def test_other_samplers_use_the_prediction_channels_only(learned_components, name):
    pipe = Pipeline(**learned_components)
    plain_unet = build_unet("tiny", 16, 4, 384)
    with torch.no_grad():  # the same network without its variance outputs
        state = {k: (v[:4] if k.startswith("conv_out") else v) for k, v in pipe.unet.state_dict().items()}
        plain_unet.load_state_dict(state)
    plain = Pipeline(**{**learned_components, "unet": plain_unet,
                        "scheduler": SCHEDULERS["ddim"].from_config(NoiseSchedule().to_scheduler_config())})
    kwargs = dict(num_inference_steps=4, guidance_scale=2.0, seed=0, scheduler=name, output_type="numpy",
                  progress=False)
    np.testing.assert_allclose(pipe.generate("a cat", **kwargs), plain.generate("a cat", **kwargs), atol=1e-5)


def test_guidance_leaves_the_variance_channels_to_the_conditional_branch():
    def denoiser(x, t, context):
        level = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # per branch
        return torch.cat([x * 0 + level, x * 0 + 10 * level], dim=1)

    cond, uncond, x = torch.full((1, 2, 3), 3.0), torch.full((1, 2, 3), 1.0), torch.zeros(1, 2, 4, 4)
    out = ClassifierFreeGuidance(denoiser, cond, uncond, 2.0, guided_channels=2)(x, torch.tensor(5))
    torch.testing.assert_close(out[:, :2], torch.full((1, 2, 4, 4), 1 + 2.0 * (3 - 1)))
    torch.testing.assert_close(out[:, 2:], torch.full((1, 2, 4, 4), 30.0))


def test_hybrid_loss_trains_the_variance_through_the_bound_and_exports_ddpm(emoji_dir, autoencoder_dir, tmp_path):
    from core.config import load_config
    from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer

    config = load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", [
        f"data={emoji_dir}", f"autoencoder={autoencoder_dir}", f"output_dir={tmp_path / 'run'}",
        "learned_variance=true", "max_steps=2", "sample_every=1000"])
    trainer = LDMTrainer(config)
    trainer.setup()
    batch = next(iter(trainer.loader))
    losses = trainer.compute_loss(batch)
    assert set(losses) == {"loss", "simple", "vlb"} and losses["vlb"] > 0
    grads = []
    for weight in (0.0, 1.0):  # the same batch and random draws, with and without the bound's term
        trainer.config.vlb_weight = weight
        trainer.model.zero_grad()
        torch.manual_seed(0)
        trainer.compute_loss(batch)["loss"].backward()
        grads.append(trainer.accelerator.unwrap_model(trainer.model).conv_out.weight.grad.clone())
    from_bound = grads[1] - grads[0]
    assert from_bound[:4].abs().max() == 0 and from_bound[4:].abs().max() > 0  # the mean is detached from it
    trainer.config.vlb_weight = 0.001
    trainer.model.zero_grad()
    trainer.train()
    final = trainer.export()
    pipe = Pipeline.from_pretrained(final)
    assert type(pipe.scheduler) is DDPMScheduler and pipe.scheduler.config.variance_type == "learned_range"
    assert pipe.generate("a cat", num_inference_steps=3, seed=0, progress=False)[0].size == (32, 32)
    from evaluation.vlb import evaluate_vlb

    metrics = evaluate_vlb(pipe, str(emoji_dir), tmp_path / "vlb", num_images=4, timestep_stride=250)
    assert np.isfinite(metrics["bits_per_dim"]) and metrics["kl_bits_per_dim"] > 0
