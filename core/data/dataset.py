"""Image-caption data for both stages: an imagefolder with `metadata.jsonl`, or a `datasets` dataset by name.

Images are decoded here (not by `datasets`) so that one undecodable file is skipped and counted, not fatal.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.data.buckets import fit_to_bucket
from core.data.tar_patterns import expand_tar_pattern, is_tar_pattern
from core.errors import MissingFileError, UserError

logger = logging.getLogger(__name__)


def check_data_path(data: str) -> None:
    """A local dataset path must exist (offline, a name that is not a folder cannot load unless it is cached)."""
    if is_tar_pattern(data):
        expand_tar_pattern(data)
        return
    path = Path(data).expanduser()
    if (path.exists() and not path.is_dir()) or (not path.exists() and ("/" in data or data.startswith("."))):
        raise MissingFileError(f"dataset folder {data} does not exist (or is not a folder): check the path, or "
                               "build the emoji set with `ldm data emoji --out DIR` and pass data=DIR")


def load_image_caption_dataset(data: str, split: str = "train", image_column: str = "image",
                               caption_column: str = "caption") -> datasets.Dataset:
    """Open one split of `data` (a local folder or a dataset name) and check that its columns are usable."""
    if not data:
        raise UserError("no dataset given: set data=PATH (an imagefolder with metadata.jsonl; `ldm data emoji` "
                        "builds one)")
    check_data_path(data)
    path = Path(data).expanduser()
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:
            loaded = datasets.load_dataset(data)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types for "not found offline"; all mean the same to a user
        raise UserError(f"cannot load dataset '{data}': {type(err).__name__}: {str(err).splitlines()[0][:300]}. "
                        "Without network only local folders and datasets already in the cache load.") from err
    finally:
        datasets.enable_progress_bars()
    ds = split_with_columns(loaded, data, split, image_column, caption_column)
    if len(ds) == 0:
        raise UserError(f"split '{split}' of dataset {data} is empty")
    captions = ds[caption_column]
    if all(not isinstance(c, str) or not c.strip() for c in captions):
        raise UserError(f"caption column '{caption_column}' of {data} is empty: every row needs a text caption")
    return ds


def split_with_columns(loaded, data: str, split: str, image_column: str, caption_column: str):
    """`loaded[split]` (a loaded or streamed dataset) checked for both columns, with images left undecoded (decoded
    by us, so that one bad file is skipped and counted). A stream whose columns are unknown is not checked."""
    if split not in loaded:
        raise UserError(f"dataset {data} has no split '{split}'; it has {', '.join(loaded)}")
    ds = loaded[split]
    if ds.column_names is None:
        return ds
    for column, key in ((image_column, "image_column"), (caption_column, "caption_column")):
        if column not in ds.column_names:
            raise UserError(f"dataset {data} has no column '{column}' (set {key}=...); its columns: "
                            f"{', '.join(ds.column_names)}")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (emoji and icons have transparent backgrounds)."""
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop the centre square."""
    return fit_to_bucket(image, (resolution, resolution)).image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float tensor in [-1, 1]: the pixel range the autoencoder works in."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _decode(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])
    raise TypeError(f"cannot read image value of type {type(value).__name__}")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def format_captions(row: dict, caption_column: str, templates: tuple[str, ...]) -> list[str]:
    """One caption per template, filled from the row's text columns; `{caption}` is the caption column and
    `{article}` its indefinite article ("a" / "an"), e.g. "{article} {caption}" -> "an apple"."""
    caption = row[caption_column] if isinstance(row[caption_column], str) else ""
    fields = {key: value for key, value in row.items() if isinstance(value, str)}
    fields.update(caption=caption, article=_article(caption))
    return [template.format(**fields).strip() for template in templates]


def check_caption_templates(ds: datasets.Dataset, caption_column: str, templates: tuple[str, ...]) -> None:
    """Fail early, naming the field, when a template uses a column the dataset does not have."""
    if not templates:
        raise UserError("caption_templates is empty: give at least one, e.g. ['{caption}']")
    row = {column: ds[0][column] for column in ds.column_names if column != "image"}
    try:
        format_captions(row, caption_column, templates)
    except (KeyError, IndexError, ValueError) as err:
        columns = ", ".join(c for c, v in row.items() if isinstance(v, str))
        raise UserError(f"caption template field {err} is not a text column of the dataset; valid fields: caption, "
                        f"article, {columns}") from err


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Rows of (pixel_values in [-1, 1], caption variants, index); an undecodable image gives None (skipped by
    `collate`). `templates` make the variants ("{caption}" alone = the caption column as is); training picks one
    variant per image and step."""

    def __init__(self, ds: datasets.Dataset, resolution: int, image_column: str = "image",
                 caption_column: str = "caption", templates: tuple[str, ...] = ("{caption}",)) -> None:
        self.ds, self.resolution = ds, resolution
        self.image_column, self.caption_column, self.templates = image_column, caption_column, tuple(templates)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict | None:
        row = self.ds[index]
        try:
            image = _decode(row[self.image_column])
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, TypeError) as err:
            logger.debug("skipping undecodable image %d: %s", index, err)
            return None
        image = resize_center_crop(to_rgb(image), self.resolution)
        return {"pixel_values": pil_to_tensor(image),
                "captions": format_captions(row, self.caption_column, self.templates), "index": index}


class SkippingCollate:
    """Batch the decodable rows and count the skipped ones, in `skipped` and in the batch's own "skipped" entry.

    The training loop counts from the batches it consumes: Accelerate's loader fetches one batch ahead, and loader
    workers hold their own copy of this object, so `skipped` alone would be off after a resume or with workers.
    """

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, rows: list[dict | None]) -> dict | None:
        good = [r for r in rows if r is not None]
        self.skipped += len(rows) - len(good)
        if not good:
            return None
        return {"pixel_values": torch.stack([r["pixel_values"] for r in good]),
                "captions": [r["captions"] for r in good],
                "indices": torch.tensor([r["index"] for r in good]),
                "skipped": len(rows) - len(good)}
