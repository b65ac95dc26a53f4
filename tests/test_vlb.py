"""The variational bound (ldm/diffusion.py) on 1-D Gaussian data, where the exact negative log-likelihood and the
optimal denoiser are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import NoiseSchedule, gaussian_kl, gaussian_nll, variational_bound

STD = 0.5  # x_0 ~ N(0, STD^2)
TRUE_NLL = 0.5 * math.log(2 * math.pi * math.e * STD**2)  # E[-log p(x_0)], nats


def _schedule(steps: int) -> NoiseSchedule:
    """DDPM's linear schedule (1e-4 to 0.02 at 1000 steps), stretched to `steps` (betas capped at 0.999)."""
    return NoiseSchedule(steps, "linear", beta_start=1e-4 * 1000 / steps, beta_end=min(0.02 * 1000 / steps, 0.999))


def _optimal(schedule: NoiseSchedule):
    """E[eps | x_t] for Gaussian data, and the exact reverse variance Var(x_{t-1} | x_t) (Var(x_0 | x_t) at t=0)."""
    def x0_variance(alpha_bar):
        return STD**2 * (1 - alpha_bar) / (alpha_bar * STD**2 + 1 - alpha_bar)

    def predict(xt, t):
        alpha_bar = schedule.alpha_bar(t, xt)
        return (1 - alpha_bar).sqrt() * xt / (alpha_bar * STD**2 + 1 - alpha_bar)

    def variance(xt, t):
        alpha_bar = schedule.alpha_bar(t, xt)
        if int(t[0]) == 0:
            return x0_variance(alpha_bar)
        prev = schedule.alpha_bar(t - 1, xt)
        beta = schedule.betas.double()[t].view_as(alpha_bar)
        return beta * (1 - prev) / (1 - alpha_bar) + (beta * prev.sqrt() / (1 - alpha_bar)) ** 2 * x0_variance(
            alpha_bar)

    return predict, variance


def _bound(schedule, **kwargs) -> tuple[float, float]:
    torch.manual_seed(0)
    x0 = torch.randn(20000, 1, dtype=torch.float64) * STD
    prior, terms = variational_bound(schedule, x0, **kwargs)
    total = prior + terms.sum(1)
    return float(total.mean()), float(total.std() / math.sqrt(len(total)))


def test_the_bound_is_above_the_true_nll_and_its_gap_shrinks_with_more_steps():
    gaps = []
    for steps in (10, 100, 1000):
        schedule = _schedule(steps)
        predict, variance = _optimal(schedule)
        fixed, error = _bound(schedule, predict=predict)
        assert fixed - TRUE_NLL > 5 * error  # fixed variances: a strict upper bound
        gaps.append(fixed - TRUE_NLL)
        exact, error = _bound(schedule, predict=predict, variance=variance)
        assert abs(exact - TRUE_NLL) < 3 * error + 0.01  # exact reverse kernels: the bound is tight
    assert gaps == pytest.approx([3.31, 1.28, 0.58], abs=0.005)  # the gaps docs/evaluation.md quotes, seeded


def test_each_kl_term_equals_a_monte_carlo_estimate():
    torch.manual_seed(0)
    schedule = _schedule(100)
    x0 = torch.randn(1, 1, dtype=torch.float64) * STD
    t = torch.tensor([40])
    xt = schedule.add_noise(x0, torch.randn_like(x0), t)
    mean_q, var_q = schedule.posterior(x0, xt, t)
    mean_p, var_p = mean_q + 0.05, var_q * 1.3
    samples = mean_q + var_q.sqrt() * torch.randn(400_000, 1, dtype=torch.float64)
    monte_carlo = (gaussian_nll(samples, mean_p, var_p) - gaussian_nll(samples, mean_q, var_q)).mean()
    assert float(gaussian_kl(mean_q, var_q, mean_p, var_p)) == pytest.approx(float(monte_carlo), abs=2e-3)


def test_posterior_and_predicted_x0_match_diffusers_ddpm():
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule(1000, "scaled_linear")
    scheduler = DDPMScheduler(**schedule.to_scheduler_config())
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 500])
    xt = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(schedule.predicted_x0(xt, t, eps), x0, atol=1e-4, rtol=0)
    scheduler.set_timesteps(1000)
    mean, variance = schedule.posterior(x0, xt, t)
    # diffusers' step without noise (t=500, prev 499) returns the posterior mean for the predicted x_0 = x_0
    expected = scheduler.step(eps, 500, xt).pred_original_sample
    torch.testing.assert_close(expected, x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(variance.flatten()[0], scheduler._get_variance(500), atol=1e-6, rtol=1e-4)


def test_ldm_eval_vlb_on_a_tiny_model(tiny_model_dir, emoji_dir, tmp_path, capsys):
    import json

    import yaml

    from cli.main import main as ldm_main

    out = tmp_path / "vlb"
    ldm_main(["eval", "vlb", "--model", str(tiny_model_dir), "--data", str(emoji_dir), "--num-images", "4",
              "--timestep-stride", "100", "--out", str(out)])
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["latent_dims"] == 4 * 16 * 16
    assert list(metrics["per_timestep"]) == [str(t) for t in [0, *range(100, 1000, 100)]]
    parts = metrics["prior_bits_per_dim"] + metrics["kl_bits_per_dim"] + metrics["decoder_bits_per_dim"]
    assert metrics["bits_per_dim"] == pytest.approx(parts) and metrics["kl_bits_per_dim"] > 0
    assert "| total |" in printed and (out / "vlb.png").is_file()
    (tiny_model_dir / "config.yaml").write_text(yaml.safe_dump({"beta_schedule": "linear"}))
    with pytest.raises(SystemExit):
        ldm_main(["eval", "vlb", "--model", str(tiny_model_dir), "--data", str(emoji_dir), "--out", str(out)])
    assert "training config.yaml says 'linear'" in capsys.readouterr().err
