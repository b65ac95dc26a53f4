"""`ldm eval control`: how closely a ControlNet's samples follow their control map, on held-out images, offline.

N held-out images (a seeded choice of a split the ControlNet never trained on), each drawn from its own first caption
with the same seed by every row: the base model alone, then with the ControlNet at each conditioning scale. Per row:
edge fidelity, the F1 between the Canny map of each sample and the Canny map of its source image with a 2-pixel
tolerance (pooled over the set: a predicted edge pixel counts as correct when a source edge lies within 2 px of it,
Euclidean, a source edge pixel as found likewise; for a Canny ControlNet the source's Canny map is its
condition, a colour ControlNet is given its own kind of map and still scored on edges); FID of the samples against their source images; wall seconds per image. Writes
`metrics.json` (after every row; a rerun keeps the finished rows) and `examples.png` (a column per example image:
source, control map, base sample, controlled samples).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from core.errors import UserError
from core.images import make_grid, tensor_to_pil
from evaluation.fid import frechet_distance, inception_features, inception_network
from evaluation.progress import earlier_metrics, save_metrics
from evaluation.real_images import seeded_held_out_images
from ldm.cache import module_digest
from ldm.control import control_map

EDGE_TOLERANCE = 2  # pixels (BSDS-style matching distance at 64 px)
EXAMPLES = 8  # columns of examples.png


def edge_counts(predicted: np.ndarray, target: np.ndarray, tolerance: int = EDGE_TOLERANCE) -> np.ndarray:
    """[matched predicted, predicted, found target, target] edge-pixel counts of two boolean (H, W) maps, a match
    being an edge pixel of the other map at Euclidean distance `tolerance` or less (a symmetric disc: OpenCV's
    ellipse kernel is lopsided at this size)."""
    import cv2

    offsets = np.arange(-tolerance, tolerance + 1)
    disc = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= tolerance**2).astype(np.uint8)
    near_target = cv2.dilate(target.astype(np.uint8), disc).astype(bool)
    near_predicted = cv2.dilate(predicted.astype(np.uint8), disc).astype(bool)
    return np.array([(predicted & near_target).sum(), predicted.sum(), (target & near_predicted).sum(), target.sum()],
                    dtype=np.int64)


def edge_scores(counts: np.ndarray) -> dict[str, float]:
    """Pooled precision, recall and F1 from summed `edge_counts`."""
    precision = counts[0] / max(counts[1], 1)
    recall = counts[2] / max(counts[3], 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"edge_precision": float(precision), "edge_recall": float(recall), "edge_f1": float(f1)}


def canny_edges(image: Image.Image) -> np.ndarray:
    """A boolean (H, W) Canny map (ldm/control.py's thresholds)."""
    return np.asarray(control_map(image, "canny"))[..., 0] > 0


def evaluate_control(base, pipe, data: str, out: str | Path, split: str = "validation", num_images: int = 200,
                     scales: tuple[float, ...] = (1.0,), num_inference_steps: int | None = None,
                     guidance_scale: float | None = None, seed: int = 0) -> dict:
    """Every row's measurements: `base` a Pipeline without ControlNets, `pipe` the same model with one loaded."""
    if base.controlnets or module_digest(base.unet) != module_digest(pipe.unet):
        raise UserError("the base row needs the same model without a ControlNet")
    if len(pipe.controlnets) != 1:
        raise UserError(f"ldm eval control measures one ControlNet; {len(pipe.controlnets)} are loaded")
    control_type = pipe.controlnet_infos[0].get("control_type")
    if control_type is None:
        raise UserError(f"ControlNet {pipe.controlnet_infos[0]['folder']} records no control_type "
                        "(controlnet.json); it was not trained here")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if num_images < 2:
        raise UserError(f"--num-images must be at least 2 (FID needs two images), got {num_images}")
    size = pipe.default_size()
    originals, captions = seeded_held_out_images(data, split, num_images, size, seed)  # [-1, 1]
    sources = tensor_to_pil(originals)
    conditions = [control_map(image, control_type) for image in sources]
    targets = [canny_edges(image) for image in sources]
    network = inception_network()
    real_features = inception_features(network, originals)
    metrics: dict = {"data": str(data), "split": split, "num_images": len(originals), "resolution": size,
                     "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
                     "control_type": control_type, "edge_tolerance": EDGE_TOLERANCE,
                     "models": {"unet": module_digest(pipe.unet), "controlnet": module_digest(pipe.controlnets[0])},
                     "rows": []}
    fields = ("data", "split", "num_images", "resolution", "num_inference_steps", "guidance_scale", "seed",
              "control_type", "edge_tolerance", "models")
    done = {r["row"]: r for r in earlier_metrics(out / "metrics.json", metrics, fields).get("rows", [])}
    shown = min(EXAMPLES, len(sources))
    examples = [*sources[:shown], *conditions[:shown]]
    for name, scale in [("base", None), *((f"controlnet x{s:g}", s) for s in scales)]:
        def draw(i: int) -> Image.Image:
            control = {} if scale is None else {"control_image": conditions[i],
                                                 "controlnet_conditioning_scale": scale}
            return (base if scale is None else pipe).generate(
                captions[i], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed + i,
                progress=False, **control)[0]

        if name in done:  # finished by an earlier run: its row, and its examples redrawn for the grid
            metrics["rows"].append(done[name])
            examples += [draw(i) for i in range(shown)]
            continue
        samples, started = [], time.perf_counter()
        for i in tqdm(range(len(originals)), desc=name, unit="image"):
            samples.append(draw(i))
        seconds = (time.perf_counter() - started) / len(originals)
        counts = sum(edge_counts(canny_edges(s), t) for s, t in zip(samples, targets))
        pixels = torch.stack([torch.from_numpy(np.array(s)).permute(2, 0, 1) for s in samples]).float() / 127.5 - 1
        fid = frechet_distance(real_features, inception_features(network, pixels))
        metrics["rows"].append({"row": name, "scale": scale, **edge_scores(counts), "fid": fid,
                                "seconds_per_image": seconds})
        save_metrics(out / "metrics.json", metrics)
        examples += samples[:shown]
    make_grid(examples, columns=shown).save(out / "examples.png")
    return metrics


def format_table(metrics: dict) -> str:
    steps = metrics["num_inference_steps"] or "the model's own"
    guidance = "the model's own" if metrics["guidance_scale"] is None else f"{metrics['guidance_scale']:g}"
    lines = [f"N = {metrics['num_images']} images of split '{metrics['split']}', {metrics['resolution']} px, "
             f"{metrics['control_type']} control, steps {steps}, guidance {guidance}, seed {metrics['seed']}; "
             f"edges matched within {metrics['edge_tolerance']} px",
             "| row | edge F1 | precision | recall | FID vs sources | s / image |", "|---|---|---|---|---|---|"]
    base = next((r for r in metrics["rows"] if r["row"] == "base"), None)
    for r in metrics["rows"]:
        ratio = f" ({r['edge_f1'] / base['edge_f1']:.2f}x base)" if base and r is not base and base["edge_f1"] else ""
        lines.append(f"| {r['row']} | {r['edge_f1']:.3f}{ratio} | {r['edge_precision']:.3f} | {r['edge_recall']:.3f} "
                     f"| {r['fid']:.1f} | {r['seconds_per_image']:.3f} |")
    return "\n".join(lines)
