"""First stage: a KL-regularised autoencoder (diffusers `AutoencoderKL`) mapping pixels to latents and back."""

import ldm  # noqa: F401  (checks torch / torchvision before diffusers is imported)
