"""Latent diffusion: the diffusion math, text conditioning, the latent U-Net and its training recipe."""

from ldm.torch_env import check_torchvision

check_torchvision()
