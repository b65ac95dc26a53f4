"""Real images for the evaluations: their Inception features (cached on disk, keyed by data, rows and resolution),
the seeded disjoint real sets that FID and alignment compare against, and feature distances."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.data.dataset import ImageCaptionDataset, SkippingCollate, load_image_caption_dataset
from core.errors import UserError
from core.files import atomic_write
from evaluation.fid import inception_features


@dataclass
class RealImages:
    """A set of real images: their Inception features and labels (caption, name, category)."""

    features: np.ndarray
    captions: list[str]
    names: list[str]
    categories: list[str]

    def take(self, count: int) -> "RealImages":
        return RealImages(self.features[:count], self.captions[:count], self.names[:count], self.categories[:count])


def seeded_held_out_images(data: str, split: str, num_images: int, size: int,
                           seed: int) -> tuple[torch.Tensor, list[str]]:
    """A seeded choice of at most `num_images` images of `split` at `size` px, (N, 3, size, size) in [-1, 1], with
    each one's first caption (undecodable ones left out): what `ldm eval inpaint` and `ldm eval control` draw from."""
    ds = load_image_caption_dataset(data, split)
    count = min(num_images, len(ds))
    if count < 2:
        raise UserError("FID needs at least 2 images")
    rows = np.random.default_rng(seed).permutation(len(ds))[:count].tolist()
    loader = torch.utils.data.DataLoader(ImageCaptionDataset(ds.select(rows), size), batch_size=64,
                                         collate_fn=SkippingCollate())
    batches = [b for b in loader if b is not None]
    originals = torch.cat([b["pixel_values"] for b in batches])
    return originals, [variants[0] for b in batches for variants in b["captions"]]


def _column(ds, column: str, fallback: list[str]) -> list[str]:
    return list(ds[column]) if column in ds.column_names else fallback


def load_real_images(ds, split: str, indices: list[int], resolution: int, network, cache_file: Path) -> RealImages:
    """Inception features of the given rows of a split, resized to `resolution` (cached in `cache_file`, keyed by
    data, rows and resolution)."""
    rows = ds.select(indices)
    captions = list(rows["caption"])
    names = _column(rows, "name", captions)
    categories = _column(rows, "category", ["?"] * len(rows))
    key = f"{ds._fingerprint}:{split}:{resolution}:{','.join(map(str, indices))}"
    if cache_file.is_file():
        cached = np.load(cache_file, allow_pickle=False)
        if str(cached["key"]) == key:
            return RealImages(cached["features"], captions, names, categories)
    images = ImageCaptionDataset(rows, resolution)
    loader = torch.utils.data.DataLoader(images, batch_size=64, collate_fn=SkippingCollate())
    pixels = torch.cat([batch["pixel_values"] for batch in tqdm(loader, desc=f"real {split} images", unit="batch")])
    if len(pixels) != len(indices):
        raise UserError(f"{len(indices) - len(pixels)} images of split '{split}' could not be decoded")
    features = features_with_progress(network, pixels, f"Inception, real {split}")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:  # a file handle: np.savez would add ".npz" to the temporary name
        with open(tmp, "wb") as handle:
            np.savez(handle, features=features, key=np.array(key))

    atomic_write(cache_file, write)  # evals sharing a --cache-dir never read half a file
    return RealImages(features, captions, names, categories)


def training_real_sets(train, num_images: int, seed: int, size: int, network, cache: Path,
                       notes: list[str]) -> tuple[RealImages, RealImages, list[int]]:
    """Two disjoint seeded random sets of N training images (the first for prompts or labels, the second for the
    real-vs-real FID), N capped at half the split with a note; also the seeded order of the split's rows."""
    if 2 * num_images > len(train):
        notes.append(f"N capped at {len(train) // 2}: the training split has {len(train)} images and two disjoint "
                     f"sets of N are needed (N={num_images} asked)")
        num_images = len(train) // 2
    order = np.random.default_rng(seed).permutation(len(train)).tolist()
    first = load_real_images(train, "train", order[:num_images], size, network, cache / f"train_a_{num_images}.npz")
    second = load_real_images(train, "train", order[num_images:2 * num_images], size, network,
                              cache / f"train_b_{num_images}.npz")
    return first, second, order


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances between feature rows."""
    return (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T


def features_with_progress(network, images: torch.Tensor, desc: str, batch_size: int = 32) -> np.ndarray:
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    return np.concatenate([inception_features(network, chunk, batch_size) for chunk in tqdm(chunks, desc=desc,
                                                                                            unit="batch")])
