"""Guidance as small wrappers around a denoiser: classifier-free (Ho & Salimans 2022, eq. 6), autoguidance (Karras
et al. 2024) and classifier guidance (Dhariwal & Nichol 2021), which can wrap the first two."""

from __future__ import annotations

from typing import Callable

import torch

from ldm.diffusion import classifier_guided_epsilon

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ClassifierFreeGuidance:
    """guided = uncond + scale * (cond - uncond), both branches in one batched call; scale <= 1: cond only.

    With `guided_channels` k, only the first k output channels are guided and the rest (a learned variance) come
    from the conditional branch, as diffusers' DeepFloyd IF pipeline does. With `interval` (sigma_lo, sigma_hi] and
    `sigma_at` (timestep -> noise level sigma), guidance applies only to steps whose sigma lies in the interval and
    the others make one conditional call (limited-interval guidance, Kynkaanniemi et al. 2024).
    """

    def __init__(self, denoiser: Denoiser, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
                 guided_channels: int | None = None, interval: tuple[float, float] | None = None,
                 sigma_at: Callable[[torch.Tensor], float] | None = None) -> None:
        self.denoiser, self.cond, self.scale, self.guided_channels = denoiser, cond, scale, guided_channels
        self.uncond = uncond if self.needs_unconditional(scale) else None
        self.context = torch.cat([uncond, cond]) if self.uncond is not None else cond
        self.interval, self.sigma_at = interval, sigma_at

    def guides_at(self, t: torch.Tensor) -> bool:
        """Whether the step at timestep `t` is guided (both branches) or makes one conditional call."""
        if self.uncond is None:
            return False
        if self.interval is None:
            return True
        low, high = self.interval
        return low < self.sigma_at(t) <= high

    @staticmethod
    def needs_unconditional(scale: float) -> bool:
        """The one rule: guidance runs the unconditional branch only for scale > 1 (scale 1 is the cond model)."""
        return scale > 1

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.guides_at(t):
            return self.denoiser(x, t, self.cond)
        uncond, cond = self.denoiser(torch.cat([x, x]), t, self.context).chunk(2)
        k = self.guided_channels or cond.shape[1]
        guided = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1) if k < cond.shape[1] else guided


class AutoGuidance:
    """guided = guide + scale * (main - guide), both conditional on the prompt (Karras et al. 2024, eq. 2): the
    main model is pulled away from a smaller, shorter-trained `guide` of the same task instead of from its own
    unconditional branch. Two networks, two calls per guided step; outside `interval` (as in
    ClassifierFreeGuidance) one call of the main model. With the main model as its own guide it is the conditional
    model unguided."""

    def __init__(self, denoiser: Denoiser, guide: Denoiser, cond: torch.Tensor, scale: float,
                 guided_channels: int | None = None, interval: tuple[float, float] | None = None,
                 sigma_at: Callable[[torch.Tensor], float] | None = None) -> None:
        self.denoiser, self.guide, self.cond, self.scale = denoiser, guide, cond, scale
        self.guided_channels, self.interval, self.sigma_at = guided_channels, interval, sigma_at

    def guides_at(self, t: torch.Tensor) -> bool:
        if self.scale == 1:
            return False
        if self.interval is None:
            return True
        low, high = self.interval
        return low < self.sigma_at(t) <= high

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        main = self.denoiser(x, t, self.cond)
        if not self.guides_at(t):
            return main
        guide = self.guide(x, t, self.cond)
        k = self.guided_channels or main.shape[1]
        guided = guide[:, :k] + self.scale * (main[:, :k] - guide[:, :k])
        return torch.cat([guided, main[:, k:]], dim=1) if k < main.shape[1] else guided


class EmbeddedGuidance:
    """A w-conditioned consistency student: the guidance scale's embedding is a U-Net input (`timestep_cond`), so a
    step is one call on the conditional prompt (diffusers' StableDiffusionPipeline does the same for such a U-Net)."""

    def __init__(self, denoiser, cond: torch.Tensor, embedding: torch.Tensor) -> None:
        self.denoiser, self.cond, self.embedding = denoiser, cond, embedding

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, t, self.cond, self.embedding)


class ClassifierGuidance:
    """Adds s sqrt(1 - alpha_bar_t) grad log p(y | x_t) to the (possibly classifier-free guided) eps prediction; the
    gradient goes through the classifier only. Any extra output channels (a learned variance) pass unchanged."""

    def __init__(self, guided: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], classifier: torch.nn.Module,
                 label: int, scale: float, alphas_cumprod: torch.Tensor, channels: int) -> None:
        self.guided, self.classifier, self.label, self.scale = guided, classifier, label, scale
        self.alphas_cumprod, self.channels = alphas_cumprod, channels

    def grad_log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():  # generate runs in inference mode
            x = x.detach().clone().requires_grad_(True)
            timesteps = torch.as_tensor(t, device=x.device).clone()
            log_prob = torch.log_softmax(self.classifier(x, timesteps).float(), dim=-1)[:, self.label].sum()
            return torch.autograd.grad(log_prob, x)[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = self.guided(x, t)
        alpha_bar = self.alphas_cumprod.to(x.device)[int(t)].to(x.dtype)
        epsilon = classifier_guided_epsilon(output[:, :self.channels], self.grad_log_prob(x, t), alpha_bar,
                                            self.scale)
        return torch.cat([epsilon, output[:, self.channels:]], dim=1)
