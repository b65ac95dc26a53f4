"""DreamBooth data (Ruiz et al. 2023): a few images of one subject, all captioned with an instance prompt that names
it by a rare identifier ("a sks dog"), and, for prior preservation, images of its class drawn once by the base model
and trained beside them so the class keeps its old look (loss = instance + prior_loss_weight x prior, as in
diffusers' DreamBooth scripts). Used by recipes/latent_diffusion.py when `instance_data` is set; the U-Net side
(LoRA or a full fine-tune) is unchanged. Written by hand: diffusers ships this only as example scripts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from core.data.dataset import pil_to_tensor, resize_center_crop, to_rgb
from core.errors import MissingFileError, UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
PROMPTS_FILE = "prompts.json"  # which prompts a class_data_dir's images were drawn from


def image_files(folder: str | Path, what: str) -> list[Path]:
    """The image files of `folder` (sorted), or one clear line when there is no such folder or no image in it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"{what} {folder} is not a folder on disk")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files and what == "instance_data":
        raise UserError(f"instance_data {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image file as training pixels; an undecodable file is an error naming it (never skipped silently: with a
    handful of images each one matters)."""
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_tensor(resize_center_crop(to_rgb(image), resolution))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"image {path} does not decode ({type(err).__name__}: {err}); remove or replace it") from None


def class_images(folder: Path, prompts: list[str], count: int, make_pipeline, steps: int, guidance: float,
                 seed: int, batch_size: int = 8) -> list[Path]:
    """`count` images of the class prompts (image i: prompts[i % len], seed + i) in `folder`, drawing only those not
    there yet (so a killed run goes on where it stopped). `make_pipeline()` loads the base model when needed."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / PROMPTS_FILE
    if record.is_file() and json.loads(record.read_text()) != prompts:
        raise UserError(f"class_data_dir {folder} holds images of other class prompts ({record}); choose another "
                        "class_data_dir, or delete that folder to draw them again")
    record.write_text(json.dumps(prompts, indent=2) + "\n")
    paths = [folder / f"class-{i:05d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        pipe = make_pipeline()
        logger.info("drawing %d class images with the base model into %s", len(missing), folder)
        for start in tqdm(range(0, len(missing), batch_size), desc="class images", unit="batch"):
            for i in missing[start:start + batch_size]:  # one call per image: its own seed, as on a rerun
                image = pipe.generate(prompts[i % len(prompts)], num_inference_steps=steps, guidance_scale=guidance,
                                      seed=seed + i, progress=False)[0]
                tmp = paths[i].with_name(f".{paths[i].name}.tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, paths[i])
    return paths


class DreamBoothDataset(torch.utils.data.Dataset):
    """Item i: instance image i (cycled) with the instance prompt and, with prior preservation, class image i
    (cycled) with its prompt. At least `min_length` items, so a handful of images still fills whole batches."""

    def __init__(self, instance: list[torch.Tensor], instance_prompt: str, class_paths: list[Path],
                 class_prompts: list[str], resolution: int, min_length: int) -> None:
        self.instance, self.instance_prompt = instance, instance_prompt
        self.class_paths, self.class_prompts, self.resolution = class_paths, class_prompts, resolution
        self.length = max(len(instance), len(class_paths), min_length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        row = {"pixel_values": self.instance[i % len(self.instance)], "captions": [self.instance_prompt], "index": i}
        if self.class_paths:
            j = i % len(self.class_paths)
            row.update(class_pixel_values=load_image(self.class_paths[j], self.resolution),
                       class_captions=[self.class_prompts[j % len(self.class_prompts)]])
        return row


def dreambooth_collate(rows: list[dict]) -> dict:
    """Instance rows, then their class rows (when there are any), in one batch; `prior` marks the class half."""
    pixels = [r["pixel_values"] for r in rows]
    captions = [r["captions"] for r in rows]
    if "class_pixel_values" in rows[0]:
        pixels += [r["class_pixel_values"] for r in rows]
        captions += [r["class_captions"] for r in rows]
    prior = torch.arange(len(pixels)) >= len(rows)
    return {"pixel_values": torch.stack(pixels), "captions": captions, "prior": prior,
            "indices": torch.tensor([r["index"] for r in rows])}


def prior_weights(prior: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """Per-image loss multipliers so that the batch mean is mean(instance) + w x mean(prior) (equal halves)."""
    if not prior.any():
        return torch.ones(prior.shape)
    return torch.where(prior, 2.0 * prior_loss_weight, 2.0)
