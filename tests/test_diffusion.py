import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion import NoiseSchedule, diffusion_loss, sample_noise


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(beta_schedule):
    ours = NoiseSchedule(beta_schedule=beta_schedule)
    theirs = DDPMScheduler(**ours.to_scheduler_config())
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)


def test_zero_terminal_snr_matches_diffusers():
    ours = NoiseSchedule(zero_terminal_snr=True)
    theirs = DDPMScheduler(**ours.to_scheduler_config())
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=1e-6)
    assert ours.alphas_cumprod[-1] == 0


def test_add_noise_and_v_target_match_diffusers():
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = NoiseSchedule(prediction_type="v_prediction")
    theirs = DDPMScheduler(**ours.to_scheduler_config())
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    torch.testing.assert_close(ours.target(x0, noise, t), theirs.get_velocity(x0, noise, t))
    assert torch.equal(NoiseSchedule().target(x0, noise, t), noise)  # L_simple predicts eps


def test_min_snr_weights():
    schedule = NoiseSchedule()
    t = torch.tensor([0, 500, 999])
    snr = schedule.snr(t)
    weights = schedule.loss_weights(t, min_snr_gamma=5.0)
    torch.testing.assert_close(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 1e-2 and weights[2] == 1.0  # low noise down-weighted, high noise untouched
    assert torch.equal(schedule.loss_weights(t, None), torch.ones(3))


def test_loss_is_weighted_per_sample_mse():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    assert diffusion_loss(prediction, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 0.5 * 4) / 2)


def test_offset_noise_shifts_whole_channels():
    torch.manual_seed(0)
    latents = torch.zeros(64, 4, 8, 8)
    plain = sample_noise(latents)
    torch.manual_seed(0)
    offset = sample_noise(latents, offset_noise=0.5)
    shift = offset - plain
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)
    assert shift[:, :, 0, 0].std() == pytest.approx(0.5, rel=0.2)
