"""Second stage: the diffusion math, text conditioning, the latent U-Net (trained by recipes/latent_diffusion.py), the
sharded latent/text cache and the inpainting contract between its fine-tune and inference."""

from core.torch_env import check_torchvision

check_torchvision()  # before diffusers / transformers are imported
