"""Find, check and load a model folder (diffusers Stable Diffusion layout); write one.

Safe by default: only safetensors weights are read unless the caller passes `allow_pickle=True`; no remote code.
A *slim* folder (the embedded default) leaves out `text_encoder/` and `tokenizer/` and names an installed text
encoder in `text_encoder.json` instead (the MiniLM package, not a second copy); its `checksums.json` holds the
SHA-256 of every weight file, checked at load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from core.errors import MissingFileError, UserError
from core.files import atomic_folder
from pipelines.defaults import STEP_SCHEDULES

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_INPAINT_MODEL_DIR = Path(__file__).parent / "default_inpaint_model"  # fine-tuned from the one above
DEFAULT_FAST_MODEL_DIR = Path(__file__).parent / "default_fast_model"  # distilled from it (consistency student)
TEXT_ENCODER_REFERENCE = "text_encoder.json"
CHECKSUMS = "checksums.json"
COMPONENT_FILES = {
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": (),
    "scheduler": ("scheduler_config.json",),
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# the configs that change what a model draws: checksummed with the weights in an export
CHECKSUMMED_CONFIGS = ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                       TEXT_ENCODER_REFERENCE)


def read_json(path: Path) -> dict:
    """A model folder's JSON file as a dict, or one clear line naming the file when it is not valid JSON."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise MissingFileError(f"model file {path} is missing") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore or re-export the model folder") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} should hold a JSON object, got {type(value).__name__}; restore or re-export it")
    return value


def resolve_model_path(model: str | Path | None, inpainting: bool = False, fast: bool = False) -> Path:
    """The model folder for `model`: None = the embedded default (the inpainting one if `inpainting`, the distilled
    student if `fast`), a folder, or a training output_dir (its final/)."""
    if model is None:
        default = (DEFAULT_INPAINT_MODEL_DIR if inpainting else DEFAULT_FAST_MODEL_DIR if fast
                   else DEFAULT_MODEL_DIR)
        if fast and not (default / "model_index.json").is_file():
            raise MissingFileError("no consistency-distilled default is shipped with this release (the first student "
                                   "missed its 4-step quality target: docs/distillation.md); distil one with "
                                   "`train_ldm.py --config configs/ldm/emoji-64-lcm.yaml` and pass its folder "
                                   "(model=DIR, --model DIR)")
        if not (default / "model_index.json").is_file():
            raise MissingFileError(f"the embedded default model is missing ({default}/model_index.json); restore it "
                                   f"with `git checkout -- pipelines/{default.name}` (or reinstall the package), or "
                                   "pass a model folder (--model)")
        return default
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and (path / "final" / "model_index.json").is_file():
            return path / "final"
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is not a model folder: model_index.json is missing")
        return path
    if path.exists():
        raise UserError(f"model {path} is a file; pass the model folder (the one with model_index.json)")
    raise MissingFileError(f"model '{model}' is not on disk, and models cannot be downloaded here (offline); pass the "
                    "path of a local model folder")


def base_model_name(path: Path) -> str:
    """How a model folder is named in messages and adapter records: `default` for the embedded ones, else its path."""
    for name, folder in (("default", DEFAULT_MODEL_DIR), ("default inpainting", DEFAULT_INPAINT_MODEL_DIR),
                         ("default fast", DEFAULT_FAST_MODEL_DIR)):
        if Path(path).resolve() == folder.resolve():
            return name
    return str(path)


