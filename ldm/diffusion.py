"""The diffusion math, all of it, in small functions: noise schedule, forward noising, targets, loss weighting, and
the variational bound (DDPM eq. 5) term by term.

Conventions follow DDPM (Ho et al. 2020) and match diffusers' schedulers exactly (`to_scheduler_config`), so a U-Net
trained here samples correctly with any diffusers scheduler built from that config. `prediction_type="flow"` is the
research arm of rectified flow / flow matching on the linear path (Liu et al. 2023, Lipman et al. 2023; SD3, Esser
et al. 2024): x_t = (1 - s) x_0 + s eps with s = (t + 1) / T, the network predicting the velocity eps - x_0 at
timestep s T, as diffusers' FlowMatchEulerDiscreteScheduler (shift 1) samples it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"  # the scheduler class a flow-matching model folder saves


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
    learned_variance: bool = False  # the network also outputs the reverse variance (diffusers' "learned_range")

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type '{self.prediction_type}'; valid: {', '.join(PREDICTION_TYPES)}")
        if self.is_flow and (self.zero_terminal_snr or self.learned_variance):
            raise ValueError("prediction_type=flow has its own linear path: zero_terminal_snr and learned_variance "
                             "do not apply")
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def alpha_bar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at `timesteps`, shaped to broadcast against `like` (and in its dtype and device)."""
        alpha_bar = self.alphas_cumprod.to(like.device)[timesteps].to(like.dtype)
        return alpha_bar.view(-1, *([1] * (like.ndim - 1)))

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow"

    def flow_sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The flow path's noise share s = (t + 1) / T at training timesteps t in {0, ..., T-1}, shaped like
        `alpha_bar` (diffusers' flow sigmas with shift 1 run from 1 down to 1 / T)."""
        sigma = (timesteps.to(like.device, torch.float64) + 1) / self.num_train_timesteps
        return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """What the U-Net is given for training timesteps t: t itself, or for flow s T = t + 1 (the timesteps
        FlowMatchEulerDiscreteScheduler passes at sampling)."""
        return timesteps.float() + 1 if self.is_flow else timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4); flow: (1 - s) x_0 + s eps."""
        if self.is_flow:
            sigma = self.flow_sigma(timesteps, x0)
            return (1 - sigma) * x0 + sigma * noise
        alpha_bar = self.alpha_bar(timesteps, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network predicts: eps (L_simple, DDPM eq. 14), v = sqrt(ab) eps - sqrt(1-ab) x_0, or the flow's
        velocity eps - x_0 (d x_t / d s)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.is_flow:
            return noise - x0
        alpha_bar = self.alpha_bar(timesteps, x0)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0

    def predicted_x0(self, xt: torch.Tensor, timesteps: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x_0 implied by the network's eps, v or flow-velocity prediction at x_t."""
        if self.is_flow:
            return xt - self.flow_sigma(timesteps, xt) * model_output
        alpha_bar = self.alpha_bar(timesteps, xt)
        if self.prediction_type == "epsilon":
            return (xt - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
        return alpha_bar.sqrt() * xt - (1 - alpha_bar).sqrt() * model_output

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, timesteps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7); timesteps >= 1 in diffusers' 0-based
        indexing, where x_0 of the data precedes timestep 0."""
        alpha_bar = self.alpha_bar(timesteps, xt)
        alpha_bar_prev = self.alpha_bar(timesteps - 1, xt)
        beta = self.betas.to(xt.device)[timesteps].to(xt.dtype).view_as(alpha_bar)
        mean = (beta * alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev) * (1 - beta).sqrt() * xt) / (1 - alpha_bar)
        return mean, beta * (1 - alpha_bar_prev) / (1 - alpha_bar)

    def model_variance(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The fixed reverse-process variance: the posterior's (diffusers' "fixed_small"), at timestep 0 clipped to
        timestep 1's as improved DDPM does (it is 0 there)."""
        betas = self.betas.to(like.device, torch.float64)
        alphas_cumprod = self.alphas_cumprod.to(like.device, torch.float64)
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        variance = betas * (1 - prev) / (1 - alphas_cumprod)
        variance[0] = variance[1]
        return variance[timesteps].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def learned_variance_from(self, output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The reverse variance from the network's variance channels v in [-1, 1] (improved DDPM eq. 15, diffusers'
        "learned_range"): exp(frac log beta_t + (1 - frac) log beta~_t), frac = (v + 1) / 2."""
        min_log = self.model_variance(timesteps, output).log()
        max_log = self.betas.to(output.device, output.dtype)[timesteps].log().view_as(min_log)
        frac = (output + 1) / 2
        return torch.exp(frac * max_log + (1 - frac) * min_log)

    def predicted_noise(self, xt: torch.Tensor, timesteps: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """eps implied by the network's eps, v or flow-velocity prediction at x_t."""
        if self.prediction_type == "epsilon":
            return model_output
        if self.is_flow:
            return xt + (1 - self.flow_sigma(timesteps, xt)) * model_output
        alpha_bar = self.alpha_bar(timesteps, xt)
        return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * xt

    def sigmas(self) -> torch.Tensor:
        """The noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of each training timestep (EDM's sigma of
        the variance-exploding form x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps), float64. Not for flow, whose
        guidance and step options here do not take noise levels."""
        if self.is_flow:
            raise ValueError("a flow-matching model has no diffusion noise levels sigma_t here")
        alpha_bar = self.alphas_cumprod.double()
        return ((1 - alpha_bar) / alpha_bar).sqrt()

    def sigma_at(self, timestep: float | torch.Tensor) -> float:
        """sigma at a sampler's timestep, interpolated between training timesteps for the fractional ones that
        Karras-sigma samplers use (diffusers' `_sigma_to_t` inverted: linear in log sigma)."""
        t = float(timestep)
        log_sigmas = self.sigmas().log()
        low = min(max(int(math.floor(t)), 0), len(log_sigmas) - 1)
        high = min(low + 1, len(log_sigmas) - 1)
        weight = t - low
        return float(((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp())

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return alpha_bar / (1 - alpha_bar)

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor:
        """Per-sample weights: 1 (L_simple) or min-SNR-gamma (Hang et al. 2023, eq. 8 for eps, v variants)."""
        if min_snr_gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        if self.is_flow:
            raise ValueError("min_snr_gamma weights a diffusion schedule's timesteps; prediction_type=flow trains "
                             "the plain velocity loss (set min_snr_gamma=null)")
        snr = self.snr(timesteps)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        """The inverse of `to_scheduler_config`: the schedule a diffusers scheduler config describes (keys it leaves
        out take this class's defaults); a flow-matching scheduler's config gives the flow path."""
        flow_keys = "shift" in config and "beta_start" not in config  # a flow scheduler's config built in code
        if str(config.get("_class_name", "")).startswith("FlowMatch") or flow_keys:
            if config.get("shift", 1.0) != 1.0 or config.get("use_dynamic_shifting") or config.get("invert_sigmas"):
                raise ValueError("a flow-matching scheduler with a shift, dynamic shifting or inverted sigmas is not "
                                 "the path trained here (shift 1)")
            return cls(num_train_timesteps=config.get("num_train_timesteps", 1000), prediction_type="flow")
        keys = {"num_train_timesteps": "num_train_timesteps", "beta_schedule": "beta_schedule",
                "beta_start": "beta_start", "beta_end": "beta_end", "prediction_type": "prediction_type",
                "zero_terminal_snr": "rescale_betas_zero_snr"}
        given = {ours: config[theirs] for ours, theirs in keys.items() if config.get(theirs) is not None}
        return cls(**given, learned_variance=config.get("variance_type") in ("learned", "learned_range"))

    def to_scheduler_config(self) -> dict:
        """Keyword arguments for diffusers' `DDPMScheduler` (and every scheduler `from_config` builds from it); for
        flow, FlowMatchEulerDiscreteScheduler's (shift 1; `_class_name` says which)."""
        if self.is_flow:
            return {"_class_name": FLOW_SCHEDULER, "num_train_timesteps": self.num_train_timesteps, "shift": 1.0}
        config = {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                  "beta_start": self.beta_start, "beta_end": self.beta_end, "prediction_type": self.prediction_type,
                  "rescale_betas_zero_snr": self.zero_terminal_snr, "clip_sample": False,
                  "steps_offset": 1, "timestep_spacing": "leading"}
        return {**config, "variance_type": "learned_range"} if self.learned_variance else config


TIMESTEP_DENSITIES = ("uniform", "logit_normal", "cosmap")


def sample_timesteps(batch: int, num_train_timesteps: int, device: torch.device | str, density: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Training timesteps t in {0, ..., T-1}.

    "uniform": DDPM algorithm 1, line 3. The others draw u in (0, 1), the fraction of the schedule, and take
    t = floor(u T), as SD3 (Esser et al. 2024, section 3.1) draws its flow time: "logit_normal", u = sigmoid(n),
    n ~ N(logit_mean, logit_std^2), which favours the middle of the schedule (a positive mean shifts it to noisier
    steps); "cosmap", u = 1 - 1 / (tan(pi u' / 2) + 1), u' uniform (SD3's CosMap)."""
    if density == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), device=device)
    if density == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, device=device) * logit_std + logit_mean)
    elif density == "cosmap":
        u = 1 - 1 / (torch.tan(math.pi / 2 * torch.rand(batch, device=device, dtype=torch.float64)) + 1)
    else:
        raise ValueError(f"unknown timestep density '{density}'; valid: {', '.join(TIMESTEP_DENSITIES)}")
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def sample_noise(latents: torch.Tensor, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise, plus optional per-channel offset noise (a constant shift per image and channel)."""
    # not randn_like: it follows the input's strides, so a strided latent view would get rearranged noise
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                                   dtype=latents.dtype)
    return noise


def gaussian_kl(mean_q: torch.Tensor, var_q: torch.Tensor, mean_p: torch.Tensor, var_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_q, var_q) || N(mean_p, var_p)) per element, in nats."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, var) per element, in nats (a density: the latents are continuous)."""
    return 0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def vlb_term(schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, timesteps: torch.Tensor,
             x0_hat: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """One term of the bound per sample, in nats summed over dimensions: KL(q(x_{t-1} | x_t, x_0) || N(mean from
    x0_hat, variance)) for t > 0, the decoder term -log N(x_0; x0_hat, variance) at t = 0."""
    later = timesteps.clamp(min=1)
    mean_q, var_q = schedule.posterior(x0, xt, later)
    mean_p, _ = schedule.posterior(x0_hat, xt, later)
    kl = gaussian_kl(mean_q, var_q.expand_as(x0), mean_p, variance)
    decoder = gaussian_nll(x0, x0_hat, variance)
    first = (timesteps == 0).view(-1, *([1] * (x0.ndim - 1)))
    return torch.where(first, decoder, kl).flatten(1).sum(1)


def variational_bound(schedule: NoiseSchedule, x0: torch.Tensor, predict: Callable,
                      timesteps: torch.Tensor | None = None,
                      variance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms of L_VLB = L_T + sum_t L_{t-1} + L_0 (DDPM eq. 5) for each x_0, in nats summed over dimensions.

    Returns (prior L_T per sample, (B, len(timesteps)) terms from `vlb_term`), one fresh noise draw per term (an
    unbiased estimate of each expectation). `predict(x_t, t)` returns the network's eps / v output, or (output,
    variance) for a learned-variance model; `variance(x_t, t)` gives the reverse variance otherwise (default: the
    fixed `model_variance`); all timesteps by default. Computed in float64.
    """
    x0 = x0.double()
    timesteps = torch.arange(schedule.num_train_timesteps) if timesteps is None else timesteps
    batch = x0.shape[0]
    last = torch.full((batch,), schedule.num_train_timesteps - 1)
    alpha_bar_last = schedule.alpha_bar(last, x0)
    prior = gaussian_kl(alpha_bar_last.sqrt() * x0, (1 - alpha_bar_last).expand_as(x0), torch.zeros_like(x0),
                        torch.ones_like(x0)).flatten(1).sum(1)
    terms = []
    for t in timesteps.tolist():
        step = torch.full((batch,), t)
        xt = schedule.add_noise(x0, torch.randn(x0.shape, dtype=x0.dtype), step)
        output = predict(xt, step)
        if isinstance(output, tuple):
            output, var_p = output
        elif variance is not None:
            var_p = variance(xt, step)
        else:
            var_p = schedule.model_variance(step, x0)
        x0_hat = schedule.predicted_x0(xt, step, output.double())
        terms.append(vlb_term(schedule, x0, xt, step, x0_hat, var_p.double().expand_as(x0)))
    return prior, torch.stack(terms, dim=1)


def classifier_guided_epsilon(epsilon: torch.Tensor, grad_log_prob: torch.Tensor, alpha_bar: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """eps - s sqrt(1 - alpha_bar_t) grad_x log p(y | x_t): classifier guidance in the form every epsilon sampler can
    use (Dhariwal & Nichol 2021, eq. 14 / algorithm 2)."""
    return epsilon - scale * (1 - alpha_bar).sqrt() * grad_log_prob


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted MSE, mean over latent cells per sample, then over the batch; computed in fp32."""
    per_sample = (prediction.float() - target.float()).square().flatten(1).mean(1)
    return (weights.float() * per_sample).mean()


# ---- consistency distillation (latent consistency models, Luo et al. 2023) ---------------------------------------
# The student f(x_t, t, w, c) maps any point of the teacher's guided probability-flow ODE to its end x_0. Its output
# is c_skip(t) x_t + c_out(t) x0_hat (the boundary condition f(x, 0) = x), trained so that f at x_{t_n+k} equals the
# EMA target's f at x_{t_n}, one skipping DDIM step of the teacher earlier. diffusers' LCMScheduler samples with the
# same c_skip / c_out, timestep grid and guidance embedding (tests/test_consistency.py checks each against it).

def solver_timesteps(num_train_timesteps: int, num_solver_steps: int) -> torch.Tensor:
    """The skipping-step grid t_1 < ... < t_N (k = T / N apart, ending at T - 1): LCMScheduler's training grid for
    `original_inference_steps` = N."""
    skip = num_train_timesteps // num_solver_steps
    return torch.arange(1, num_solver_steps + 1) * skip - 1


def consistency_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) per timestep (LCM eq. 9 with t scaled by `timestep_scaling`): c_skip(0) = 1, c_out(0) = 0."""
    scaled = timestep_scaling * timesteps.double()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def guidance_embedding(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of w = guidance_scale - 1 (times 1000) that a w-conditioned student takes as
    `timestep_cond`: the embedding diffusers' StableDiffusionPipeline computes for such a U-Net."""
    w = (scale.float() - 1) * 1000.0
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * frequencies.to(w.device)[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, 1)) if dim % 2 else embedding


def guided_ddim_step(schedule: NoiseSchedule, xt: torch.Tensor, timesteps: torch.Tensor, previous: torch.Tensor,
                     cond_output: torch.Tensor, uncond_output: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step of the classifier-free guided teacher from t to `previous` (< t, >= 0):
    x0 and eps each guided as uncond + s (cond - uncond), then x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps."""
    s = scale.view(-1, *([1] * (xt.ndim - 1))).to(xt.dtype)
    x0 = [schedule.predicted_x0(xt, timesteps, o) for o in (cond_output, uncond_output)]
    eps = [schedule.predicted_noise(xt, timesteps, o) for o in (cond_output, uncond_output)]
    x0_guided = x0[1] + s * (x0[0] - x0[1])
    eps_guided = eps[1] + s * (eps[0] - eps[1])
    alpha_bar_prev = schedule.alpha_bar(previous, xt)
    return alpha_bar_prev.sqrt() * x0_guided + (1 - alpha_bar_prev).sqrt() * eps_guided


def consistency_output(schedule: NoiseSchedule, xt: torch.Tensor, timesteps: torch.Tensor, model_output: torch.Tensor,
                       timestep_scaling: float = 10.0) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t): the consistency function from the network's output."""
    c_skip, c_out = consistency_scalings(timesteps, timestep_scaling)
    shape = (-1, *([1] * (xt.ndim - 1)))
    x0 = schedule.predicted_x0(xt, timesteps, model_output)
    return c_skip.to(xt.device).view(shape) * xt + c_out.to(xt.device).view(shape) * x0


def pseudo_huber_loss(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((a - b)^2 + c^2) - c), computed in fp32: L2-like below c, L1-like above (consistency models'
    improved training; LCM-LoRA)."""
    return (torch.sqrt((prediction.float() - target.float()).square() + c * c) - c).mean()
