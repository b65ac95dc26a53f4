"""Adaptation: teach the embedded default emoji names it never saw, with LoRA / DreamBooth, and measure what it learns
and what it forgets.

The emoji set holds out whole names (its validation split). For each of --names of them (those with 7 styles, evenly
spaced through the split; or --name NAME ...), `accelerate launch train_ldm.py --config
configs/ldm/emoji-64-dreambooth.yaml` trains on --instances of that name's held-out images (the first styles in
the split's order) with the name as the instance prompt, in each of the --variants:
- `lora`: a rank-8 LoRA, no prior preservation;
- `lora-prior`: the same with prior preservation (100 class images drawn once by the base from 50 seeded training
  captions, shared by all names);
- `full-prior`: every U-Net weight (learning rate --full-lr), with the same prior preservation and steps.
Then, before (the base) and after, per name:
- concept alignment: --samples samples of the name's prompt; the share whose nearest real image (Inception features,
  among the held-out images of all names less the name's instance images: a copy of a training image would score
  memorisation) carries that name (top-1), or whose 5 nearest include it (top-5); chance beside (from the number of
  that name's images in that gallery);
- forgetting: FID of samples of --forgetting-prompts seeded training captions (fixed seeds) against their images;
- adapter size (the LoRA file; the U-Net file for a full fine-tune) and the training command's wall time.
Writes metrics.json (rows kept: a rerun skips finished ones), a grid (real | base | adapted samples per name) and
prints the table.

    python benchmarks/adaptation.py [--names 5] [--steps 300] [--variants lora,lora-prior,full-prior] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CONFIG = "configs/ldm/emoji-64-dreambooth.yaml"
VARIANTS = ("lora", "lora-prior", "full-prior")


def pick_names(held, count: int) -> list[str]:
    """Names with 7 held-out images (one per style), evenly spaced in the split's order."""
    column = list(held["name"])
    full = [n for n in dict.fromkeys(column) if column.count(n) == 7]
    return [full[int(j * len(full) / count)] for j in range(count)]


def image_of(row: dict):
    """A row's image (the loader leaves images undecoded: {"bytes", "path"})."""
    import io

    from PIL import Image

    value = row["image"]
    return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]).convert("RGB")


def alignment(features: np.ndarray, gallery: np.ndarray, names: list[str], target: str) -> dict[str, float]:
    """Top-1 / top-5 nearest-real-image hits of `target`, and their chance levels."""
    from evaluation.real_images import squared_distances

    nearest = np.argsort(squared_distances(features, gallery), axis=1)[:, :5]
    labels = np.array(names)
    m, n = int((labels == target).sum()), len(labels)
    return {"top1": float(np.mean(labels[nearest[:, 0]] == target)),
            "top5": float(np.mean([(labels[row] == target).any() for row in nearest])),
            "chance_top1": m / n, "chance_top5": 1 - math.comb(n - m, 5) / math.comb(n, 5)}


def samples(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 32) -> torch.Tensor:
    """Images in [-1, 1]; batch b seeded seed + b x batch, the same for every model compared."""
    out = []
    for start in range(0, len(prompts), batch):
        # the protocol's sampler as documented (even steps, every step guided), not a model folder's own settings
        out.append(pipe.generate(prompts[start:start + batch], num_inference_steps=steps, guidance_scale=guidance,
                                 seed=seed + start, output_type="torch", progress=False, step_schedule=None,
                                 guidance_interval=None) * 2 - 1)
    return torch.cat(out)


def measure(pipe, network, name: str, args, gallery, gallery_names, forget_prompts, forget_real,
            fid: float | None = None) -> dict:
    """Alignment of the name's samples against `gallery` (this name's gallery: its instance images left out), and
    the FID of the other prompts' samples (`fid` when already known: the base's is the same for every name)."""
    from evaluation.fid import frechet_distance, inception_features

    concept = samples(pipe, [name] * args.samples, args.seed, args.inference_steps, args.guidance)
    row = alignment(inception_features(network, concept), gallery, gallery_names, name)
    if fid is None:
        forgetting = samples(pipe, forget_prompts, args.seed + 10_000, args.inference_steps, args.guidance)
        fid = frechet_distance(inception_features(network, forgetting), forget_real)
    row["fid_other_prompts"] = fid
    return row, concept


