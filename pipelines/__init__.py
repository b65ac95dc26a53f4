"""Inference: text-to-image (and later inpainting) pipelines, model loading and saving."""

import ldm  # noqa: F401  (checks torch / torchvision before diffusers is imported)
from pipelines.text_to_image import Pipeline

__all__ = ["Pipeline"]
