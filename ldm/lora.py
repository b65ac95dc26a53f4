"""LoRA adapters on the latent U-Net: added with peft, saved and loaded in diffusers' format.

Training adds a peft LoRA (`UNet2DConditionModel.add_adapter`) to a frozen base; the export is diffusers'
`pytorch_lora_weights.safetensors` (so `StableDiffusionPipeline.load_lora_weights(dir)` reads it) plus `adapter.json`
with the settings and the base U-Net's fingerprint. Loading goes through diffusers' `load_lora_adapter`. Written by
hand here: only the fingerprint (peft and diffusers do not record which base an adapter was trained on) and the
argument checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError

from core.errors import MissingFileError, UserError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as in diffusers' LoRA scripts
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name: load_lora_weights finds it
ADAPTER_INFO = "adapter.json"  # the base's fingerprint and the settings, beside the weights


def check_lora_settings(rank: int, alpha: float | None, dropout: float, targets: list[str] | tuple[str, ...]) -> None:
    """Checks that need no model: rank, alpha, dropout and the target list's shape."""
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"lora_rank must be a whole number of at least 1, got {rank}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise UserError(f"lora_alpha must be a positive number (or null for lora_rank), got {alpha}")
    if not 0 <= dropout < 1:
        raise UserError(f"lora_dropout must be in [0, 1), got {dropout}")
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise UserError(f"lora_target_modules must be a list of module names, e.g. {list(DEFAULT_TARGETS)}; got "
                        f"{targets!r}")


def _matches(name: str, target: str) -> bool:
    """peft's rule for a plain target name: the module's full name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None, targets: list[str] | tuple[str, ...],
             dropout: float = 0.0) -> None:
    """Freeze `unet` and add a trainable LoRA of `rank` on the Linear / Conv2d modules named by `targets`."""
    from peft import LoraConfig

    check_lora_settings(rank, alpha, dropout, targets)
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    unmatched = [t for t in targets if not any(_matches(name, t) for name in layers)]
    if unmatched:
        endings = sorted({".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else name.split(".")[-1]
                          for name in layers})
        raise UserError(f"lora_target_modules {unmatched} match no Linear or Conv2d module of the U-Net; its layers "
                        f"are named (last parts): {', '.join(endings)}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets),
                                lora_dropout=dropout, init_lora_weights="gaussian"))


def base_fingerprint(unet: UNet2DConditionModel) -> str:
    """SHA-256 of the U-Net's base weights in float32 by name (LoRA weights left out), the same whether the base is
    held in fp16 or fp32 files: what an adapter records and is checked against."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.replace(".base_layer", "").encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def lora_layers(unet: UNet2DConditionModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' key names (without the `unet.` prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return convert_state_dict_to_diffusers({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def write_adapter(folder: Path, unet: UNet2DConditionModel, info: dict, dtype: torch.dtype = torch.float16) -> None:
    """diffusers' LoRA file (weights in `dtype`, peft's config as its metadata) and adapter.json into `folder`."""
    from diffusers import StableDiffusionPipeline

    config = unet.peft_config["default"]
    metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
                "lora_dropout": config.lora_dropout, "use_dora": False, "use_rslora": False}
    layers = {k: v.to(dtype) for k, v in lora_layers(unet).items()}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    record = {**info, "rank": config.r, "alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
              "in_channels": unet.config.in_channels}
    (folder / ADAPTER_INFO).write_text(json.dumps(record, indent=2) + "\n")


def read_adapter_info(folder: Path) -> dict:
    """adapter.json of an adapter folder, with one clear line for a folder that is not one."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"LoRA adapter {folder} is not a folder on disk (an adapter folder holds {WEIGHTS_NAME} "
                               f"and {ADAPTER_INFO})")
    if (folder / "final" / WEIGHTS_NAME).is_file() and not (folder / WEIGHTS_NAME).is_file():
        folder = folder / "final"  # a LoRA run's output_dir
    if not (folder / WEIGHTS_NAME).is_file():
        raise UserError(f"{folder} is not a LoRA adapter folder: {WEIGHTS_NAME} is missing")
    try:
        info = json.loads((folder / ADAPTER_INFO).read_text())
    except FileNotFoundError:
        info = {}  # an adapter from elsewhere (e.g. diffusers' scripts): no base recorded
    except ValueError as err:
        raise UserError(f"{folder / ADAPTER_INFO} is not valid JSON ({err}); re-export the adapter") from None
    return {**info, "folder": str(folder)}


def check_base(info: dict, unet: UNet2DConditionModel, fingerprint: str, model_name: str, force: bool) -> None:
    """Refuse an adapter trained on another base (both named) unless `force`; a text-to-image adapter on an
    inpainting U-Net is refused even with `force` (its layers differ)."""
    folder = info["folder"]
    if info.get("in_channels", unet.config.in_channels) != unet.config.in_channels:
        kinds = {4: "text-to-image"}
        raise UserError(f"LoRA adapter {folder} was trained on a U-Net with {info['in_channels']} input channels "
                        f"({kinds.get(info['in_channels'], 'another kind')}); this model's U-Net takes "
                        f"{unet.config.in_channels} (an inpainting model takes 9): train an adapter on this model")
    check_recorded_base(f"LoRA adapter {folder}", info, fingerprint, model_name, force, "force=True (--force)")


def check_recorded_base(what: str, info: dict, fingerprint: str, model_name: str, force: bool, override: str) -> None:
    """Refuse `what` (an adapter, a ControlNet) recorded as trained on another base U-Net, both named, unless
    `force`; nothing recorded (a file from elsewhere) passes."""
    if force or "base_fingerprint" not in info or info["base_fingerprint"] == fingerprint:
        return
    raise UserError(f"{what} was trained on base {info.get('base_model', '?')} (U-Net {info['base_fingerprint'][:12]}), "
                    f"not on this model {model_name} (U-Net {fingerprint[:12]}); pass {override} to apply it anyway")


def load_adapter(unet: UNet2DConditionModel, folder: str | Path, adapter_name: str) -> None:
    """Load diffusers-format LoRA weights from `folder` into `unet` as `adapter_name` (diffusers + peft)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config`")  # several adapters are meant here
        try:
            unet.load_lora_adapter(str(folder), prefix="unet", adapter_name=adapter_name, weight_name=WEIGHTS_NAME,
                                   use_safetensors=True)
        except (ValueError, RuntimeError, OSError, KeyError, SafetensorError) as err:  # damaged or foreign file
            raise UserError(f"cannot load the LoRA adapter {folder} into this U-Net: {type(err).__name__}: "
                            f"{err}") from err
