"""`ldm eval inpaint`: inpainting measured with the LaMa protocol on held-out images, offline.

A fixed, seeded mask set of four kinds (narrow strokes, wide strokes, boxes, outpainting borders) over N held-out
images, each filled from its own caption. Every method is given the masked image (the hole grey, 0 in [-1, 1]), as in
LaMa: given the original, the 4-channel baselines would copy it from the latent cells that the nearest-downsampled
mask calls known although some of their pixels are in the hole (22% of a narrow stroke at f = 4), and from the
encoder's view across the hole's edge. `masked_input=False` keeps that older protocol for comparison. Per row
(model x method) and mask kind: FID of the composited outputs (paste-back on) against the originals at N; PSNR /
SSIM inside the mask (against the original: how close the fill is, not a goal in itself) and outside it before
paste-back (how far the autoencoder round trip moves the known pixels); wall seconds per image. Writes
`metrics.json` and `examples.png` (a line per mask kind: the first image masked, then each row's composited
output).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.errors import UserError
from evaluation.fid import frechet_distance, inception_features, inception_network
from core.images import make_grid, tensor_to_pil
from ldm.masks import irregular_strokes, outpaint_border, random_boxes
from evaluation.progress import earlier_metrics, save_metrics
from evaluation.real_images import seeded_held_out_images
from ldm.cache import module_digest
from ldm.inpainting import grey_hole
from pipelines.defaults import INPAINT_METHODS, LATENT_MASKS

# LaMa-style evaluation masks (widths at 256 px, scaled to the image): thin and thick strokes, boxes, borders
EVAL_MASKS = {
    "narrow strokes": lambda rng, size: irregular_strokes(rng, size, max_width=30),
    "wide strokes": lambda rng, size: irregular_strokes(rng, size, max_width=100),
    "boxes": random_boxes,
    "outpaint": outpaint_border,
}


def eval_masks(kind: str, count: int, size: int, seed: int) -> torch.Tensor:
    """(count, 1, size, size) masks of one kind, the same for every model and method (seeded per kind)."""
    rng = np.random.default_rng([seed, list(EVAL_MASKS).index(kind)])
    return torch.from_numpy(np.stack([EVAL_MASKS[kind](rng, size) for _ in range(count)]))[:, None]


def parse_method(method: str) -> tuple[str, str]:
    """A row's method and its latent mask: "blend:cover" -> ("blend", "cover"); without a colon, nearest."""
    base, _, latent_mask = method.partition(":")
    if base not in INPAINT_METHODS or latent_mask not in ("", *LATENT_MASKS):
        raise UserError(f"unknown baseline '{method}'; valid: blend or repaint, optionally with "
                        f":{' or :'.join(LATENT_MASKS)}")
    return base, latent_mask or "nearest"


