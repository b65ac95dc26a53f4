"""Latent and text-embedding cache: encode the dataset once with the frozen stages, then train from memory.

Stored per image: the autoencoder posterior's mean and log-variance (so every epoch still draws a fresh latent
sample, exactly as encoding on the fly does) and the ids of its caption variants (one per caption template); per
distinct caption: the text encoder's hidden states. The cache folder is named by a hash of everything that
determines its contents (dataset fingerprint, resolution, autoencoder weights, text encoder weights and max length,
caption templates), so a change to any of them builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from core.data.dataset import ImageCaptionDataset, SkippingCollate
from core.files import atomic_folder
from core.locks import FileLock

logger = logging.getLogger(__name__)


def module_digest(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(data: ImageCaptionDataset, vae: nn.Module, text_encoder: nn.Module) -> str:
    """A hash that changes whenever the data, the autoencoder or the text encoder changes."""
    spec = {
        "version": 2,
        "data": data.ds._fingerprint,
        "rows": len(data),
        "resolution": data.resolution,
        "caption_column": data.caption_column,
        "caption_templates": list(data.templates),
        "vae": module_digest(vae),
        "text_encoder": module_digest(text_encoder),
        "text_max_length": text_encoder.max_length,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


class CachedLatents(torch.utils.data.Dataset):
    """Rows of (posterior mean, posterior log-variance, caption variant ids) with the caption embedding table
    beside."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean, self.logvar = tensors["latent_mean"], tensors["latent_logvar"]
        self.caption_ids, self.indices = tensors["caption_ids"], tensors["indices"]
        self.caption_embeddings, self.empty_embedding = tensors["caption_embeddings"], tensors["empty_embedding"]

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict:
        return {"latent_mean": self.mean[i], "latent_logvar": self.logvar[i], "caption_ids": self.caption_ids[i],
                "index": self.indices[i]}


@torch.no_grad()
def _encode(data: ImageCaptionDataset, vae: nn.Module, text_encoder: nn.Module, batch_size: int,
            device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    collate = SkippingCollate()
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                         generator=torch.Generator())  # leaves the global RNG untouched
    means, logvars, captions, indices = [], [], [], []
    for batch in tqdm(loader, desc="caching latents", unit="batch"):
        if batch is None:
            continue
        posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
        means.append(posterior.mean.cpu())
        logvars.append(posterior.logvar.cpu())
        captions += batch["captions"]
        indices.append(batch["indices"])
    distinct = sorted({caption for variants in captions for caption in variants})
    position = {caption: i for i, caption in enumerate(distinct)}
    embeddings = [text_encoder.encode(distinct[i:i + batch_size]).hidden_states.cpu()
                  for i in range(0, len(distinct), batch_size)]
    tensors = {
        "latent_mean": torch.cat(means), "latent_logvar": torch.cat(logvars),
        "caption_ids": torch.tensor([[position[c] for c in variants] for variants in captions]),
        "indices": torch.cat(indices),
        "caption_embeddings": torch.cat(embeddings),
        "empty_embedding": text_encoder.encode([""]).hidden_states[0].cpu(),
    }
    return tensors, collate.skipped


def _build(folder: Path, data: ImageCaptionDataset, vae: nn.Module, text_encoder: nn.Module, batch_size: int,
           device: torch.device) -> None:
    logger.info("building latent/text cache in %s", folder)
    tensors, skipped = _encode(data, vae, text_encoder, batch_size, device)
    with atomic_folder(folder, what="latent cache") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "cache.safetensors")
        (tmp / "info.json").write_text(json.dumps({"images": len(tensors["latent_mean"]), "skipped": skipped,
                                                   "captions": len(tensors["caption_embeddings"])}))
    if skipped:
        logger.warning("skipped %d undecodable images while caching", skipped)


def load_or_build_cache(accelerator, data: ImageCaptionDataset, vae: nn.Module, text_encoder: nn.Module,
                        cache_dir: str | Path, batch_size: int = 64) -> CachedLatents:
    """The cache for these inputs: loaded if complete on disk, else built by the main process and saved atomically.

    Runs that share a `cache_dir` take turns through a lock per cache entry: a second builder of the same entry
    waits for the first and then loads its result instead of building it again."""
    key = cache_key(data, vae, text_encoder)
    folder = Path(cache_dir) / key
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            with FileLock(Path(cache_dir) / f"{key}.lock", f"latent cache {folder}", wait=float("inf")):
                if not (folder / "cache.safetensors").is_file():
                    _build(folder, data, vae, text_encoder, batch_size, accelerator.device)
        cached = CachedLatents(load_file(folder / "cache.safetensors"))
    logger.info("latent/text cache %s: %d images, %d distinct captions", folder.name, len(cached),
                len(cached.caption_embeddings))
    return cached
