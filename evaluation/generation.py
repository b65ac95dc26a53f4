"""`ldm eval generate`: a text-to-image model's samples measured the way the field does, offline.

- FID (the offline Inception network, evaluation/fid.py) of samples for the captions of N training images against those
  images, and of samples for held-out captions against the held-out images, each beside the FID of two real sets of
  the same sizes (FID is biased upward at small N: only numbers at the same N compare).
- Prompt alignment without CLIP: for each sample of a training caption, the nearest real images (of the same N, in
  Inception feature space) carry the prompt's name (top-1, top-5) or its category; chance levels beside.
- Quality vs sampler and steps, and a guidance-scale sweep: FID, alignment and seconds per image.
- `full_rows`: more samplers / step counts measured like the main one (N training and held-out prompts), e.g. a
  consistency student at 1, 2, 4 and 8 steps; `plot_quality_vs_time` draws several models' rows on one plot.

Writes `metrics.json`, `samplers.png`, `guidance.png` and `samples.png` (prompts under images) to `--out`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.data.dataset import load_image_caption_dataset
from core.errors import UserError
from core.images import captioned_grid
from evaluation.fid import frechet_distance, inception_network
from evaluation.progress import earlier_metrics, save_metrics
from evaluation.real_images import (RealImages, features_with_progress, load_real_images, squared_distances,
                                    training_real_sets)
from ldm.cache import module_digest
from pipelines import defaults as D
from evaluation.settings import Setting, counting_calls, guide_switched, pareto_front
from pipelines.schedulers import make_scheduler


def generate_images(pipe, prompts: list[str], scheduler: str, steps: int, guidance: float, seed: int,
                    batch_size: int, desc: str, **options) -> tuple[torch.Tensor, float]:
    """Samples in [-1, 1] for each prompt (one image each, seeded per batch) and the wall seconds per image;
    `options`: more `Pipeline.generate` arguments (a guidance interval, a step schedule)."""
    images, started = [], time.perf_counter()
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = prompts[start:start + batch_size]
        images.append(pipe.generate(batch, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                                    seed=seed + start, output_type="torch", progress=False, **options) * 2 - 1)
    return torch.cat(images), (time.perf_counter() - started) / len(prompts)


def alignment(generated: np.ndarray, gallery: RealImages, top: int = 5) -> dict[str, float]:
    """How often the nearest real images (Euclidean, Inception features) of sample i carry prompt i's name or
    category, and the chance of that when the neighbours are drawn at random from the gallery."""
    real, top = gallery.features, min(top, len(gallery.names))
    nearest = np.argsort(squared_distances(generated, real), axis=1)[:, :top]
    names, categories = np.array(gallery.names), np.array(gallery.categories)
    count = len(gallery.names)

    def chance(label_counts: np.ndarray, k: int) -> float:  # P(at least one of k random picks has the label)
        return float(np.mean([1 - math.comb(count - m, k) / math.comb(count, k) for m in label_counts]))

    name_counts = np.array([(names == n).sum() for n in names])
    category_counts = np.array([(categories == c).sum() for c in categories])
    return {
        "name_top1": float(np.mean(names[nearest[:, 0]] == names)),
        "name_top5": float(np.mean([(names[row] == names[i]).any() for i, row in enumerate(nearest)])),
        "category_top1": float(np.mean(categories[nearest[:, 0]] == categories)),
        "chance_name_top1": chance(name_counts, 1),
        "chance_name_top5": chance(name_counts, top),
        "chance_category_top1": chance(category_counts, 1),
    }


def evaluate_setting(pipe, network, prompts_from: RealImages, scheduler: str, steps: int, guidance: float,
                     seed: int, batch_size: int) -> tuple[dict, torch.Tensor]:
    """FID against the real images whose captions were the prompts, alignment, and time, for one setting, with
    classifier-free guidance: a loaded --guide-model is for the ':guide' sweep settings alone."""
    with guide_switched(pipe, False):
        images, seconds = generate_images(pipe, prompts_from.captions, scheduler, steps, guidance, seed, batch_size,
                                          f"{scheduler} {steps} steps, guidance {guidance:g}")
    features = features_with_progress(network, images, "Inception, samples")
    result = {"scheduler": scheduler, "steps": steps, "guidance_scale": guidance, "images": len(images),
              "fid": frechet_distance(features, prompts_from.features), "seconds_per_image": seconds,
              **alignment(features, prompts_from)}
    return result, images


def evaluate_sampling_setting(pipe, network, prompts_from: RealImages, setting: Setting, seed: int,
                              batch_size: int) -> dict:
    """`evaluate_setting` for a sweep setting (evaluation/settings.py), with the network evaluations per image."""
    kwargs = setting.generate_kwargs()
    with guide_switched(pipe, setting.guide), counting_calls(pipe) as calls:
        images, seconds = generate_images(pipe, prompts_from.captions, kwargs.pop("scheduler"),
                                          kwargs.pop("num_inference_steps"), kwargs.pop("guidance_scale"), seed,
                                          batch_size, setting.text, **kwargs)
    features = features_with_progress(network, images, "Inception, samples")
    return {"setting": setting.text, "scheduler": setting.scheduler, "steps": setting.steps,
            "guidance_scale": setting.guidance_scale, "images": len(images),
            "fid": frechet_distance(features, prompts_from.features), "seconds_per_image": seconds,
            "unet_calls_per_image": calls["unet"] / len(images), "guide_calls_per_image": calls["guide"] / len(images),
            **alignment(features, prompts_from)}


def evaluate_generation(pipe, data: str, out: str | Path, num_images: int = D.EVAL_NUM_IMAGES,
                        sweep_images: int = D.EVAL_SWEEP_IMAGES, scheduler: str = D.EVAL_SCHEDULER,
                        num_inference_steps: int = D.EVAL_NUM_INFERENCE_STEPS,
                        guidance_scale: float = D.EVAL_GUIDANCE_SCALE, heldout_split: str | None = "validation",
                        samplers: tuple[tuple[str, int], ...] = D.SAMPLER_SWEEP,
                        guidance_scales: tuple[float, ...] = D.GUIDANCE_SWEEP, seed: int = 0,
                        batch_size: int = D.EVAL_BATCH_SIZE,
                        cache_dir: str | Path | None = None, full_rows: tuple[tuple[str, int], ...] = (),
                        sampling_settings: tuple[Setting, ...] = (), settings_heldout: bool = False) -> dict:
    """Run every measurement; returns the metrics dict (also written to `out/metrics.json`). Real images'
    features are cached in `cache_dir` (default `out/cache`), so evaluating several models on the same data and N
    computes them once. `sampling_settings`: the sweep of sampling settings (evaluation/settings.py) at
    `sweep_images` training prompts, and with `settings_heldout` on as many held-out prompts too; settings.png plots
    FID against time."""
    out = Path(out)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    # every argument and split checked before the first image: a typo must not cost the 20-minute main FID
    if num_images < 2 or sweep_images < 2:
        raise UserError("--num-images and --sweep-images must be at least 2 (FID needs a covariance)")
    for name, steps in ((scheduler, num_inference_steps), *samplers, *full_rows):
        if steps < 1:
            raise UserError(f"{name} needs at least 1 step, got {steps}")
        # an unknown sampler name, or one that does not fit the model (lcm and students), is refused here
        pipe.check_sampler(make_scheduler(name, pipe.scheduler), steps)
    for setting in sampling_settings:
        check_setting(pipe, setting)
    if not all(math.isfinite(g) and g >= 0 for g in (guidance_scale, *guidance_scales)):
        raise UserError(f"guidance scales must be finite numbers >= 0, got {(guidance_scale, *guidance_scales)}")
    train = load_image_caption_dataset(data, "train")
    heldout_ds = None
    if heldout_split is not None:
        try:
            heldout_ds = load_image_caption_dataset(data, heldout_split)
        except UserError as err:
            raise UserError(f"{err}; pass --heldout-split none to skip the held-out FID") from err
    out.mkdir(parents=True, exist_ok=True)
    network = inception_network()
    notes = []
    size = pipe.default_size()  # real images are resized (shorter side) and centre-cropped to the samples' size
    prompts_set, reference, _ = training_real_sets(train, num_images, seed, size, network, cache, notes)
    num_images = len(prompts_set.captions)

    own_interval = pipe.check_guidance("model")  # the model's own (sampling.json), used by every row but --settings
    # every network that changes a pixel (named as in the latent cache's key): an autoencoder swapped under the same
    # U-Net must not reuse the old rows
    settings = {"model": module_digest(pipe.unet), "vae": module_digest(pipe.vae),
                "text_encoder": module_digest(pipe.text_encoder), "text_max_length": pipe.text_encoder.max_length,
                "scheduler": scheduler, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "heldout_split": heldout_split, "sweep_images": sweep_images,
                "guidance_interval": None if own_interval is None else list(own_interval)}
    metrics: dict = {"data": str(data), "num_images": num_images, "resolution": size, "notes": notes, "seed": seed,
                     "settings": settings, "model_name": pipe.model_name}
    earlier = _earlier_results(out / "metrics.json", metrics)

    def measure(part: str, key, compute):
        """One setting's row: reused from an interrupted run with the same settings, else computed and saved at
        once (metrics.json is rewritten after every row, so a failure loses at most the row in progress)."""
        row = earlier.get((part, key))
        if row is None:
            row = compute()
        else:
            notes.append(f"{part} {key}: reused from the earlier, interrupted run in {out}")
        if part in ("train", "heldout"):
            metrics[part] = row
        elif part in ("full_train", "full_heldout"):
            metrics.setdefault(part, {"rows": []})["rows"].append(row)
        else:
            metrics.setdefault(part, {"images": len(sweep_set.captions), "fid_real_vs_real": sweep_floor,
                                      "rows": []})["rows"].append(row)
        save_metrics(out / "metrics.json", metrics)
        return row

    def main_row() -> dict:
        result, images = evaluate_setting(pipe, network, prompts_set, scheduler, num_inference_steps, guidance_scale,
                                          seed, batch_size)
        shown = min(16, len(images))
        captioned_grid(images[:shown], prompts_set.captions[:shown], columns=8).save(out / "samples.png")
        return {**result, "fid_real_vs_real": frechet_distance(reference.features, prompts_set.features)}

    sweep_set = prompts_set.take(min(sweep_images, num_images))
    if sweep_images > num_images and (samplers or guidance_scales or sampling_settings):  # they draw the main prompts
        notes.append(f"sweeps N = {num_images}: --sweep-images {sweep_images} is capped by the main rows' N")
    sweep_floor = frechet_distance(reference.take(len(sweep_set.captions)).features, sweep_set.features)
    measure("train", "main", main_row)

    if heldout_ds is not None:
        count = min(num_images, len(heldout_ds))
        if count < num_images:
            notes.append(f"held-out N = {count}: the whole '{heldout_split}' split")
        rows = np.random.default_rng(seed).permutation(len(heldout_ds))[:count].tolist()
        heldout = load_real_images(heldout_ds, heldout_split, rows, size, network, cache / f"heldout_{count}.npz")

        def heldout_row() -> dict:
            result, _ = evaluate_setting(pipe, network, heldout, scheduler, num_inference_steps, guidance_scale, seed,
                                         batch_size)
            return {**result, "fid_real_vs_real": frechet_distance(reference.take(count).features, heldout.features)}

        measure("heldout", "main", heldout_row)

    for name, count in full_rows:  # like the main row: N training prompts, and the held-out ones
        measure("full_train", f"{name}:{count}", lambda name=name, count=count: {**evaluate_setting(
            pipe, network, prompts_set, name, count, guidance_scale, seed, batch_size)[0],
            "fid_real_vs_real": metrics["train"]["fid_real_vs_real"]})
        if heldout_ds is not None:
            measure("full_heldout", f"{name}:{count}", lambda name=name, count=count: {**evaluate_setting(
                pipe, network, heldout, name, count, guidance_scale, seed, batch_size)[0],
                "fid_real_vs_real": metrics["heldout"]["fid_real_vs_real"]})

    for name, count in samplers:
        measure("samplers", f"{name}:{count}", lambda name=name, count=count: evaluate_setting(
            pipe, network, sweep_set, name, count, guidance_scale, seed, batch_size)[0])
    if samplers:
        plot_samplers(metrics["samplers"]["rows"], sweep_floor, out / "samplers.png")
    for scale in guidance_scales:
        measure("guidance", f"{scale:g}", lambda scale=scale: evaluate_setting(
            pipe, network, sweep_set, scheduler, num_inference_steps, scale, seed, batch_size)[0])
    if guidance_scales:
        plot_guidance(metrics["guidance"]["rows"], sweep_floor, out / "guidance.png")
    for setting in sampling_settings:
        measure("sampling_settings", setting.text, lambda setting=setting: evaluate_sampling_setting(
            pipe, network, sweep_set, setting, seed, batch_size))
    if sampling_settings and settings_heldout and heldout_ds is not None:
        heldout_sweep = heldout.take(min(len(sweep_set.captions), len(heldout.captions)))
        for setting in sampling_settings:
            measure("sampling_settings_heldout", setting.text, lambda setting=setting: evaluate_sampling_setting(
                pipe, network, heldout_sweep, setting, seed, batch_size))
        metrics["sampling_settings_heldout"]["images"] = len(heldout_sweep.captions)
        metrics["sampling_settings_heldout"]["fid_real_vs_real"] = frechet_distance(
            reference.take(len(heldout_sweep.captions)).features, heldout_sweep.features)
        save_metrics(out / "metrics.json", metrics)
    if sampling_settings:
        plot_settings(metrics, out / "settings.png")
    return metrics


def check_setting(pipe, setting: Setting) -> None:
    """Everything a sweep setting asks of the model, checked before the first image (sampler, steps, schedule,
    interval, guide), so a typo in the last setting does not cost the sweep before it."""
    from pipelines.arguments import real
    from pipelines.schedulers import with_step_schedule

    if setting.steps < 1:
        raise UserError(f"setting '{setting.text}' needs at least 1 step")
    real(f"guidance of setting '{setting.text}'", setting.guidance_scale, 0)
    pipe.check_sampler(with_step_schedule(make_scheduler(setting.scheduler, pipe.scheduler), setting.step_schedule),
                       setting.steps)
    pipe.check_guidance(setting.interval)
    if setting.guide and pipe.guide_unet is None:
        raise UserError(f"setting '{setting.text}' asks for the guide: pass --guide-model DIR")


def _earlier_results(path: Path, metrics: dict) -> dict:
    """The rows an earlier run of the same evaluation (same model weights, data, N, seed and settings) saved, by
    (part, key); nothing when there is no such run."""
    earlier = earlier_metrics(path, metrics, ("data", "num_images", "resolution", "seed", "settings"))
    found = {(part, "main"): earlier[part] for part in ("train", "heldout") if part in earlier}
    for part in ("samplers", "full_train", "full_heldout"):
        for row in earlier.get(part, {}).get("rows", []):
            found[part, f"{row['scheduler']}:{row['steps']}"] = row
    for row in earlier.get("guidance", {}).get("rows", []):
        found["guidance", f"{row['guidance_scale']:g}"] = row
    for part in ("sampling_settings", "sampling_settings_heldout"):
        for row in earlier.get(part, {}).get("rows", []):
            found[part, row["setting"]] = row
    return found


def plot_samplers(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        label = f"{row['scheduler']} {row['steps']}"
        left.scatter(row["seconds_per_image"], row["fid"])
        left.annotate(label, (row["seconds_per_image"], row["fid"]), fontsize=8)
        right.scatter(row["seconds_per_image"], row["name_top5"])
        right.annotate(label, (row["seconds_per_image"], row["name_top5"]), fontsize=8)
    left.axhline(floor, color="gray", linestyle="--", label="real vs real")
    left.set(xscale="log", xlabel="seconds per image", ylabel=f"FID (N = {rows[0]['images']})")
    left.legend()
    right.axhline(rows[0]["chance_name_top5"], color="gray", linestyle="--", label="chance")
    right.set(xscale="log", xlabel="seconds per image", ylabel="name in top-5 nearest real")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def quality_rows(metrics: dict, part: str = "train") -> list[dict]:
    """A model's rows at the main N on `part` (train or heldout): the main setting and the full rows, fastest first."""
    rows = ([metrics[part]] if part in metrics else []) + metrics.get(f"full_{part}", {}).get("rows", [])
    return sorted(rows, key=lambda r: r["seconds_per_image"])


