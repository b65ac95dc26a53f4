"""PatchGAN discriminator and the GAN terms of the LDM autoencoder objective (Esser et al. 2021, Rombach et al. 2022).

Written here because diffusers ships no patch discriminator: a small conv net scoring overlapping patches, hinge
losses, and the adaptive weight that balances the GAN term against reconstruction via last-layer gradients.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """pix2pix's NLayerDiscriminator: `layers` stride-2 conv blocks, then a 1-channel patch score map."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            previous, width = width, channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(previous, width, 4, stride, 1, bias=False), nn.BatchNorm2d(width),
                       nn.LeakyReLU(0.2, True)]
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():  # DCGAN initialisation, as in the reference code
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (torch.relu(1.0 - real_scores).mean() + torch.relu(1.0 + fake_scores).mean())


def generator_gan_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """-E[D(x_hat)]: the decoder is pushed towards patches the discriminator scores as real."""
    return -fake_scores.mean()


def adaptive_gan_weight(nll: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """||grad_last nll|| / (||grad_last gan|| + 1e-4) (Esser et al. 2021, eq. 7), detached and clamped."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
