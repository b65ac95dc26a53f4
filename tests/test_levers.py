"""Training levers of issue 33 that are config keys: timestep densities, learning-rate schedules and the
optimiser / EMA kernels."""

from __future__ import annotations

import math
import os

import pytest
import torch

from core.config import load_config
from core.errors import UserError
from core.trainer import make_lr_scheduler
from ldm.diffusion import diffusion_loss, sample_noise, sample_timesteps
from recipes.consistency import DistillTrainConfig
from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))


def test_uniform_density_draws_what_it_always_drew():
    torch.manual_seed(3)
    expected = torch.randint(0, 1000, (64,))
    torch.manual_seed(3)
    assert torch.equal(sample_timesteps(64, 1000, "cpu"), expected)


@pytest.mark.parametrize("density, mean, low, high, expected", [
    # logit-normal N(0, 1): P(t/T in [1/3, 2/3)) = P(|n| < logit(2/3)) = 2 Phi(ln 2) - 1
    ("logit_normal", 0.0, 1 / 3, 2 / 3, math.erf(math.log(2) / math.sqrt(2))),
    # a mean of 1 moves mass to noisier steps: P(u >= 1/2) = P(n >= 0) = Phi(1)
    ("logit_normal", 1.0, 0.5, 1.0, 0.5 * (1 + math.erf(1 / math.sqrt(2)))),
    # CosMap: u < x  <=>  u' < (2 / pi) atan(x / (1 - x))
    ("cosmap", 0.0, 0.0, 0.25, 2 / math.pi * math.atan(1 / 3)),
    ("uniform", 0.0, 0.0, 0.25, 0.25),
])
def test_densities_put_their_mass_where_their_formula_says(density, mean, low, high, expected):
    torch.manual_seed(0)
    t = sample_timesteps(200_000, 1000, "cpu", density, logit_mean=mean)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    share = ((t >= low * 1000) & (t < high * 1000)).float().mean().item()
    assert share == pytest.approx(expected, abs=0.005)


def test_the_trainer_draws_its_timesteps_from_the_configured_density(emoji_dir, autoencoder_dir, tmp_path):
    config = load_config(LDMTrainConfig, "configs/ldm/tiny.yaml",
                         [f"data={emoji_dir}", f"autoencoder={autoencoder_dir}", f"output_dir={tmp_path / 'run'}",
                          "timestep_density=logit_normal", "timestep_logit_mean=1.5", "timestep_logit_std=0.5"])
    trainer = LDMTrainer(config)
    trainer.setup()
    batch = next(iter(trainer.loader))

    def by_hand(density: str) -> float:
        torch.manual_seed(7)
        latents, context = trainer.encode_batch(batch)
        noise = sample_noise(latents)
        t = sample_timesteps(len(latents), 1000, "cpu", density, 1.5, 0.5)
        prediction = trainer.model(trainer.schedule.add_noise(latents, noise, t), t, encoder_hidden_states=context)
        target = trainer.schedule.target(latents, noise, t)
        return diffusion_loss(prediction.sample, target, trainer.schedule.loss_weights(t, None)).item()

    with torch.no_grad():
        torch.manual_seed(7)
        loss = trainer.compute_loss(batch)["loss"].item()
        assert loss == pytest.approx(by_hand("logit_normal"), rel=1e-6)
        assert abs(loss - by_hand("uniform")) > 1e-4  # an untrained U-Net's loss varies little with t


def test_inverse_sqrt_warms_up_then_decays_as_one_over_the_root_of_the_step():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = make_lr_scheduler("inverse_sqrt", optimizer, warmup_steps=10, max_steps=100)
    rates = []
    for _ in range(41):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[5] == pytest.approx(1.0) and rates[10] == pytest.approx(2.0)
    assert rates[40] == pytest.approx(2.0 * math.sqrt(10 / 40))
    # a time scale of its own: the decay starts slowly after warm-up (EDM2's shape, transformers' formula)
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = make_lr_scheduler("inverse_sqrt", optimizer, warmup_steps=10, max_steps=100, timescale=1000)
    for _ in range(1010):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(2.0 * math.sqrt(1000 / 2000))


@pytest.mark.parametrize("overrides, message", [
    (["timestep_density=lognormal"], "unknown timestep_density 'lognormal'; valid: uniform, logit_normal, cosmap"),
    (["timestep_density=logit_normal", "timestep_logit_std=0"], "timestep_logit_std finite and > 0"),
    (["lr_scheduler=inverse_square_root"], "unknown lr_scheduler 'inverse_square_root'; valid: linear, cosine"),
    (["lr_scheduler=inverse_sqrt", "lr_warmup_steps=0"], "inverse_sqrt needs a time scale"),
    (["lr_scheduler=piecewise_constant"], "unknown lr_scheduler 'piecewise_constant'"),
    (["lr_scheduler=constant", "lr_warmup_steps=100"], "lr_scheduler=constant has no warm-up"),
    (["lr_scheduler=cosine", "lr_timescale=100"], "lr_timescale is inverse_sqrt's"),
    (["adam_implementation=apex"], "unknown adam_implementation 'apex'; valid: null (torch's choice), for-loop, "
                                   "foreach, fused"),
])
def test_bad_lever_settings_are_one_line_each(overrides, message, tmp_path):
    with pytest.raises(UserError) as error:
        load_config(LDMTrainConfig, "configs/ldm/tiny.yaml",
                    [f"output_dir={tmp_path}", f"data={tmp_path}", "autoencoder=x", *overrides])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_distillation_refuses_a_timestep_density(tmp_path):
    with pytest.raises(UserError, match="draws its timesteps from the solver grid"):
        load_config(DistillTrainConfig, "configs/ldm/emoji-64-lcm.yaml",
                    [f"output_dir={tmp_path}", "timestep_density=cosmap"])


def test_adam_and_ema_kernels_train_the_same_weights(emoji_dir, autoencoder_dir, tmp_path):
    """foreach / fused AdamW and the foreach EMA update are the same maths as the per-tensor loops: three steps on
    the same batches land on the same weights and EMA (within float rounding), and each key reaches its kernel."""
    def train(name: str, overrides: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], LDMTrainer]:
        config = load_config(LDMTrainConfig, "configs/ldm/tiny.yaml",
                             [f"data={emoji_dir}", f"autoencoder={autoencoder_dir}", f"output_dir={tmp_path / name}",
                              "use_ema=true", *overrides])
        trainer = LDMTrainer(config)
        trainer.setup()
        try:
            start = [p.detach().clone() for p in trainer.model.parameters()]
            batches = iter(trainer.loader)
            for _ in range(3):
                torch.manual_seed(trainer.step)
                assert trainer.train_step(next(batches)) is not None
                trainer.step += 1
        finally:
            trainer.cleanup()
        weights = [p.detach().clone() for p in trainer.model.parameters()]
        assert max((w - w0).abs().max().item() for w, w0 in zip(weights, start)) > 1e-4  # the steps moved them
        return weights, [p.clone() for p in trainer.ema.shadow_params], trainer

    weights, ema, plain = train("loop", ["adam_implementation=for-loop"])
    assert plain.optimizer.optimizer.defaults["foreach"] is False and plain.ema.foreach is False
    for name, overrides, option in [("foreach", ["adam_implementation=foreach", "ema_foreach=true"], "foreach"),
                                    ("fused", ["adam_implementation=fused"], "fused")]:
        other_weights, other_ema, trainer = train(name, overrides)
        assert trainer.optimizer.optimizer.defaults[option] is True
        assert trainer.ema.foreach is (name == "foreach")
        for a, b in zip(weights + ema, other_weights + other_ema):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
