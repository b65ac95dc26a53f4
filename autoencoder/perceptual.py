"""The perceptual term of the autoencoder loss, pluggable: `perceptual=lpips | ssim | none`.

LPIPS (Zhang et al. 2018) needs pretrained VGG/AlexNet weights, which cannot be downloaded here; it is used when the
`lpips` package and its backbone weights are on disk. `ssim` is the offline choice: 1 - SSIM (Wang et al. 2004), a
structural similarity that needs no weights (it is not a learned perceptual metric). `none` turns the term off.
"""

from __future__ import annotations

import torch
from torch import nn

from core.errors import UserError

PERCEPTUAL_CHOICES = ("lpips", "ssim", "none")


class SSIMDistance(nn.Module):
    """Per-image 1 - SSIM on [-1, 1] images (Gaussian window 11, sigma 1.5), via torchmetrics."""

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        from torchmetrics.functional.image import structural_similarity_index_measure

        ssim = structural_similarity_index_measure(
            (reconstructions.float() + 1) / 2, (images.float() + 1) / 2, data_range=1.0, reduction="none")
        return 1.0 - ssim


class LPIPSDistance(nn.Module):
    """Per-image LPIPS distance from the `lpips` package (VGG backbone), frozen."""

    def __init__(self) -> None:
        super().__init__()
        try:
            import lpips

            self.net = lpips.LPIPS(net="vgg", verbose=False)
        except Exception as err:  # ImportError, or a failed download of the backbone weights when offline
            raise UserError("perceptual=lpips needs the `lpips` package with its VGG weights on disk "
                            f"({type(err).__name__}: {err}); use perceptual=ssim offline") from err
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPSDistance":
        return super().train(False)

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        return self.net(reconstructions.float(), images.float()).flatten()


def make_perceptual(name: str) -> nn.Module | None:
    """The perceptual distance module for a config value, or None for `none`."""
    if name not in PERCEPTUAL_CHOICES:
        raise UserError(f"unknown perceptual term '{name}'; valid: {', '.join(PERCEPTUAL_CHOICES)}")
    if name == "none":
        return None
    return SSIMDistance() if name == "ssim" else LPIPSDistance()
