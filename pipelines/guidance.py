"""Classifier-free guidance as one small wrapper around a denoiser (Ho & Salimans 2022, eq. 6)."""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ClassifierFreeGuidance:
    """guided = uncond + scale * (cond - uncond), both branches in one batched call; scale <= 1: cond only.

    With `guided_channels` k, only the first k output channels are guided and the rest (a learned variance) come
    from the conditional branch, as diffusers' DeepFloyd IF pipeline does.
    """

    def __init__(self, denoiser: Denoiser, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
                 guided_channels: int | None = None) -> None:
        self.denoiser, self.cond, self.scale, self.guided_channels = denoiser, cond, scale, guided_channels
        self.uncond = uncond if self.needs_unconditional(scale) else None
        self.context = torch.cat([uncond, cond]) if self.uncond is not None else cond

    @staticmethod
    def needs_unconditional(scale: float) -> bool:
        """The one rule: guidance runs the unconditional branch only for scale > 1 (scale 1 is the cond model)."""
        return scale > 1

    @property
    def active(self) -> bool:
        return self.uncond is not None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.denoiser(x, t, self.cond)
        uncond, cond = self.denoiser(torch.cat([x, x]), t, self.context).chunk(2)
        k = self.guided_channels or cond.shape[1]
        guided = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1) if k < cond.shape[1] else guided
