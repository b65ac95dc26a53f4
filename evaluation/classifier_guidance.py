"""`ldm eval classifier-guidance`: the fidelity-diversity trade-off of classifier guidance as its scale grows.

For N random training images, one sample each with the prompt "" and the image's label (its category, or whatever
column the classifier was trained on) as `class_label`, at every scale: so the samples' label mix is the real set's,
and FID against those N images is the FID "against the matching real class". Beside it, two accuracies:
the guiding classifier's own, on the samples' final latents at t = 0 (what guidance optimises, so it flatters), and
an independent one, whether the nearest real image in Inception feature space (among 2N training images) carries the
asked label, with its chance level. Seeds are the same at every scale, so only the scale changes between rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.data.dataset import load_image_caption_dataset
from core.errors import UserError
from evaluation.fid import frechet_distance, inception_network
from core.images import captioned_grid
from evaluation.real_images import features_with_progress, squared_distances, training_real_sets

DEFAULT_SCALES = (0.0, 1.0, 2.0, 5.0, 10.0)


def guided_samples(pipe, classifier, labels: list[str], scale: float, scheduler: str, steps: int,
                   guidance_scale: float, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, images in [-1, 1]) for prompt "" and each label, in the order of `labels`."""
    latents: list[torch.Tensor | None] = [None] * len(labels)
    for start in tqdm(range(0, len(labels), batch_size), desc=f"classifier scale {scale:g}", unit="batch"):
        batch = labels[start:start + batch_size]
        for label in dict.fromkeys(batch):  # one call per label (generate takes one class_label)
            rows = [start + i for i, b in enumerate(batch) if b == label]
            z = pipe.generate([""] * len(rows), num_inference_steps=steps, guidance_scale=guidance_scale,
                              scheduler=scheduler, seed=seed + rows[0], classifier=classifier,
                              class_label=label, classifier_scale=scale, output_type="latent", progress=False)
            for row, latent in zip(rows, z):
                latents[row] = latent
    stacked = torch.stack(latents)
    images = [pipe.decode(chunk, "torch") * 2 - 1 for chunk in stacked.split(batch_size)]
    return stacked, torch.cat(images)


@torch.no_grad()
def classifier_accuracy(classifier, latents: torch.Tensor, labels: list[str]) -> float:
    """Top-1 accuracy of the classifier at t = 0 on final latents."""
    logits = classifier(latents, torch.zeros(len(latents), dtype=torch.long))
    predicted = [classifier.config.labels[i] for i in logits.argmax(-1).tolist()]
    return float(np.mean([p == y for p, y in zip(predicted, labels)]))


def nearest_label_accuracy(features: np.ndarray, gallery: np.ndarray, gallery_labels: list[str],
                           labels: list[str]) -> tuple[float, float]:
    """How often the nearest gallery image (Euclidean, Inception features) has the asked label, and the chance of
    that for a random gallery image."""
    nearest = np.asarray(gallery_labels)[squared_distances(features, gallery).argmin(1)]
    values, counts = np.unique(gallery_labels, return_counts=True)
    share = dict(zip(values.tolist(), (counts / counts.sum()).tolist()))
    return float(np.mean(nearest == np.asarray(labels))), float(np.mean([share.get(y, 0.0) for y in labels]))


def evaluate_classifier_guidance(pipe, classifier, data: str, out: str | Path, scales=DEFAULT_SCALES,
                                 num_images: int = 200, scheduler: str = "ddim", num_inference_steps: int = 50,
                                 guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 50,
                                 cache_dir: str | Path | None = None) -> dict:
    """A row per scale (FID, both accuracies, seconds per image); metrics.json, a plot and a sample grid in `out`."""
    out = Path(out)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    if num_images < 2:
        raise UserError("--num-images must be at least 2 (FID needs a covariance)")
    if not scales or any(not np.isfinite(s) or s < 0 for s in scales):
        raise UserError(f"classifier scales must be numbers >= 0, got {list(scales)}")
    column = classifier.config.label_column
    train = load_image_caption_dataset(data, "train")
    if column not in train.column_names:
        raise UserError(f"the classifier's label column '{column}' is not a column of {data}")
    notes: list[str] = []
    network = inception_network()
    real, reference, order = training_real_sets(train, num_images, seed, pipe.default_size(), network, cache, notes)
    num_images = len(real.captions)
    labels = list(train.select(order[:num_images])[column])
    unknown = sorted(set(labels) - set(classifier.config.labels))
    if unknown:
        raise UserError(f"labels {unknown} of column '{column}' are not among the classifier's labels")
    gallery = np.concatenate([real.features, reference.features])
    gallery_labels = labels + list(train.select(order[num_images:2 * num_images])[column])
    floor = frechet_distance(reference.features, real.features)
    rows, grids = [], []
    for scale in scales:
        started = time.perf_counter()
        latents, images = guided_samples(pipe, classifier, labels, scale, scheduler, num_inference_steps,
                                         guidance_scale, seed, batch_size)
        seconds = (time.perf_counter() - started) / num_images
        features = features_with_progress(network, images, f"Inception, scale {scale:g}")
        nearest, chance = nearest_label_accuracy(features, gallery, gallery_labels, labels)
        rows.append({"classifier_scale": float(scale), "images": num_images, "fid": frechet_distance(features,
                     real.features), "classifier_accuracy": classifier_accuracy(classifier, latents, labels),
                     "nearest_real_accuracy": nearest, "chance": chance, "seconds_per_image": seconds})
        grids.append(images[:8])
    metrics = {"data": str(data), "label_column": column, "num_images": num_images, "scheduler": scheduler,
               "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
               "fid_real_vs_real": floor, "notes": notes, "rows": rows}
    captioned_grid(torch.cat(grids), [f"{r['classifier_scale']:g}: {y}" for r in rows for y in labels[:8]],
                   columns=8).save(out / "samples.png")
    plot_scales(rows, floor, out / "classifier_guidance.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def plot_scales(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["classifier_scale"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(scales, [r["fid"] for r in rows], "o-", label="samples vs matching real")
    left.axhline(floor, color="grey", linestyle="--", label="real vs real")
    left.set(xlabel="classifier scale", ylabel="FID", title="fidelity")
    left.legend()
    right.plot(scales, [r["classifier_accuracy"] for r in rows], "o-", label="guiding classifier (t=0)")
    right.plot(scales, [r["nearest_real_accuracy"] for r in rows], "s-", label="nearest real image")
    right.axhline(rows[0]["chance"], color="grey", linestyle="--", label="chance")
    right.set(xlabel="classifier scale", ylabel="label accuracy", title="label")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(metrics: dict) -> str:
    header = (f"| classifier scale | FID (N = {metrics['num_images']}; real vs real {metrics['fid_real_vs_real']:.1f}) "
              "| guiding classifier accuracy (t = 0) | nearest-real label accuracy (chance) | s / image |")
    lines = [header, "|---|---|---|---|---|"]
    for r in metrics["rows"]:
        lines.append(f"| {r['classifier_scale']:g} | {r['fid']:.1f} | {r['classifier_accuracy']:.3f} | "
                     f"{r['nearest_real_accuracy']:.3f} ({r['chance']:.3f}) | {r['seconds_per_image']:.2f} |")
    return "\n".join(lines + [f"note: {n}" for n in metrics["notes"]])
