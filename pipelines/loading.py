"""Find, check and load a model folder (diffusers Stable Diffusion layout); write one.

Safe by default: only safetensors weights are read unless the caller passes `allow_pickle=True`; no remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldm.errors import UserError
from ldm.files import atomic_folder

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
COMPONENT_FILES = {
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": (),
    "scheduler": ("scheduler_config.json",),
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def resolve_model_path(model: str | Path | None) -> Path:
    """The model folder for `model`: None = the embedded default, a folder, or a training output_dir (its final/)."""
    if model is None:
        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise UserError("no default model yet: train one with `accelerate launch train_ldm.py --config "
                            "configs/ldm/emoji-64.yaml ...` and pass model=OUTPUT_DIR/final (or --model)")
        return DEFAULT_MODEL_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and (path / "final" / "model_index.json").is_file():
            return path / "final"
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is not a model folder: model_index.json is missing")
        return path
    if path.exists():
        raise UserError(f"model {path} is a file; pass the model folder (the one with model_index.json)")
    raise UserError(f"model '{model}' is not on disk, and models cannot be downloaded here (offline); pass the "
                    "path of a local model folder")


def check_model_folder(path: Path, allow_pickle: bool = False) -> None:
    """Name the first missing file, and refuse pickled weights unless allowed."""
    for component, files in COMPONENT_FILES.items():
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
            raise UserError(f"model folder {path} is missing {component}/{name}")


def read_model_index(path: Path) -> dict:
    return json.loads((path / "model_index.json").read_text())


def save_model_folder(folder: str | Path, vae, text_encoder, unet, scheduler) -> Path:
    """Write a diffusers StableDiffusionPipeline folder (model_index.json + components), atomically."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.model, tokenizer=text_encoder.tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)
