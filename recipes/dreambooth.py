"""DreamBooth data (Ruiz et al. 2023): a few images of one subject, all captioned with an instance prompt that names
it by a rare identifier ("a sks dog"), and, for prior preservation, images of its class drawn once by the base model
and trained beside them so the class keeps its old look (loss = instance + prior_loss_weight x prior, as in
diffusers' DreamBooth scripts). Used by recipes/latent_diffusion.py when `instance_data` is set; the U-Net side
(LoRA or a full fine-tune) is unchanged. Written by hand: diffusers ships this only as example scripts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from core.data.dataset import pil_to_tensor, resize_center_crop, to_rgb
from core.errors import MissingFileError, UserError
from core.files import atomic_write
from pipelines.loading import file_sha256

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CLASS_RECORD = "drawn_with.json"  # the prompts, base and settings a class_data_dir's images were drawn with


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


def model_fingerprint(model: Path) -> str:
    """SHA-256 over a model folder's weights and configs (names and contents): what class images were drawn with."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(f"{path.relative_to(model)}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()


def class_images(folder: Path, prompts: list[str], count: int, make_pipeline, drawing: dict, rank: int = 0,
                 world: int = 1, batch_size: int = 8, poll: float = 2.0) -> list[Path]:
    """`count` images of the class prompts (image i: prompts[i % len], seed drawing["seed"] + i) in `folder`, drawn
    by the base model with `drawing` (its fingerprint and the sampling settings: num_inference_steps,
    guidance_scale, seed), recorded in CLASS_RECORD; images of another base, other settings or other prompts are
    refused. Rank r of `world` draws images r, r + world, ... not there yet (a killed run goes on where it stopped),
    then waits for the others' by polling the folder (a draw can outlast the collective timeout)."""
    folder.mkdir(parents=True, exist_ok=True)
    record_file = folder / CLASS_RECORD
    record = {"prompts": prompts, **drawing}
    if (not record_file.is_file() and any(folder.glob("class-*.png"))) or (folder / "prompts.json").is_file():
        raise UserError(f"class_data_dir {folder} holds class images drawn before their base and settings were "
                        f"recorded ({CLASS_RECORD} is missing); choose another class_data_dir, or delete that folder "
                        "to draw them again")
    if record_file.is_file():
        found = json.loads(record_file.read_text())
        if found != record:
            differs = sorted(k for k in record if not isinstance(found, dict) or found.get(k) != record[k])
            raise UserError(f"class_data_dir {folder} holds class images drawn with another {', '.join(differs)} "
                            f"({record_file}); choose another class_data_dir, or delete that folder to draw them again")
    else:
        atomic_write(record_file, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    paths = [folder / f"class-{i:05d}.png" for i in range(count)]
    missing = [i for i in range(rank, count, world) if not paths[i].is_file()]
    if missing:
        pipe = make_pipeline()
        logger.info("drawing %d class images with the base model into %s", len(missing), folder)
        for start in tqdm(range(0, len(missing), batch_size), desc="class images", unit="batch"):
            for i in missing[start:start + batch_size]:  # one call per image: its own seed, as on a rerun
                image = pipe.generate(prompts[i % len(prompts)], num_inference_steps=drawing["num_inference_steps"],
                                      guidance_scale=drawing["guidance_scale"], seed=drawing["seed"] + i,
                                      progress=False)[0]
                atomic_write(paths[i], lambda tmp: image.save(tmp, format="PNG"))
    waiting = [p for p in paths if not p.is_file()]
    if waiting:
        logger.info("waiting for %d class images from the other ranks in %s (every rank must see this folder)",
                    len(waiting), folder)
    while waiting := [p for p in paths if not p.is_file()]:
        time.sleep(poll)
    return paths


def without_instance_images(rows: list[dict], instance: list[torch.Tensor], tolerance: float = 2 / 255) -> list[dict]:
    """Validation rows less those showing an instance image (the same picture at the training resolution, within
    `tolerance` mean absolute difference on the [0, 1] scale, so a re-saved or re-encoded copy counts): a validation
    loss on the images being trained on would measure memorisation, not generalisation."""
    if not instance:
        return rows
    stacked = torch.stack(instance).float()

    def shows_an_instance(row: dict) -> bool:
        return bool(((stacked - row["pixel_values"].float()).abs().flatten(1).mean(1) / 2 < tolerance).any())

    kept = [row for row in rows if not shows_an_instance(row)]
    if len(kept) < len(rows):
        logger.info("validation: %d held-out images are instance images, left out", len(rows) - len(kept))
    return kept


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
