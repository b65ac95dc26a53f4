"""The validation loss: the formula written out (fixed timesteps and noise per image and seed, the EMA weights), two
ranks against one on the same trained weights, `keep_best`, a held-out share never trained on, and the trackers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DDPMScheduler

from core.config import load_config
from core.data.batches import BucketBatchSampler
from core.errors import UserError
from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer
from helpers import ROOT, TWO_RANKS, run, scalars


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _config(emoji_dir, autoencoder_dir, output_dir, *extra) -> LDMTrainConfig:
    return load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", [f"data={emoji_dir}", f"autoencoder={autoencoder_dir}",
                                                                 f"output_dir={output_dir}", *extra])


def test_the_loss_is_l_simple_of_the_ema_weights_with_fixed_timesteps_and_noise(emoji_dir, autoencoder_dir,
                                                                                tmp_path):
    """validate() against the formula written out: per held-out image, its posterior mean's latents noised with
    its batch's seeded noise at the midpoints of 8 equal timestep bins, the unweighted MSE of the EMA weights' noise
    prediction averaged over those timesteps, then over the images; the training RNG left alone."""
    trainer = LDMTrainer(_config(emoji_dir, autoencoder_dir, tmp_path, "cache_latents=false"))
    trainer.setup()
    config, vae = trainer.config, trainer.vae
    assert (config.validation_timesteps, config.num_train_timesteps, config.prediction_type) == (8, 1000, "epsilon")
    assert len(trainer.validation_rows) == len(trainer.validation_batches) == 8  # 4 held-out names x 2 styles; one
    # image per batch (batch_size 8 = 8 timesteps)
    ema_weights = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))  # the EMA starts from them
    with torch.no_grad():  # the trained weights moved off the EMA's: the loss is still the EMA weights'
        for parameter in trainer.model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    alphas_cumprod = DDPMScheduler.from_config(config.noise_schedule().to_scheduler_config()).alphas_cumprod
    timesteps = torch.tensor([62, 187, 312, 437, 562, 687, 812, 937])
    alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    losses = []
    with torch.no_grad():
        for b, row in enumerate(trainer.validation_rows):
            x0 = vae.encode(row["pixel_values"][None]).latent_dist.mean * vae.config.scaling_factor
            context = trainer.text_encoder.encode([row["captions"][0]]).hidden_states
            torch.manual_seed(config.seed * 1_000_003 + b)
            noise = torch.randn(8, *x0.shape[1:])
            noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
            prediction = ema_weights(noisy, timesteps, encoder_hidden_states=context.expand(8, -1, -1)).sample
            losses.append((prediction - noise).square().mean())
    state = torch.get_rng_state()
    assert trainer.validate() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert torch.equal(torch.get_rng_state(), state)
    trainer.cleanup()


@pytest.mark.slow
def test_two_ranks_log_the_loss_one_rank_computes_on_the_same_trained_weights_and_keep_best_exports_its_minimum(
        emoji_dir, autoencoder_dir, tmp_path):
    two = tmp_path / "two"
    settings = ["max_steps=6", "checkpoint_every=3", "sample_every=1000", "learning_rate=0.01", "batch_size=4"]
    run(TWO_RANKS + ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={emoji_dir}",
                     f"autoencoder={autoencoder_dir}", f"output_dir={two}", "keep_best=true", *settings],
        env={"ACCELERATE_USE_CPU": "1"})
    logged = scalars(two, "val/loss")
    assert len(logged) == 3  # steps 0, 3 and 6
    assert abs(logged[2] - logged[0]) > 1e-3 * logged[0]  # trained: the EMA weights moved off the initial ones
    for step, loss in zip((3, 6), logged[1:]):  # the same checkpointed weights, all batches on one rank
        checkpoint = two / "checkpoints" / f"step-{step:08d}"
        trainer = LDMTrainer(_config(emoji_dir, autoencoder_dir, tmp_path / f"one-{step}", *settings,
                                     f"resume={checkpoint}", f"cache_dir={two / 'cache'}"))
        trainer.setup()
        assert trainer.step == step
        assert trainer.validate() == pytest.approx(loss, rel=1e-5)
        trainer.cleanup()
    record = json.loads((two / "best" / "validation.json").read_text())
    assert record["validation_loss"] == pytest.approx(min(logged), rel=1e-6)
    assert record["step"] == [0, 3, 6][logged.index(min(logged))]
    assert (two / "best" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_held_out_share_is_never_trained_on(emoji_dir, autoencoder_dir, tmp_path):
    for cached in ("true", "false"):
        trainer = LDMTrainer(_config(emoji_dir, autoencoder_dir, tmp_path / cached, "validation_fraction=0.25",
                                     f"cache_latents={cached}"))
        trainer.setup()
        held = set(trainer.held_out.tolist())
        assert len(held) == round(0.25 * 72) and len(trainer.validation_rows) == len(held)
        if cached == "true":
            sampler = trainer.loader.batch_sampler
            drawn = {i for epoch in range(3) for batch in sampler.epoch_batches(epoch) for i in batch}
        else:
            drawn = set(trainer.loader.dataset.indices)
        assert drawn and not drawn & held
        trainer.cleanup()


def test_the_bucket_sampler_leaves_out_excluded_items():
    sampler = BucketBatchSampler([0] * 10 + [1] * 10, 2, seed=0, exclude=torch.tensor([0, 1, 2, 15]))
    drawn = [i for batch in sampler.epoch_batches(0) for i in batch]
    # 7 items left in bucket 0 and 9 in bucket 1: 3 + 4 full batches of 2
    assert len(drawn) == len(set(drawn)) == 14 and not {0, 1, 2, 15} & set(drawn)
    assert len(sampler) == 7


def test_the_autoencoder_logs_its_validation_loss(autoencoder_dir):
    assert len(scalars(autoencoder_dir, "val/loss")) == 2  # before the first step and at the last (4)


@pytest.mark.parametrize("override, message", [
    ("log_with=[nonsense]", "unknown tracker 'nonsense' in log_with; valid: "),
    ("log_with=[wandb]", "log_with=wandb needs its package, which is not installed: pip install wandb"),
    ("validation_fraction=1.0", r"validation_fraction must be in \[0, 1\)"),
    ("validation_every=0", "validation_every must be at least 1"),
])
def test_bad_validation_and_tracker_settings(emoji_dir, autoencoder_dir, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        _config(emoji_dir, autoencoder_dir, tmp_path, override)