def plot_quality_vs_time(models: dict[str, dict], path: Path) -> None:
    """FID (training and held-out prompts) against seconds per image, one curve per model's metrics.json."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, part, title in zip(axes, ("train", "heldout"), ("training prompts", "held-out prompts")):
        for label, metrics in models.items():
            rows = quality_rows(metrics, part)
            if not rows:
                continue
            axis.plot([r["seconds_per_image"] for r in rows], [r["fid"] for r in rows], marker="o", label=label)
            for r in rows:
                axis.annotate(f"{r['scheduler']} {r['steps']}", (r["seconds_per_image"], r["fid"]), fontsize=7)
            floor = rows[0]["fid_real_vs_real"]
        axis.axhline(floor, color="gray", linestyle="--", label="real vs real")
        axis.set(xscale="log", xlabel="seconds per image", ylabel=f"FID (N = {rows[0]['images']})", title=title)
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short range
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_settings(metrics: dict, path: Path) -> None:
    """FID against seconds per image for every sweep setting (training prompts; held-out ones beside when
    measured), the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("sampling_settings", "sampling_settings_heldout") if p in metrics]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.5), squeeze=False)
    for axis, part in zip(axes[0], parts):
        rows = metrics[part]["rows"]
        for row in rows:
            axis.scatter(row["seconds_per_image"], row["fid"], color="tab:blue")
            axis.annotate(row["setting"], (row["seconds_per_image"], row["fid"]), fontsize=6)
        front = pareto_front(rows)
        axis.plot([r["seconds_per_image"] for r in front], [r["fid"] for r in front], color="tab:orange",
                  label="Pareto front")
        axis.axhline(metrics[part]["fid_real_vs_real"], color="gray", linestyle="--", label="real vs real")
        axis.set(xlabel="seconds per image", ylabel=f"FID (N = {rows[0]['images']})",
                 title="training prompts" if part == "sampling_settings" else "held-out prompts")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_guidance(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    scales = [row["guidance_scale"] for row in rows]
    left.plot(scales, [row["fid"] for row in rows], marker="o", label="samples")
    left.axhline(floor, color="gray", linestyle="--", label="real vs real")
    left.set(xlabel="guidance scale", ylabel=f"FID (N = {rows[0]['images']})")
    left.legend()
    right.plot([row["name_top5"] for row in rows], [row["fid"] for row in rows], marker="o")
    for row in rows:
        right.annotate(f"{row['guidance_scale']:g}", (row["name_top5"], row["fid"]), fontsize=8)
    right.set(xlabel="alignment: name in top-5 nearest real", ylabel="FID", title="trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_tables(metrics: dict) -> str:
    """Markdown tables of the results, as docs/evaluation.md shows them."""
    def row(r: dict, floor: float) -> str:
        return (f"| {r['scheduler']} | {r['steps']} | {r['guidance_scale']:g} | {r['images']} | {r['fid']:.1f} | "
                f"{floor:.1f} | {r['name_top1']:.3f} ({r['chance_name_top1']:.3f}) | "
                f"{r['name_top5']:.3f} ({r['chance_name_top5']:.3f}) | "
                f"{r['category_top1']:.3f} ({r['chance_category_top1']:.3f}) | {r['seconds_per_image']:.3f} |")

    header = ("| sampler | steps | guidance | N | FID | FID real vs real | name top-1 (chance) | name top-5 (chance) | "
              "category top-1 (chance) | s / image |\n|---|---|---|---|---|---|---|---|---|---|")
    parts = []
    for key, title in (("train", "training prompts vs their images"), ("heldout", "held-out prompts vs their images")):
        if key in metrics:
            parts.append(f"{title}\n\n{header}\n{row(metrics[key], metrics[key]['fid_real_vs_real'])}")
    for key, title in (("full_train", "more settings, training prompts"), ("full_heldout", "more settings, held-out "
                       "prompts"), ("samplers", "sampler and steps"), ("guidance", "guidance scale")):
        if key in metrics:
            rows = "\n".join(row(r, r.get("fid_real_vs_real", metrics[key].get("fid_real_vs_real")))
                             for r in metrics[key]["rows"])
            parts.append(f"{title}\n\n{header}\n{rows}")
    for key, title in (("sampling_settings", "sampling settings, training prompts"),
                       ("sampling_settings_heldout", "sampling settings, held-out prompts")):
        if key in metrics:
            front = {r["setting"] for r in pareto_front(metrics[key]["rows"])}
            lines = "\n".join(
                f"| {r['setting']}{' (front)' if r['setting'] in front else ''} | {r['images']} | {r['fid']:.1f} | "
                f"{r['name_top5']:.3f} | {r['unet_calls_per_image']:.0f} | {r['guide_calls_per_image']:.0f} | "
                f"{r['seconds_per_image']:.3f} |" for r in metrics[key]["rows"])
            parts.append(f"{title}\n\n| setting | N | FID | name top-5 | U-Net calls / image | guide calls / image | "
                         f"s / image |\n|---|---|---|---|---|---|---|\n{lines}")
    notes = "".join(f"\nnote: {n}" for n in metrics.get("notes", []))
    return "\n\n".join(parts) + notes
