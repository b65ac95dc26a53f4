"""First stage: a KL-regularised autoencoder (diffusers `AutoencoderKL`) mapping pixels to latents and back."""

from core.torch_env import check_torchvision

check_torchvision()  # before diffusers is imported
