"""`ldm eval autoencoder`: PSNR, SSIM and rFID of reconstructions (posterior mode) on a dataset split.

Prints a table, writes `metrics.json` and `reconstructions.png` (originals above reconstructions) to `--out`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from autoencoder.model import load_autoencoder
from core.data.dataset import ImageCaptionDataset, SkippingCollate, load_image_caption_dataset
from core.images import make_grid, tensor_to_pil

logger = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct(vae, data: ImageCaptionDataset, num_images: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    """(originals, reconstructions) in [-1, 1], float32 on the CPU, for the first `num_images` decodable rows."""
    subset = torch.utils.data.Subset(data, range(min(num_images, len(data))))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=SkippingCollate())
    originals, reconstructions = [], []
    for batch in tqdm(loader, desc="reconstructing", unit="batch"):
        if batch is None:
            continue
        images = batch["pixel_values"].to(vae.device)
        originals.append(images.cpu())
        reconstructions.append(vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1).float().cpu())
    return torch.cat(originals), torch.cat(reconstructions)


def evaluate_autoencoder(model: str, data: str, out: str | Path, split: str = "validation", num_images: int = 1000,
                         batch_size: int = 32, resolution: int | None = None, fid: bool = True,
                         image_column: str = "image", caption_column: str = "caption") -> dict:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    vae = load_autoencoder(model).eval()
    resolution = resolution or vae.config.sample_size
    ds = load_image_caption_dataset(data, split, image_column, caption_column)
    originals, reconstructions = reconstruct(vae, ImageCaptionDataset(ds, resolution, image_column, caption_column),
                                             num_images, batch_size)
    x, y = (originals + 1) / 2, (reconstructions + 1) / 2
    psnr = peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(y, x, data_range=1.0, reduction="none")
    metrics = {"model": str(model), "data": str(data), "split": split, "images": len(originals),
               "resolution": resolution, "psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
    if fid:
        from evaluation.fid import frechet_distance, inception_features, inception_network

        network = inception_network()
        real, fake = inception_features(network, originals), inception_features(network, reconstructions)
        half = len(real) // 2
        metrics.update(rfid=frechet_distance(real, fake),
                       rfid_floor_real_half_vs_half=frechet_distance(real[:half], real[half:2 * half]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shown = min(8, len(originals))
    make_grid(tensor_to_pil(originals[:shown]) + tensor_to_pil(reconstructions[:shown]), columns=shown).save(
        out / "reconstructions.png")
    return metrics


def format_table(metrics: dict) -> str:
    rows = [("images", f"{metrics['images']} ({metrics['split']}, {metrics['resolution']} px)"),
            ("PSNR (dB)", f"{metrics['psnr']:.2f}"), ("SSIM", f"{metrics['ssim']:.4f}")]
    if "rfid" in metrics:
        rows += [("rFID", f"{metrics['rfid']:.2f}"),
                 ("FID, real half vs half (for scale, not a floor)", f"{metrics['rfid_floor_real_half_vs_half']:.2f}")]
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
