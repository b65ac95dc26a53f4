"""The autoencoder objective of the LDM paper (appendix G): reconstruction + perceptual + small KL term.

Sums over pixels and latent cells, averaged over the batch, as CompVis' LPIPSWithDiscriminator does, so the usual
`kl_weight=1e-6` keeps its meaning; the per-image perceptual distance is added to every pixel's error, as there.
The GAN terms live in autoencoder/discriminator.py.
"""

from __future__ import annotations

import torch


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over latent cells (Kingma & Welling, appendix B)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def autoencoder_loss(images: torch.Tensor, reconstructions: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                     kl_weight: float, l1_weight: float = 1.0, l2_weight: float = 0.0,
                     perceptual: torch.Tensor | None = None, perceptual_weight: float = 1.0
                     ) -> dict[str, torch.Tensor]:
    """`loss` = nll + kl_weight * kl, with nll = pixel error (+ perceptual) summed per image, mean over the batch.

    `perceptual` is a per-image distance (B,) or None. `l1_pixel` (mean absolute error per value) is for logging.
    """
    images, reconstructions = images.float(), reconstructions.float()
    error = reconstructions - images
    batch, pixels = images.shape[0], images[0].numel()
    nll = (l1_weight * error.abs() + l2_weight * error.square()).sum() / batch
    parts = {}
    if perceptual is not None:
        parts["perceptual"] = perceptual.float().mean().detach()
        nll = nll + perceptual_weight * perceptual.float().sum() * pixels / batch
    kl = kl_to_standard_normal(mean.float(), logvar.float()).mean()
    return {"loss": nll + kl_weight * kl, "nll": nll, "kl": kl.detach(), "l1_pixel": error.abs().mean().detach(),
            **parts}
