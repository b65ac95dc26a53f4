"""Second stage: the diffusion math, text conditioning and the latent U-Net (trained by recipes/latent_diffusion.py)."""

from core.torch_env import check_torchvision

check_torchvision()  # before diffusers / transformers are imported
