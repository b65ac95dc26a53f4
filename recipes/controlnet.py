"""ControlNet training: `accelerate launch train_ldm.py --config configs/ldm/emoji-64-controlnet-canny.yaml`.

ControlNet (Zhang et al. 2023) on the latent diffusion loop: diffusers' `ControlNetModel` initialised from init_from's
U-Net (its encoder copied, zero convolutions at the joins, so step 0 predicts what the base does), trained with the
base's L_simple while the base stays frozen; its residuals reach the loss through the frozen U-Net. The control map
(ldm/control.py: Canny edges, or a coarse colour layout) is computed from each training image and cached beside its
latents; condition dropout drops the caption only (half of them by default, as the paper does, so the ControlNet
learns to read the map alone). The export is a diffusers ControlNet folder recording its base (pipelines/controlnet.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image
from torch import nn

from core.data.validation import spread
from core.errors import UserError
from core.images import make_grid, tensor_to_pil
from ldm.control import CONTROL_TYPES, control_tensor, controlnet_from_unet
from ldm.lora import base_fingerprint
from ldm.unet import enable_xformers
from pipelines import Pipeline
from pipelines.controlnet import write_controlnet
from pipelines.loading import base_model_name
from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer

logger = logging.getLogger(__name__)


@dataclass
class ControlNetTrainConfig(LDMTrainConfig):
    """A ControlNet run: the LDM settings (data, caches, loop, noise schedule inherited from the base) plus the map."""

    controlnet: bool = True  # what makes train_ldm.py run this recipe
    init_from: str = ""  # the base whose frozen U-Net the ControlNet steers (a text-to-image model folder)
    control_type: str = "canny"  # canny | colour (ldm/control.py)
    cond_drop_prob: float = 0.5  # captions dropped (the map never is): the paper's 50%
    sample_images: int = 4  # held-out images whose maps (and captions, where the data has them) the grid uses

    def validate(self) -> None:
        if not self.controlnet:
            raise UserError("controlnet=false in a ControlNet config: remove it, or train text-to-image with "
                            "configs/ldm/<preset>.yaml")
        if not self.init_from:
            raise UserError("controlnet=true needs a base: add init_from=DIR (a text-to-image model folder, e.g. "
                            "pipelines/default_model)")
        if self.control_type not in CONTROL_TYPES:
            raise UserError(f"unknown control_type '{self.control_type}'; valid: {', '.join(CONTROL_TYPES)}")
        for key, why in (("lora", "a ControlNet trains its own copy of the encoder; a LoRA on the base still works "
                          "with it at sampling time"), ("inpainting", "inpainting bases are not supported"),
                         ("distill", "distil the base, or train the ControlNet on the base"),
                         ("post_hoc_ema", "use ema_decay"), ("instance_data", "DreamBooth trains the U-Net itself")):
            if getattr(self, key):
                raise UserError(f"{key} cannot be combined with controlnet=true: {why}")
        if self.sample_images < 1:
            raise UserError(f"sample_images must be at least 1, got {self.sample_images}")
        super().validate()  # fills the base's settings in
        if self.learned_variance:
            raise UserError(f"init_from {self.init_from} is a learned-variance model; a ControlNet here steers "
                            "fixed-variance text-to-image models only")


class ControlNetTrainer(LDMTrainer):
    """The ControlNet hooks on the LDM trainer: the frozen base, the trained ControlNet, the maps, the export."""

    name = "controlnet"

    def cached_control_type(self) -> str:
        return self.config.control_type

    def build_data(self) -> tuple[torch.utils.data.Dataset, Callable]:
        dataset, collate = super().build_data()
        # held-out images, spread over the split: maps the ControlNet never trains on
        self.sample_rows = [self.validation_rows[i] for i in spread(range(len(self.validation_rows)),
                                                                    self.config.sample_images)]
        if not self.sample_rows:
            raise UserError("the sample grid needs held-out images: the data has no validation split; set "
                            "validation_fraction (e.g. 0.05)")
        self.base_samples: list[Image.Image] | None = None  # the base without the ControlNet, drawn once
        return dataset, collate

    def build_model(self) -> nn.Module:
        """A ControlNet copied from init_from's U-Net, which is kept frozen beside it (outside the optimiser, the
        EMA and the checkpoints)."""
        config = self.config
        unet = self.load_init_unet()
        if unet.config.time_cond_proj_dim is not None:
            raise UserError(f"init_from {config.init_from} is a consistency student; train the ControlNet on the "
                            "model it was distilled from")
        self.base_fingerprint = base_fingerprint(unet)
        controlnet = controlnet_from_unet(unet, self.factor)
        self.unet: UNet2DConditionModel = unet.to(self.accelerator.device).eval().requires_grad_(False)
        if config.gradient_checkpointing:  # the gradient runs back through the frozen U-Net's decoder too
            controlnet.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()
        if config.attention == "xformers":
            enable_xformers(controlnet)
            enable_xformers(self.unet)
        return controlnet

    def build_extras(self) -> None:
        """compute_loss calls `unet_forward` as the model being trained: here the (DDP-wrapped) ControlNet; the
        frozen U-Net it steers is `base_forward`."""
        self.unet_forward = self.model
        self.base_forward = torch.compile(self.unet) if self.config.compile else self.unet

    def extra_inputs(self, batch: dict, latents: torch.Tensor) -> torch.Tensor:
        """The control maps in [0, 1] (B, 3, H, W): cached as uint8, or computed from the batch's pixels."""
        control = batch["control"] if "control" in batch else control_tensor(batch["pixel_values"],
                                                                             self.config.control_type)
        return control.to(latents.device, torch.float32) / 255

    def denoise(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                extra: torch.Tensor) -> torch.Tensor:
        """The frozen U-Net with the residuals of `model` (the ControlNet) added, as the pipelines run them."""
        down, mid = model(noisy, timesteps, encoder_hidden_states=context, controlnet_cond=extra, return_dict=False)
        with self.accelerator.autocast():  # the mixed precision the prepared ControlNet runs in
            return self.base_forward(noisy, timesteps, encoder_hidden_states=context,
                                     down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    def validation_inputs(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Each held-out row's control map (uint8): the cache's, or computed from its pixels."""
        maps = [r["control"] if "control" in r else control_tensor(r["pixel_values"][None],
                                                                    self.config.control_type)[0] for r in rows]
        return {"control": torch.stack(maps).to(self.accelerator.device)}

    def sample_inputs(self) -> tuple[list[Image.Image], list[str], list[Image.Image]]:
        """(control maps, prompts, source images) of the sample grid: held-out rows with their first caption, or
        (cached rows, which keep no text) the configured sample prompts in turn."""
        maps, prompts, sources = [], [], []
        for i, row in enumerate(self.sample_rows):
            control = self.validation_inputs([row])["control"]
            maps.append(Image.fromarray(control[0].permute(1, 2, 0).cpu().numpy()))
            prompts.append(row["captions"][0] if "captions" in row
                           else self.config.sample_prompts[i % len(self.config.sample_prompts)])
            if "pixel_values" in row:
                sources += tensor_to_pil(row["pixel_values"][None])
        return maps, prompts, sources

    def inference_pipeline(self) -> Pipeline:
        """The frozen base with the EMA ControlNet on the default sampler."""
        pipe = self.sampling_pipeline(self.unet)
        pipe.add_controlnet(self.inference_model(), {"folder": "this run", "control_type": self.config.control_type})
        return pipe

    def make_samples(self) -> tuple[str, Image.Image]:
        """Per held-out image: its source (where the data gives pixels), its control map, the base's sample and the
        controlled sample, same prompt and seed."""
        maps, prompts, sources = self.sample_inputs()
        options = {"num_inference_steps": self.config.sample_num_inference_steps, "progress": False,
                   "guidance_scale": self.config.sample_guidance_scale, "seed": self.config.sample_seed}
        pipe = self.inference_pipeline()
        controlled = [pipe.generate(p, control_image=m, **options)[0] for p, m in zip(prompts, maps)]
        if self.base_samples is None:
            base = self.sampling_pipeline(self.unet)
            self.base_samples = [base.generate(p, **options)[0] for p in prompts]
        return "controlnet", make_grid(sources + maps + self.base_samples + controlled, columns=len(maps))

    def write_export(self, folder: Path) -> None:
        """A diffusers ControlNet folder and controlnet.json (the base's name and fingerprint, the map's kind)."""
        controlnet: ControlNetModel = self.inference_model()
        write_controlnet(folder, controlnet, {"base_model": base_model_name(Path(self.config.init_from)),
                                              "base_fingerprint": self.base_fingerprint,
                                              "control_type": self.config.control_type})


def run(config: ControlNetTrainConfig) -> Path:
    """setup -> train -> export -> cleanup."""
    return ControlNetTrainer(config).run()
