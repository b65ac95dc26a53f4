"""The flow-matching research arm (prediction_type=flow): the linear path against diffusers'
FlowMatchEulerDiscreteScheduler, the trainer's velocity loss, a trained export sampled with flow-euler, and one line
for each mismatch between a model and a sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

from cli.training_args import ldm_config
from core.errors import UserError
from ldm.diffusion import NoiseSchedule
from pipelines import Img2ImgPipeline, Pipeline
from recipes.latent_diffusion import LDMTrainer
from web.app import build_app, sampler_choices
from web.requests import MODEL_SCHEDULER, SAMPLER_SPACING
from helpers import ROOT, dropdown_values, page_component

FLOW = NoiseSchedule(prediction_type="flow")


def test_the_flow_path_is_diffusers_flow_match_scale_noise_at_its_timesteps():
    theirs = FlowMatchEulerDiscreteScheduler.from_config(FLOW.to_scheduler_config())
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 499, 999])  # training timesteps: s = 0.001, 0.5, 1
    ours = FLOW.add_noise(x0, noise, t)
    for i in range(3):  # diffusers' timestep is s * T = t + 1, the value our U-Net is given
        model_t = FLOW.model_timesteps(t)[i:i + 1]
        assert float(model_t) == t[i] + 1
        expected = theirs.scale_noise(x0[i:i + 1], model_t, noise[i:i + 1])
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(FLOW.target(x0, noise, t), noise - x0)
    torch.testing.assert_close(FLOW.predicted_x0(ours, t, noise - x0), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(FLOW.predicted_noise(ours, t, noise - x0), noise, rtol=1e-5, atol=1e-5)
    assert NoiseSchedule.from_scheduler_config(dict(theirs.config, _class_name="FlowMatchEulerDiscreteScheduler")).is_flow


def test_euler_with_the_exact_velocity_lands_on_the_data_point():
    """For one data point the exact velocity field is eps - x0 along each straight path: flow-euler's steps then
    carry the noise to x0 in any number of steps (the sampler's arithmetic, on our path)."""
    sampler = FlowMatchEulerDiscreteScheduler.from_config(FLOW.to_scheduler_config())
    sampler.set_timesteps(5)
    x0 = torch.randn(1, 4, 8, 8)
    latents = noise = torch.randn(1, 4, 8, 8)
    for t in sampler.timesteps:
        latents = sampler.step(noise - x0, t, latents).prev_sample
    torch.testing.assert_close(latents, x0, rtol=1e-4, atol=1e-4)


def test_the_pipelines_loop_lands_on_the_data_with_the_exact_velocity(tiny_components):
    """Our sampling loop on a flow model (start scale, timesteps given to the U-Net, steps): with the exact velocity
    of one data point, (x - x0) / s at s = t / T, it ends on that point."""
    flow = FlowMatchEulerDiscreteScheduler.from_config(FLOW.to_scheduler_config())
    pipe = Pipeline(**{**tiny_components, "scheduler": flow})
    assert pipe.is_flow and pipe.noise_schedule.is_flow
    x0 = torch.randn(1, 4, 16, 16)
    seen = []

    def exact(x, t, context, timestep_cond=None):
        seen.append(float(t.flatten()[0]))
        return (x - x0) / (t.flatten()[0] / 1000)

    pipe.denoiser = exact
    out = pipe.generate("a cat", num_inference_steps=6, guidance_scale=1.0, seed=0, output_type="latent",
                        progress=False)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    assert seen[0] == 1000.0 and len(seen) == 6  # starts at s = 1 (pure noise), one call per step


def test_the_model_not_the_sampler_decides_flow(tiny_components, tiny_model_dir):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler

    flow = FlowMatchEulerDiscreteScheduler.from_config(FLOW.to_scheduler_config())
    flow_pipe = Pipeline(**{**tiny_components, "scheduler": flow})
    with pytest.raises(UserError, match="flow-matching model .* not DPMSolverMultistepScheduler"):
        flow_pipe.scheduler = DPMSolverMultistepScheduler.from_config(NoiseSchedule().to_scheduler_config())
    diffusion = Pipeline(model=tiny_model_dir)
    with pytest.raises(UserError, match="samples flow-matching models"):
        diffusion.scheduler = flow
    with pytest.raises(UserError, match="FlowMatchHeunDiscreteScheduler .* samples flow-matching models"):
        diffusion.generate("a cat", scheduler=FlowMatchHeunDiscreteScheduler(), num_inference_steps=2, progress=False)


def test_flow_refuses_what_does_not_apply():
    with pytest.raises(ValueError, match="min_snr_gamma weights a diffusion"):
        FLOW.loss_weights(torch.tensor([3]), 5.0)
    with pytest.raises(ValueError, match="zero_terminal_snr and learned_variance do not apply"):
        NoiseSchedule(prediction_type="flow", zero_terminal_snr=True)
    base = ["output_dir=/tmp/never", "data=somewhere", "autoencoder=somewhere", "prediction_type=flow"]
    with pytest.raises(UserError, match="set min_snr_gamma=null"):
        ldm_config(ROOT / "configs" / "ldm" / "tiny.yaml", [*base, "min_snr_gamma=5"])
    with pytest.raises(UserError, match="leave offset_noise at 0"):
        ldm_config(ROOT / "configs" / "ldm" / "tiny.yaml", [*base, "offset_noise=0.1"])
    with pytest.raises(UserError, match="inpainting=true needs a diffusion model"):
        ldm_config(ROOT / "configs" / "ldm" / "tiny-inpaint.yaml", [*base, "init_from=", "inpainting=true"],
                   validate=False).check_flow()


def test_a_flow_model_trains_samples_with_flow_euler_and_refuses_other_samplers(emoji_dir, autoencoder_dir,
                                                                                  tmp_path, tiny_model_dir):
    out = tmp_path / "flow"
    config = ldm_config(ROOT / "configs" / "ldm" / "tiny.yaml",
                        [f"data={emoji_dir}", f"autoencoder={autoencoder_dir}", f"output_dir={out}", "max_steps=3",
                         "checkpoint_every=3", "sample_every=3", "prediction_type=flow"])
    trainer = LDMTrainer(config)
    final = trainer.run()
    # the trainer's loss is the velocity MSE at s T: recomputed by hand on one batch from the same draws
    batch = next(iter(trainer.loader))
    state = torch.random.get_rng_state()
    loss = trainer.compute_loss(batch)["loss"]
    torch.random.set_rng_state(state)
    latents, context = trainer.encode_batch(batch)
    noise = torch.randn(latents.shape)
    t = torch.randint(0, 1000, (len(latents),))
    s = ((t + 1) / 1000).view(-1, 1, 1, 1)
    prediction = trainer.unet_forward((1 - s) * latents + s * noise, t.float() + 1, encoder_hidden_states=context).sample
    torch.testing.assert_close(loss, ((prediction - (noise - latents)) ** 2).mean(), rtol=1e-5, atol=1e-7)

    pipe = Pipeline(model=final)
    assert pipe.is_flow and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    images = pipe.generate("a cat", num_inference_steps=4, seed=0, output_type="numpy", progress=False)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    for kwargs, message in (({"scheduler": "dpm++"}, "it samples with flow-euler, not DPMSolverMultistepScheduler"),
                            ({"step_schedule": "karras"}, "samples on flow-euler's own grid"),
                            ({"guidance_interval": (0.5, 2.0)}, "a flow-matching model is guided at every step")):
        with pytest.raises(UserError, match=message):
            pipe.generate("a cat", num_inference_steps=4, progress=False, **kwargs)
    # the page offers a flow model flow-euler on its own grid only, and a diffusion model every sampler but it
    assert sampler_choices(pipe) == ([MODEL_SCHEDULER, "flow-euler"], [SAMPLER_SPACING])
    samplers, schedules = sampler_choices(Pipeline(model=tiny_model_dir))
    assert "flow-euler" not in samplers and {"dpm++", "euler", "lcm"} <= set(samplers) and "ays" in schedules
    # and the page built on it shows that: flow-euler only, its own grid, the interval box locked, the image-to-image tab hidden
    app = build_app(model=str(final))
    assert dropdown_values(page_component(app, "gen-sampler")) == [MODEL_SCHEDULER, "flow-euler"]
    assert dropdown_values(page_component(app, "gen-step-schedule")) == [SAMPLER_SPACING]
    assert page_component(app, "gen-interval").interactive is False
    assert page_component(app, "i2i-tab").visible is False
    assert "flow-euler" not in dropdown_values(page_component(app, "in-sampler"))  # the inpainting default's tab
    diffusion_page = build_app(model=str(tiny_model_dir))  # and the reverse on a diffusion model's page
    assert page_component(diffusion_page, "i2i-tab").visible is True
    assert page_component(diffusion_page, "gen-interval").interactive is True
    assert "flow-euler" not in dropdown_values(page_component(diffusion_page, "gen-sampler"))
    with pytest.raises(UserError, match="image-to-image and inpainting take diffusion models"):
        Img2ImgPipeline(model=final)
    with pytest.raises(UserError, match="\\(flow-euler\\) samples flow-matching models"):
        Pipeline(model=tiny_model_dir).generate("a cat", scheduler="flow-euler", num_inference_steps=2,
                                                progress=False)
    # why no diffusers pipeline samples it: StableDiffusionPipeline asks every scheduler for init_noise_sigma and
    # scale_model_input, which the flow scheduler lacks (SD3 / Flux pipelines take transformers, not this U-Net)
    theirs = StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    with pytest.raises(AttributeError, match="init_noise_sigma|scale_model_input"):
        theirs("a cat", num_inference_steps=2, output_type="np")
