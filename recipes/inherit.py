"""What a fine-tune inherits from its base model folder (`init_from`): the settings the base was trained with.

A LoRA, DreamBooth, inpainting or distillation run that starts from a model must see the text states, noise levels
and prediction target the base was trained on; a config default (77 tokens, say, for a base trained at 32) would
silently train it off its distribution. These settings are read from the folder itself (text_encoder.json or the
tokenizer, the scheduler config, the U-Net's output channels), never from the config's defaults.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from autoencoder.model import encodes_identically, load_autoencoder
from core.errors import UserError
from ldm.diffusion import NoiseSchedule
from ldm.text_encoders import DEFAULT_MAX_LENGTH, DEFAULT_TEXT_ENCODER
from pipelines.loading import TEXT_ENCODER_REFERENCE, read_json, text_encoder_spec

SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                 "zero_terminal_snr", "learned_variance")
# every setting a model folder fixes, and its value for a model trained from scratch when the config leaves it unset
SCRATCH_DEFAULTS: dict[str, Any] = {"text_encoder": DEFAULT_TEXT_ENCODER, "text_max_length": DEFAULT_MAX_LENGTH,
                                    **{key: getattr(NoiseSchedule, key) for key in SCHEDULE_KEYS}}


def base_settings(init: Path) -> dict[str, Any]:
    """The SCRATCH_DEFAULTS keys as `init`'s folder fixes them: its text encoder and padding length, its noise
    schedule and prediction type (scheduler/scheduler_config.json), and whether its U-Net predicts a variance."""
    folder_name, length = text_encoder_spec(init)
    name = trained_text_encoder(init) or folder_name
    try:
        schedule = NoiseSchedule.from_scheduler_config(read_json(init / "scheduler" / "scheduler_config.json"))
    except ValueError as err:
        raise UserError(f"init_from {init}: {err}") from err
    unet, vae = read_json(init / "unet" / "config.json"), read_json(init / "vae" / "config.json")
    settings = {"text_encoder": name, "text_max_length": length,
                **{key: getattr(schedule, key) for key in SCHEDULE_KEYS}}
    settings["learned_variance"] = unet.get("out_channels") == 2 * vae.get("latent_channels", 4)
    return settings


def trained_text_encoder(init: Path) -> str | None:
    """The installed text encoder (minilm, openclip:...) a training export's config.yaml names: its `text_encoder/`
    is a copy of it, so a fine-tune records that name rather than the base folder's path (which a later export would
    then depend on). None for other folders, and for an encoder named by a folder path."""
    if not (init / "config.yaml").is_file() or (init / TEXT_ENCODER_REFERENCE).is_file():
        return None
    trained = yaml.safe_load((init / "config.yaml").read_text())
    name = trained.get("text_encoder") if isinstance(trained, dict) else None
    installed = isinstance(name, str) and (name == DEFAULT_TEXT_ENCODER or name.startswith("openclip:"))
    return name if installed else None


def same_setting(key: str, given: Any, fixed: Any, init: Path) -> bool:
    """Equal, floats to 1e-6 relative (a YAML round trip of a beta is not bit-exact); a full folder's text encoder
    is also named by its own path."""
    if isinstance(given, float) or isinstance(fixed, float):
        return math.isclose(float(given), float(fixed), rel_tol=1e-6)
    if key == "text_encoder" and given == text_encoder_spec(init)[0]:
        return True
    return given == fixed


def inherit_settings(config: Any, init: Path) -> None:
    """Set `config`'s unset base settings (None or "") from `init`; one set differently is refused naming both."""
    for key, fixed in base_settings(init).items():
        given = getattr(config, key)
        if given is None or given == "":
            setattr(config, key, fixed)
        elif not same_setting(key, given, fixed, init):
            raise UserError(f"{key}={given} differs from init_from {init}, which was trained with {key}={fixed}: a "
                            f"fine-tune keeps what its base decided; remove {key} from the config")


def fill_scratch_defaults(config: Any) -> None:
    """From scratch: the settings a base would fix, at their defaults where the config leaves them unset."""
    for key, default in SCRATCH_DEFAULTS.items():
        if getattr(config, key) is None or getattr(config, key) == "":
            setattr(config, key, default)


def check_same_latent_space(autoencoder: str | Path, init: Path) -> None:
    """An autoencoder given beside init_from must encode as the base's vae/ does (same encoder and latent scaling
    factor; a decoder-only fine-tune passes): the base's U-Net only knows that latent space."""
    if Path(autoencoder).resolve() == (init / "vae").resolve():
        return
    ours, base = load_autoencoder(autoencoder), load_autoencoder(init / "vae")
    if not encodes_identically(ours, base):
        raise UserError(f"autoencoder {autoencoder} (scaling_factor {ours.config.scaling_factor:g}) does not encode "
                        f"as init_from {init}'s vae/ (scaling_factor {base.config.scaling_factor:g}) does: a fine-tune "
                        "keeps its base's latent space; remove autoencoder= to use the base's")
