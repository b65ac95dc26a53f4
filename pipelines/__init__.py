"""Inference: text-to-image, image-to-image and inpainting pipelines, model loading and saving.

`Pipeline` is imported on first use, so that light modules (pipelines/defaults.py, read by `ldm --help`) do not
pay for torch and diffusers.
"""

from core.torch_env import check_torchvision

check_torchvision()  # before diffusers is imported; cheap when torchvision is not installed

__all__ = ["Pipeline", "Img2ImgPipeline", "InpaintPipeline"]


def __getattr__(name: str):
    if name == "Pipeline":
        from pipelines.text_to_image import Pipeline

        return Pipeline
    if name == "Img2ImgPipeline":
        from pipelines.img2img import Img2ImgPipeline

        return Img2ImgPipeline
    if name == "InpaintPipeline":
        from pipelines.inpaint import InpaintPipeline

        return InpaintPipeline
    raise AttributeError(f"module 'pipelines' has no attribute '{name}'")