def check_model_folder(path: Path, allow_pickle: bool = False) -> None:
    """Name the first missing file or malformed index, refuse pickled weights unless allowed, and check the recorded
    checksums."""
    read_model_index(path)
    slim = (path / TEXT_ENCODER_REFERENCE).is_file()
    for component, files in COMPONENT_FILES.items():
        if slim and component in ("text_encoder", "tokenizer"):
            continue
        folder = path / component
        if not folder.is_dir():
            raise UserError(f"model folder {path} is missing the component folder {component}/")
        for name in files:
            if (folder / name).is_file():
                continue
            if name.endswith(".safetensors") and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
                if allow_pickle:
                    continue
                raise UserError(f"{folder} holds only pickled weights, which can run code when loaded; convert them "
                                "to safetensors, or pass allow_pickle=True if you trust the file")
            raise MissingFileError(f"model folder {path} is missing {component}/{name}")
    if (path / CHECKSUMS).is_file():
        verify_checksums(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(path: Path) -> None:
    """Every file listed in checksums.json exists and has its SHA-256; the error names the file and the fix."""
    defaults = {folder.resolve(): folder.name for folder in (DEFAULT_MODEL_DIR, DEFAULT_INPAINT_MODEL_DIR)}
    restore = (f"restore it with `git checkout -- pipelines/{defaults[path.resolve()]}` (or reinstall the package)"
               if path.resolve() in defaults else "re-export the model folder")
    for name, expected in read_json(path / CHECKSUMS).items():
        file = path / name
        if not file.is_file():
            raise MissingFileError(f"model file {file} is missing; {restore}")
        if file_sha256(file) != expected:
            raise UserError(f"model file {file} is corrupted (SHA-256 differs from {CHECKSUMS}); {restore}")


SAMPLING_DEFAULTS = "sampling.json"  # a model folder's own sampling settings (optional)
SAMPLING_KEYS = ("num_inference_steps", "guidance_scale", "guidance_interval", "step_schedule")


def read_sampling_defaults(path: Path) -> dict:
    """The sampling settings a model folder ships as its own (`sampling.json`: num_inference_steps,
    guidance_scale, guidance_interval [sigma_lo, sigma_hi] or null, step_schedule "karras" / "ays" / null: where its
    own scheduler's steps fall), {} without the file. They replace the library
    defaults (pipelines/defaults.py) for this model; the pipeline checks the values as it checks arguments."""
    file = path / SAMPLING_DEFAULTS
    if not file.is_file():
        return {}
    values = read_json(file)
    unknown = sorted(set(values) - set(SAMPLING_KEYS))
    if unknown:
        raise UserError(f"{file} has unknown keys {unknown}; valid: {', '.join(SAMPLING_KEYS)}")
    steps = values.get("num_inference_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(f"{file}: num_inference_steps must be a whole number >= 1, got {steps!r}")
    scale = values.get("guidance_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0):
        raise UserError(f"{file}: guidance_scale must be a number >= 0, got {scale!r}")
    interval = values.get("guidance_interval")
    if interval is not None and (not isinstance(interval, list) or len(interval) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)):
        raise UserError(f"{file}: guidance_interval must be [sigma_lo, sigma_hi] or null, got {interval!r}")
    if values.get("step_schedule") not in (None, *STEP_SCHEDULES):
        raise UserError(f"{file}: step_schedule must be one of {', '.join(STEP_SCHEDULES)} or null, got "
                        f"{values['step_schedule']!r}")
    return {k: tuple(v) if k == "guidance_interval" and v is not None else v for k, v in values.items()}


def write_sampling_defaults(folder: Path, sampling: dict | None) -> None:
    """sampling.json in `folder` when the model has its own sampling settings (the inverse of
    `read_sampling_defaults`)."""
    if sampling:
        written = {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()}
        (folder / SAMPLING_DEFAULTS).write_text(json.dumps(written, indent=2) + "\n")


def read_text_encoder_reference(path: Path) -> dict | None:
    """The installed text encoder a slim folder names ({"name", "max_length"}), or None for a full folder."""
    file = path / TEXT_ENCODER_REFERENCE
    if not file.is_file():
        return None
    reference = read_json(file)
    if not isinstance(reference.get("name"), str) or not isinstance(reference.get("max_length"), int):
        raise UserError(f"{file} must name the text encoder and its max_length, e.g. "
                        '{"name": "minilm", "max_length": 77}')
    return reference


def text_encoder_spec(path: Path) -> tuple[str, int]:
    """(name or folder, padding length) of a model folder's text encoder: the installed one a slim folder names, or
    the folder's own `text_encoder/` with the length its tokenizer was trained with."""
    reference = read_text_encoder_reference(path)
    if reference is not None:
        return reference["name"], reference["max_length"]
    config_file = path / "tokenizer" / "tokenizer_config.json"
    if not config_file.is_file():
        raise MissingFileError(f"model folder {path} is missing tokenizer/tokenizer_config.json")
    length = read_json(config_file).get("model_max_length")
    if not isinstance(length, int) or length > 4096:
        raise UserError(f"{config_file} has no usable model_max_length (the training padding length)")
    return str(path), length


def is_model_folder(path: Path) -> bool:
    """A model folder this project (or diffusers) wrote, which an export may replace: model_index.json at the top and
    no training run in it."""
    return (path / "model_index.json").is_file() and not (path / "checkpoints").exists()


def save_slim_model_folder(folder: str | Path, vae, unet, scheduler, text_encoder_name: str, max_length: int,
                           dtype: torch.dtype = torch.float16, overwrite: bool = False,
                           training_config: Path | None = None, sampling: dict | None = None) -> Path:
    """The embedded-default layout: model_index.json, unet/, vae/, scheduler/ (weights in `dtype`), the text
    encoder named in text_encoder.json, the model's own sampling settings (sampling.json) if any, the run's
    config.yaml if given, and checksums.json over the weight files and the configs that change what it draws.
    An existing model folder is replaced only with `overwrite`; any other existing folder is refused."""
    import copy
    import shutil

    with atomic_folder(folder, overwrite, is_model_folder, "model folder") as tmp:
        for name, module in (("unet", unet), ("vae", vae)):
            copy.deepcopy(module).to(dtype).save_pretrained(tmp / name, safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        index = {"_class_name": diffusers_pipeline_class(unet, vae).__name__,
                 "unet": ["diffusers", type(unet).__name__],
                 "vae": ["diffusers", type(vae).__name__], "scheduler": ["diffusers", type(scheduler).__name__]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / TEXT_ENCODER_REFERENCE).write_text(json.dumps({"name": text_encoder_name,
                                                               "max_length": max_length}, indent=2) + "\n")
        write_sampling_defaults(tmp, sampling)
        covered = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*.safetensors")) + list(CHECKSUMMED_CONFIGS)
        covered += [SAMPLING_DEFAULTS] if sampling else []
        (tmp / CHECKSUMS).write_text(json.dumps({f: file_sha256(tmp / f) for f in covered}, indent=2) + "\n")
        if training_config is not None:
            shutil.copy(training_config, tmp / "config.yaml")
    return Path(folder)


def read_model_index(path: Path) -> dict:
    return read_json(path / "model_index.json")


def diffusers_pipeline_class(unet, vae) -> type:
    """The diffusers pipeline a folder is saved as, by the kind of U-Net: text-to-image (input = the latent) or
    inpainting (latent + mask + masked-image latent, the 9-channel layout of Stable Diffusion inpainting)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    latent = vae.config.latent_channels
    kinds = {latent: StableDiffusionPipeline, 2 * latent + 1: StableDiffusionInpaintPipeline}
    if unet.config.in_channels not in kinds:
        raise UserError(f"the U-Net takes {unet.config.in_channels} input channels; a model for this autoencoder "
                        f"({latent} latent channels) takes {latent} (text-to-image) or {2 * latent + 1} (inpainting)")
    return kinds[unet.config.in_channels]


def write_model_folder(folder: Path, vae, text_encoder, unet, scheduler) -> None:
    """Write a complete diffusers pipeline folder (model_index.json + components) into an existing `folder`."""
    pipe = diffusers_pipeline_class(unet, vae)(
        vae=vae, text_encoder=text_encoder.model, tokenizer=text_encoder.tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def save_model_folder(folder: str | Path, vae, text_encoder, unet, scheduler, overwrite: bool = False,
                      sampling: dict | None = None) -> Path:
    """`write_model_folder` (and the model's own sampling settings), atomically: a reader never sees a half-written
    folder. An existing model folder is replaced only with `overwrite`; any other existing folder is refused, never
    deleted."""
    with atomic_folder(folder, overwrite, is_model_folder, "model folder") as tmp:
        write_model_folder(tmp, vae, text_encoder, unet, scheduler)
        write_sampling_defaults(tmp, sampling)
    return Path(folder)