def train(name: str, variant: str, folder: Path, out: Path, args, class_prompts: list[str]) -> float:
    """The real command; returns its wall seconds."""
    identifier = name.replace("-", " ").split()[-1]
    command = [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(args.threads), "train_ldm.py",
               "--config", CONFIG, f"output_dir={out}",
               f"instance_data={folder}", f"instance_prompt={name}", f"identifier={identifier}",
               f"max_steps={args.steps}", f"checkpoint_every={args.steps}", f"sample_every={args.steps}",
               f"data={args.data}", "resume=never"]
    if variant.endswith("prior"):
        command += [f"class_prompts={json.dumps(class_prompts)}", f"class_data_dir={args.out / 'class_images'}"]
    command += ["lora=false", f"learning_rate={args.full_lr}"] if variant.startswith("full") else \
        [f"learning_rate={args.lora_lr}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        result = subprocess.run(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"training {name} ({variant}) failed; see {out.with_suffix('.log')}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--names", type=int, default=5)
    parser.add_argument("--name", action="append", default=None, help="these names instead (repeat)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--instances", type=int, default=4, help="training images per name; the rest stay in the "
                                                                   "alignment gallery")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=16, help="samples of each new name's prompt")
    parser.add_argument("--forgetting-prompts", type=int, default=200)
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each training run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-adaptation"))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; valid: {', '.join(VARIANTS)}")

    from core.data.dataset import load_image_caption_dataset
    from core.images import captioned_grid
    from evaluation.fid import inception_network
    from evaluation.real_images import load_real_images
    from evaluation.progress import save_metrics
    from pipelines import Pipeline

    args.out.mkdir(parents=True, exist_ok=True)
    metrics_file = args.out / "metrics.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "variants", "name", "names", "threads")}
    settings["data"] = str(settings["data"])
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    if metrics.get("settings") != settings:
        metrics = {"settings": settings, "rows": {}}
    network = inception_network()
    held = load_image_caption_dataset(args.data, "validation")
    train_split = load_image_caption_dataset(args.data, "train")
    names = args.name or pick_names(held, args.names)
    gallery = load_real_images(held, "validation", list(range(len(held))), 64, network, args.out / "cache" / "held.npz")
    order = np.random.default_rng(args.seed).permutation(len(train_split)).tolist()
    forget = load_real_images(train_split, "train", order[:args.forgetting_prompts], 64, network,
                              args.out / "cache" / f"train_{args.forgetting_prompts}.npz")
    class_prompts = sorted(set(train_split.select(order[-50:])["caption"]))  # disjoint from the forgetting prompts

    held_names = list(held["name"])
    instances = {name: [i for i, n in enumerate(held_names) if n == name][:args.instances] for name in names}

    def name_gallery(name: str) -> tuple[np.ndarray, list[str]]:
        """The held-out gallery less this name's instance images."""
        kept = [i for i in range(len(held_names)) if i not in instances[name]]
        return gallery.features[kept], [gallery.names[i] for i in kept]

    base = Pipeline()
    concepts = {}
    for name in names:
        key = f"{name}|base"
        if key not in metrics["rows"]:
            known = [r["fid_other_prompts"] for k, r in metrics["rows"].items() if k.endswith("|base")]
            row, concept = measure(base, network, name, args, *name_gallery(name), forget.captions,
                                   forget.features, known[0] if known else None)
            metrics["rows"][key] = row
            save_metrics(metrics_file, metrics)
        concepts[key] = samples(base, [name] * 4, args.seed, args.inference_steps, args.guidance)
    for name in names:
        folder = args.out / f"instances-{args.instances}" / name.replace(" ", "_")
        if not any(folder.glob("*.png")):
            folder.mkdir(parents=True, exist_ok=True)
            for i in instances[name]:
                image_of(held[i]).save(folder / f"{held[i]['style']}.png")
        for variant in variants:
            key = f"{name}|{variant}"
            run_dir = args.out / "runs" / f"{name.replace(' ', '_')}-{variant}"
            if key not in metrics["rows"]:
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)  # an unfinished run of this benchmark's own
                seconds = train(name, variant, folder, run_dir, args, class_prompts)
                final = run_dir / "final"
                if variant.startswith("lora"):
                    pipe = Pipeline(lora=final)
                    size = (final / "pytorch_lora_weights.safetensors").stat().st_size
                else:
                    pipe = Pipeline(model=final)
                    size = (final / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
                row, _ = measure(pipe, network, name, args, *name_gallery(name), forget.captions,
                                 forget.features)
                metrics["rows"][key] = {**row, "train_seconds": seconds, "weights_bytes": size}
                save_metrics(metrics_file, metrics)
            if variant == "lora-prior" or (variant == variants[-1] and f"{name}|lora-prior" not in concepts):
                final = run_dir / "final"
                pipe = Pipeline(lora=final) if variant.startswith("lora") else Pipeline(model=final)
                concepts[f"{name}|adapted"] = samples(pipe, [name] * 4, args.seed, args.inference_steps,
                                                      args.guidance)

    # the grid: per name, one real image, 4 base samples, 4 adapted samples
    tiles, captions = [], []
    for name in names:
        real = image_of(held[instances[name][0]]).resize((64, 64))
        real = torch.from_numpy(np.asarray(real)).permute(2, 0, 1).float() / 127.5 - 1
        adapted = concepts.get(f"{name}|adapted", torch.zeros(0, 3, 64, 64))
        row = [real, *concepts[f"{name}|base"], *adapted]
        tiles += row
        captions += [name[:14]] + ["base"] * 4 + ["adapted"] * len(adapted)
    grid = captioned_grid(torch.stack(tiles), captions, columns=9)
    grid.save(args.out / "grid.png")
    print(table(metrics, names, variants))
    print(f"wrote {metrics_file} and {args.out / 'grid.png'}")


def table(metrics: dict, names: list[str], variants: list[str]) -> str:
    lines = ["| name | model | top-1 | top-5 | chance top-1 / top-5 | FID other prompts | weights | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for variant in ["base", *variants]:
        rows = []
        for name in names:
            row = metrics["rows"].get(f"{name}|{variant}")
            if row is None:
                continue
            rows.append(row)
            lines.append(_line(name, variant, row))
        if rows:
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            lines.append(_line(f"**mean of {len(rows)}**", variant, mean))
    return "\n".join(lines)


def _line(name: str, variant: str, row: dict) -> str:
    size = f"{row['weights_bytes'] / 1e6:.2f} MB" if "weights_bytes" in row else "-"
    seconds = f"{row['train_seconds']:.0f}" if "train_seconds" in row else "-"
    return (f"| {name} | {variant} | {row['top1']:.2f} | {row['top5']:.2f} | {row['chance_top1']:.3f} / "
            f"{row['chance_top5']:.3f} | {row['fid_other_prompts']:.1f} | {size} | {seconds} |")


if __name__ == "__main__":
    main()
