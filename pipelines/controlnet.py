"""ControlNet at sampling time (Zhang et al. 2023): diffusers' `ControlNetModel` folders, each with the base it was
trained on recorded (`controlnet.json`, as adapters record theirs), and the U-Net denoiser with their residuals added.

The arithmetic and its order follow diffusers' `StableDiffusionControlNetPipeline` (the control image in [0, 1],
resized to the sample size and repeated over the batch and both guidance branches; several ControlNets' residuals
summed in the order given, as its `MultiControlNetModel` does), so both draw the same pixels.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Callable

import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from safetensors import SafetensorError

from core.errors import MissingFileError, UserError
from ldm.lora import check_recorded_base
from pipelines.arguments import image_input, image_size_of

CONTROLNET_INFO = "controlnet.json"  # {"base_model", "base_fingerprint", "control_type"}


def controlnet_folder(folder: str | Path) -> Path:
    """The folder holding the ControlNet: `folder` itself, or for a ControlNet run's output_dir its final/."""
    folder = Path(folder).expanduser()
    if (folder / "final" / "config.json").is_file() and not (folder / "config.json").is_file():
        return folder / "final"
    return folder


def recorded_info(folder: Path) -> dict:
    """What the ControlNet folder `folder` records about itself (controlnet.json; {} when it has none)."""
    info_file = folder / CONTROLNET_INFO
    try:
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    except ValueError as err:
        raise UserError(f"{info_file} is not valid JSON ({err}); re-export the ControlNet") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_file} is not a JSON object; re-export the ControlNet")
    return info


def recorded_control_type(folder: str | Path) -> str | None:
    """The kind of control map a ControlNet folder records it was trained on (None: nothing recorded)."""
    return recorded_info(controlnet_folder(folder)).get("control_type")


def read_controlnet(folder: str | Path) -> tuple[ControlNetModel, dict]:
    """A ControlNet folder (this project's export, a training run's output_dir, or any diffusers ControlNetModel
    folder) and what it records about its base ({} when nothing is recorded)."""
    folder = controlnet_folder(folder)
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"ControlNet {folder} is not a ControlNet folder on disk (it holds config.json and "
                               "diffusion_pytorch_model.safetensors)")
    try:
        model = ControlNetModel.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(f"cannot load the ControlNet in {folder}: {type(err).__name__}: {err}") from err
    info = recorded_info(folder)
    return model.eval().requires_grad_(False), {**info, "folder": str(folder)}


def write_controlnet(folder: Path, controlnet: ControlNetModel, info: dict) -> None:
    """A diffusers ControlNet folder and `controlnet.json` (the base's name and fingerprint, the control type)."""
    controlnet.save_pretrained(folder, safe_serialization=True)
    (folder / CONTROLNET_INFO).write_text(json.dumps(info, indent=2) + "\n")


def check_controlnet(info: dict, controlnet: ControlNetModel, unet, fingerprint: str, model_name: str,
                     force: bool) -> None:
    """A ControlNet fits the U-Net it steers: the same blocks (always), and the base it was trained on (both
    named; `force` applies it anyway)."""
    folder = info["folder"]
    needed = ("block_out_channels", "cross_attention_dim", "down_block_types", "layers_per_block")
    differs = [k for k in needed if list(_as_list(controlnet.config.get(k))) != list(_as_list(unet.config.get(k)))]
    if differs or controlnet.config.in_channels != unet.config.in_channels:
        raise UserError(f"ControlNet {folder} was made for another U-Net shape ({', '.join(differs) or 'in_channels'} "
                        f"differ from {model_name}'s); train one on this model")
    check_recorded_base(f"ControlNet {folder}", info, fingerprint, model_name, force,
                        "controlnet_force=True (--force)")


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


def control_scales(scale, count: int) -> list[float]:
    """One conditioning scale per ControlNet (one number applies to all); each finite."""
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * count
    if len(scales) != count:
        raise UserError(f"controlnet_conditioning_scale has {len(scales)} values for {count} ControlNets: give one "
                        "per ControlNet (or one number for all)")
    for value in scales:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"controlnet_conditioning_scale must be finite numbers, got {value!r}")
    return [float(v) for v in scales]


def control_images(images, count: int) -> list:
    """The control images, one per ControlNet (a single image for a single ControlNet), each checked."""
    if images is None:
        raise UserError(f"{count} ControlNet(s) loaded: pass control_image=... (a map such as Canny edges: "
                        "ldm.control.control_map(image, 'canny'))")
    listed = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(listed) != count:
        raise UserError(f"got {len(listed)} control images for {count} ControlNets: give one per ControlNet")
    return [image_input(image, "control_image") for image in listed]


def prepare_control_image(processor: VaeImageProcessor, image, height: int, width: int, batch: int,
                          device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The control image in [0, 1], (batch, 3, H, W): resized to the sample size (with a warning when it has
    another size, as diffusers resizes it) and repeated over the batch."""
    size = image_size_of(image)
    if size != (height, width):
        warnings.warn(f"the control image is {size[1]}x{size[0]}; resized to the sample size {width}x{height}",
                      stacklevel=4)
    try:
        pixels = processor.preprocess(image, height=height, width=width).to(torch.float32)
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot read the control image ({err}); pass a PIL image, numpy array or tensor") from err
    if pixels.shape[1] != 3:
        raise UserError(f"the control image has {pixels.shape[1]} channels; a ControlNet takes RGB (3)")
    if pixels.shape[0] != 1:
        raise UserError("pass one control image per ControlNet (num_images makes several samples)")
    return pixels.repeat_interleave(batch, dim=0).to(device, dtype)


def controlled_denoiser(unet_forward: Callable, controlnets: list[ControlNetModel], images: list[torch.Tensor],
                        scales: list[float]) -> Callable:
    """The U-Net as a denoiser (x, t, context) with the ControlNets' residuals added: each ControlNet sees the
    same input and text as the U-Net, its image repeated over the guidance branches."""
    def denoiser(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        down, mid = None, None
        for controlnet, image, scale in zip(controlnets, images, scales):
            cond = image.repeat(x.shape[0] // image.shape[0], 1, 1, 1)  # [image] * 2 with guidance, as diffusers
            d, m = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=cond, conditioning_scale=scale,
                              return_dict=False)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return unet_forward(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample

    return denoiser
