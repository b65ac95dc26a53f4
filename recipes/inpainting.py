"""Inpainting fine-tune: `accelerate launch train_ldm.py --config configs/ldm/<preset>-inpaint.yaml init_from=DIR`.

The recipe of Stable Diffusion's inpainting checkpoints on the latent diffusion loop: the text-to-image U-Net of
`init_from` with `conv_in` widened to 9 channels (new ones zero, so step 0 predicts what the text-to-image model does),
trained with the same L_simple on [noisy latents, mask, masked-image latents]. Masks come from ldm/masks.py, one per
image and step, the whole image with `mask_full_probability`; condition dropout drops only the text. The masked-image
latents depend on the step's mask, so images are encoded every step (no latent cache): two autoencoder encodes per
image and step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from core.errors import UserError
from core.images import make_grid, tensor_to_pil
from ldm.inpainting import encode_masked_image, grey_hole_image, mask_at_latent_size, unet_conditioning
from ldm.masks import MaskGenerator
from ldm.unet import inpainting_unet_from
from pipelines.inpaint import InpaintPipeline
from pipelines.loading import check_model_folder, read_model_index, resolve_model_path
from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer


@dataclass
class InpaintTrainConfig(LDMTrainConfig):
    """An inpainting fine-tune: the LDM settings plus where to start from and how masks are drawn."""

    init_from: str = ""  # a text-to-image model folder (train_ldm.py's final/, or an `ldm export` folder)
    inpainting: bool = True  # what makes train_ldm.py run this recipe
    cache_latents: bool = False  # must stay false: the masked image changes every step
    mask_strokes_weight: float = 1.0
    mask_boxes_weight: float = 1.0
    mask_ellipses_weight: float = 0.5
    mask_outpaint_weight: float = 0.5
    mask_full_probability: float = 0.25  # the whole image: plain text-to-image, so that ability stays

    def validate(self) -> None:
        """Fill the frozen stages in from `init_from`, then the LDM checks."""
        if not self.inpainting:
            raise UserError("inpainting=false in an inpainting config: remove it, or train text-to-image with "
                            "configs/ldm/<preset>.yaml")
        if not self.init_from:
            raise UserError("init_from is required: the text-to-image model folder to fine-tune (init_from=DIR)")
        if self.cache_latents:
            raise UserError("cache_latents=true cannot be used for inpainting: the masked image's latents change "
                            "with every step's mask (leave it false)")
        super().validate()

    def resolve_init(self) -> Path:
        """A text-to-image model to widen, or with lora=true also an inpainting model to adapt."""
        init = resolve_model_path(self.init_from)
        check_model_folder(init)
        if read_model_index(init).get("_class_name") == "StableDiffusionInpaintPipeline":
            if not self.lora:
                raise UserError(f"init_from {init} is already an inpainting model: add lora=true to adapt it with a "
                                "LoRA, or fine-tune from its text-to-image model")
            return init
        return super().resolve_init()

    def mask_generator(self, size: int) -> MaskGenerator:
        return MaskGenerator(size, {"strokes": self.mask_strokes_weight, "boxes": self.mask_boxes_weight,
                                    "ellipses": self.mask_ellipses_weight, "outpaint": self.mask_outpaint_weight},
                             self.mask_full_probability)


class InpaintTrainer(LDMTrainer):
    """The inpainting hooks on the latent diffusion recipe: the widened U-Net and its extra inputs."""

    name = "inpaint"
    pipeline_class = InpaintPipeline

    def build_data(self) -> tuple[torch.utils.data.Dataset, Callable]:
        dataset, collate = super().build_data()
        self.masks = self.config.mask_generator(self.resolution)
        rows = (dataset[i] for i in range(min(len(self.config.sample_prompts), len(dataset))))
        self.sample_rows = [r for r in rows if r is not None]  # the sample grid's inputs
        return dataset, collate

    def initial_unet(self) -> UNet2DConditionModel:
        """init_from's text-to-image U-Net widened to 9 input channels, or (a LoRA on an inpainting model) as is."""
        unet = self.load_init_unet()
        if unet.config.in_channels == 2 * self.vae.config.latent_channels + 1:
            return unet  # an inpainting model to adapt (the config allows it with lora=true only)
        return inpainting_unet_from(unet, self.vae.config.latent_channels)

    def draw_masks(self, count: int) -> torch.Tensor:
        """(count, 1, H, W) masks, one seed per image drawn from torch's RNG (so resume replays them)."""
        seeds = torch.randint(0, 2**62, (count,)).tolist()
        return torch.from_numpy(np.stack([self.masks(np.random.default_rng(s)) for s in seeds]))[:, None]

    @torch.no_grad()
    def extra_inputs(self, batch: dict, latents: torch.Tensor) -> torch.Tensor:
        """[mask at latent size, latents of the masked image]: the contract of ldm/inpainting.py."""
        pixels = batch["pixel_values"].to(latents.device)
        masks = self.draw_masks(len(pixels)).to(pixels.device)
        return unet_conditioning(mask_at_latent_size(masks, tuple(latents.shape[-2:])),
                                 encode_masked_image(self.vae, pixels, masks))

    def make_samples(self) -> tuple[str, Image.Image]:
        """Per sample prompt, a training image with a fixed mask: masked input (grey hole) above the output."""
        pipe = self.inference_pipeline()
        rng = np.random.default_rng(self.config.sample_seed)
        generator = MaskGenerator(self.resolution, self.masks.weights, full_probability=0.0)
        inputs, outputs = [], []
        for i, prompt in enumerate(self.config.sample_prompts):
            row = self.sample_rows[i % len(self.sample_rows)]
            image = tensor_to_pil(row["pixel_values"][None])[0]
            mask = Image.fromarray((generator(rng) * 255).astype(np.uint8))
            inputs.append(grey_hole_image(image, mask))
            outputs += pipe.generate(prompt, image=image, mask=mask, seed=self.config.sample_seed,
                                     num_inference_steps=self.config.sample_num_inference_steps,
                                     guidance_scale=self.config.sample_guidance_scale, progress=False)
        return "inpainting", make_grid(inputs + outputs, columns=len(inputs))


def run(config: InpaintTrainConfig) -> Path:
    """setup -> train -> export -> cleanup."""
    return InpaintTrainer(config).run()