def psnr_ssim_inside_outside(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of [0, 1] images over the pixels inside the mask and outside it (one SSIM map, averaged
    over each region; NaN for an empty region)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, ssim_map = structural_similarity_index_measure(a, b, data_range=1.0, return_full_image=True)
    result = {}
    for name, region in (("inside", mask), ("outside", 1 - mask)):
        region = region.expand_as(a).bool()
        if not region.any():
            result[f"psnr_{name}"], result[f"ssim_{name}"] = float("nan"), float("nan")
            continue
        mse = ((a - b)[region] ** 2).mean().clamp_min(1e-12)
        result[f"psnr_{name}"], result[f"ssim_{name}"] = float(10 * torch.log10(1 / mse)), float(
            ssim_map[region].mean())
    return result


def evaluate_inpainting(pipes: dict[str, object], data: str, out: str | Path, split: str = "validation",
                        num_images: int = 100, num_inference_steps: int = 20, guidance_scale: float = 4.0,
                        seed: int = 0, kinds: tuple[str, ...] = tuple(EVAL_MASKS), masked_input: bool = True) -> dict:
    """Every (row, mask kind) measurement; `pipes` maps a row name to (InpaintPipeline, method), the method
    optionally with its latent mask after a colon ("blend:cover")."""
    methods = {name: parse_method(method) for name, (_, method) in pipes.items()}  # refused before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(kinds) - set(EVAL_MASKS)
    if unknown:
        raise UserError(f"unknown mask kind(s) {', '.join(sorted(unknown))}; valid: {', '.join(EVAL_MASKS)}")
    size = next(iter(pipes.values()))[0].default_size()
    originals, captions = seeded_held_out_images(data, split, num_images, size, seed)  # [-1, 1]
    network = inception_network()
    real_features = inception_features(network, originals)
    metrics: dict = {"data": str(data), "split": split, "num_images": len(originals), "resolution": size,
                     "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
                     "input": "masked" if masked_input else "original",
                     "models": {name: module_digest(pipe.unet) for name, (pipe, _) in pipes.items()}, "rows": []}
    fields = ("data", "split", "num_images", "resolution", "num_inference_steps", "guidance_scale", "seed", "input")
    earlier = earlier_metrics(out / "metrics.json", metrics, fields)
    done = {(r["row"], r["masks"]): r for r in earlier.get("rows", [])
            if earlier.get("models", {}).get(r["row"]) == metrics["models"][r["row"]]}
    target = (originals + 1) / 2
    examples = []
    for kind in kinds:
        masks = eval_masks(kind, len(originals), size, seed)
        hidden = grey_hole(target, masks)
        examples.append(tensor_to_pil(hidden[:1] * 2 - 1)[0])
        given = hidden if masked_input else target
        for name, (pipe, method) in pipes.items():
            base, latent_mask = methods[name]

            def fill(i: int) -> torch.Tensor:
                return pipe.generate(captions[i], image=given[i:i + 1], mask_image=masks[i:i + 1], method=base,
                                     latent_mask=latent_mask, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, seed=seed + i, paste_back=False,
                                     output_type="torch", progress=False, step_schedule=None,
                                     guidance_interval=None).cpu()

            if (name, kind) in done:  # finished by an earlier run: its row, and its first fill redrawn for the grid
                metrics["rows"].append(done[name, kind])
                first = target[:1] * (1 - masks[:1]) + fill(0) * masks[:1]
                examples.append(tensor_to_pil(first * 2 - 1)[0])
                continue
            raw, started = [], time.perf_counter()
            for i in tqdm(range(len(originals)), desc=f"{name}, {kind}", unit="image"):
                raw.append(fill(i))
            seconds = (time.perf_counter() - started) / len(originals)
            raw = torch.cat(raw)
            composited = target * (1 - masks) + raw * masks
            scores = psnr_ssim_inside_outside(raw, target, masks)
            fid = frechet_distance(real_features, inception_features(network, composited * 2 - 1))
            metrics["rows"].append({"row": name, "method": method, "masks": kind, "fid": fid,
                                    "psnr_inside": scores["psnr_inside"], "ssim_inside": scores["ssim_inside"],
                                    "psnr_outside_before_paste": scores["psnr_outside"],
                                    "ssim_outside_before_paste": scores["ssim_outside"],
                                    "coverage": float(masks.mean()), "seconds_per_image": seconds})
            save_metrics(out / "metrics.json", metrics)  # after every row: an interrupted run keeps what it did
            examples.append(tensor_to_pil(composited[:1] * 2 - 1)[0])
    make_grid(examples, columns=1 + len(pipes)).save(out / "examples.png")
    return metrics


def format_table(metrics: dict) -> str:
    lines = [f"N = {metrics['num_images']} images of split '{metrics['split']}', {metrics['resolution']} px, "
             f"{metrics['num_inference_steps']} steps, guidance {metrics['guidance_scale']:g}, "
             f"{metrics.get('input', 'original')} image as input",
             "| masks (coverage) | row | FID | PSNR inside | SSIM inside | PSNR outside, before paste-back | "
             "s / image |", "|---|---|---|---|---|---|---|"]
    for r in metrics["rows"]:
        lines.append(f"| {r['masks']} ({r['coverage']:.0%}) | {r['row']} | {r['fid']:.1f} | {r['psnr_inside']:.2f} | "
                     f"{r['ssim_inside']:.3f} | {r['psnr_outside_before_paste']:.2f} | "
                     f"{r['seconds_per_image']:.2f} |")
    return "\n".join(lines)
