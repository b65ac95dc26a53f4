"""The diffusion math, all of it, in small functions: noise schedule, forward noising, targets, loss weighting.

Conventions follow DDPM (Ho et al. 2020) and match diffusers' schedulers exactly (`to_scheduler_config`), so a U-Net
trained here samples correctly with any diffusers scheduler built from that config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_betas(schedule: str, num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Per-step variances beta_t, as diffusers computes them (float32)."""
    if schedule == "linear":  # DDPM section 4
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":  # LDM / Stable Diffusion
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":  # improved DDPM eq. 17, betas capped at 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                 for i in range(num_timesteps)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule '{schedule}'; valid: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step is pure noise (Lin et al. 2023, algorithm 1)."""
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass
class NoiseSchedule:
    """alpha_bar_t for t = 0..T-1 and the settings that made it (saved as the diffusers scheduler config)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type '{self.prediction_type}'; valid: {', '.join(PREDICTION_TYPES)}")
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def _alpha_bar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod.to(like.device)[timesteps].to(like.dtype)
        return alpha_bar.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4)."""
        alpha_bar = self._alpha_bar(timesteps, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network predicts: eps (L_simple, DDPM eq. 14) or v = sqrt(ab) eps - sqrt(1-ab) x_0."""
        if self.prediction_type == "epsilon":
            return noise
        alpha_bar = self._alpha_bar(timesteps, x0)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return alpha_bar / (1 - alpha_bar)

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor:
        """Per-sample weights: 1 (L_simple) or min-SNR-gamma (Hang et al. 2023, eq. 8 for eps, v variants)."""
        if min_snr_gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        snr = self.snr(timesteps)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)

    def to_scheduler_config(self) -> dict:
        """Keyword arguments for diffusers' `DDPMScheduler` (and every scheduler `from_config` builds from it)."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "beta_start": self.beta_start, "beta_end": self.beta_end, "prediction_type": self.prediction_type,
                "rescale_betas_zero_snr": self.zero_terminal_snr, "clip_sample": False,
                "steps_offset": 1, "timestep_spacing": "leading"}


def sample_timesteps(batch: int, num_train_timesteps: int, device: torch.device | str) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1} (DDPM algorithm 1, line 3)."""
    return torch.randint(0, num_train_timesteps, (batch,), device=device)


def sample_noise(latents: torch.Tensor, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise, plus optional per-channel offset noise (a constant shift per image and channel)."""
    # not randn_like: it follows the input's strides, so a strided latent view would get rearranged noise
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                                   dtype=latents.dtype)
    return noise


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted MSE, mean over latent cells per sample, then over the batch; computed in fp32."""
    per_sample = (prediction.float() - target.float()).square().flatten(1).mean(1)
    return (weights.float() * per_sample).mean()
