"""Time to quality: FID against training minutes for diffusers' text-to-image recipe, this project's shipped recipe
and each training lever on top of it, all on the same U-Net, data, autoencoder and text encoder.

Each arm trains through the real `accelerate launch train_ldm.py` in segments of `--segment` minutes of training
(`max_minutes`; each segment exports `final/` and the next resumes bit-exactly from its checkpoint), until
`--budget` minutes. After each segment, `final/` is scored by FID at `--num-images` training prompts (fixed prompts
and seeds, one sampler and guidance; scoring and start-up time are not counted in the minutes). An arm that trains
from the latent/text cache builds it first with `ldm cache`, timed: those minutes are counted in its rows (the
uncached arm pays for its encoders inside its training minutes). Arms:

  diffusers      diffusers' examples/text_to_image/train_text_to_image.py as it runs by default: the VAE and the text
                 encoder every step (no cache), batch 16, epsilon, lr 1e-4 constant, no min-SNR weighting, no EMA,
                 no caption dropout (the script has none: its model is still sampled with guidance, as the other
                 arms are); the same data and caption variants (the script draws one of a row's captions at random)
  shipped        configs/ldm/emoji-64.yaml as it is (cache, min-SNR 5, lr 1e-3 with warm-up, EMA 0.999)
  logit-normal   shipped + timestep_density=logit_normal (SD3)
  inverse-sqrt   shipped + lr_scheduler=inverse_sqrt, a 2x peak (EDM2's decay)
  lr-2x          shipped with the 2x peak alone (constant after warm-up): inverse-sqrt's gain, split into rate and decay
  post-hoc-ema   shipped + post_hoc_ema=[0.05, 0.10], scored with the sigma_rel that `ldm ema` picks by
                 validation loss among --ema-lengths
  xs / m         shipped with the emoji-xs (0.94M) / emoji-m U-Net: the size a CPU-hour budget favours
  flow           shipped with the rectified-flow objective (prediction_type=flow, no min-SNR: the plain velocity
                 loss), scored with its own sampler, flow-euler, at the same steps (a research arm: no diffusers
                 pipeline samples a U-Net with a flow scheduler, docs/benchmarks.md)
  combined       flow + inverse-sqrt + logit-normal: the levers that scored better than the shipped arm, together
                 (scored with flow-euler)
  combined-diffusion  inverse-sqrt + logit-normal: the same without flow, which a diffusers pipeline can sample
  shipped-seed1  the shipped arm with seed 1 (weights, data order, noise): the spread a single seed leaves

    python benchmarks/time_to_quality.py --budget 45 --segment 9 --arms diffusers,shipped,logit-normal
    python benchmarks/time_to_quality.py --budget 24 --segment 8 --arms diffusers,shipped,xs,m --parallel 2
    python benchmarks/time_to_quality.py --quick      # tiny configs, seconds (what tests/test_time_to_quality.py runs)

`--parallel K` trains the arms K at a time, side by side, each on --threads CPU threads (default: the cores / K):
the group's caches are built together, then the group trains segment k together and each arm is scored alone before
segment k + 1 starts, so the arms of a group share the machine alike while training and no score runs beside a
training. On 2 cores, `--parallel 2` gives each arm one core: twice the arms in the same time, each slower.

Writes OUT/metrics.json (every scored snapshot, rewritten after each), OUT/table.md and OUT/fid-vs-minutes.png.
An interrupted run continues where it stopped, and a larger --budget extends it (segments and scores already done
are kept; other settings on the same --out are refused). The headline: the minutes each arm needs to reach the
diffusers arm's final FID, as a share of the diffusers arm's minutes, bracketed by the arm's scores: between the score
just before its first at or below that FID (or the arm's start, when that is its first score) and that first one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH = [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

SHIPPED = "configs/ldm/emoji-64.yaml"
DIFFUSERS = ["cache_latents=false", "batch_size=16", "min_snr_gamma=null", "learning_rate=1e-4", "lr_scheduler=constant",
             "lr_warmup_steps=0", "use_ema=false", "cond_drop_prob=0"]
ARMS: dict[str, list[str]] = {
    "diffusers": DIFFUSERS,
    "shipped": [],
    "logit-normal": ["timestep_density=logit_normal"],
    "inverse-sqrt": ["lr_scheduler=inverse_sqrt", "learning_rate=2e-3", "lr_timescale=2000"],
    "lr-2x": ["learning_rate=2e-3"],
    "post-hoc-ema": ["post_hoc_ema=[0.05, 0.10]", "post_hoc_ema_every=100"],
    "xs": ["unet_preset=emoji-xs"],
    "m": ["unet_preset=emoji-m"],
    "flow": ["prediction_type=flow", "min_snr_gamma=null"],
    # the levers that scored better than the shipped arm at 8 minutes (2026-12-07; logit-normal only within a second
    # seed's spread), together; SD3 pairs flow with logit-normal
    "combined": ["prediction_type=flow", "min_snr_gamma=null", "lr_scheduler=inverse_sqrt", "learning_rate=2e-3",
                 "lr_timescale=2000", "timestep_density=logit_normal"],
    # the same without flow, which a diffusers pipeline samples (the default must load there)
    "combined-diffusion": ["lr_scheduler=inverse_sqrt", "learning_rate=2e-3", "lr_timescale=2000",
                           "timestep_density=logit_normal"],
    "shipped-seed1": ["seed=1"],  # the shipped arm with another seed: how far one seed's FID moves
}
EXPORTED = "exported-step.txt"  # in each arm's folder: the step its final/ holds
# arms scored with another sampler than --scheduler: a flow-matching model's only one
ARM_SAMPLERS = {arm: "flow-euler" for arm, overrides in ARMS.items() if "prediction_type=flow" in overrides}
# every arm: the embedded default's autoencoder and text encoder, run by time (max_steps out of reach), no samples
COMMON = ["autoencoder=pipelines/default_model/vae", "text_encoder=minilm", "text_max_length=32", "max_steps=10000000",
          "sample_every=10000000", "checkpoint_every=10000000", "validation_every=10000000", "keep_checkpoints=1"]
QUICK = ["unet_preset=tiny", "batch_size=8", "autoencoder={autoencoder}", "text_max_length=16"]


def train_segment(arm: str, out: Path, config: str, overrides: list[str], minutes: float | None, env: dict) -> None:
    """One `max_minutes` segment of the arm (resume=auto continues the last one; None: to its max_steps); raises
    with the log's tail."""
    folder = out / arm
    command = LAUNCH + ["train_ldm.py", "--config", config, *overrides, f"output_dir={folder}",
                        *([f"max_minutes={minutes}"] if minutes else [])]
    log_path = out / f"{arm.replace('/', '-')}.log"
    with open(log_path, "a") as log:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"arm {arm} failed ({result.returncode}); {log_path} ends:\n" +
                         "\n".join(log_path.read_text().splitlines()[-5:]))
    (folder / EXPORTED).write_text(f"{last_step(folder)}\n")  # exported what its last checkpoint holds


def build_cache(arm: str, out: Path, config: str, overrides: list[str], env: dict) -> float:
    """Minutes `ldm cache` takes to build the arm's own cache in its output_dir (0 for an uncached arm): each arm
    pays for its cache, none reuses another's."""
    if "cache_latents=false" in overrides:
        return 0.0
    started = time.perf_counter()
    with open(out / f"{arm}.log", "a") as log:
        result = subprocess.run([str(BIN / "ldm"), "cache", "--config", config, *overrides,
                                 f"output_dir={out / arm}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"building arm {arm}'s cache failed; see {out / f'{arm}.log'}")
    return (time.perf_counter() - started) / 60


def last_step(folder: Path) -> int:
    """The step of the arm's last checkpoint (0 before its first segment)."""
    from core.checkpoints import list_checkpoints

    checkpoints = list_checkpoints(folder)
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["step"] if checkpoints else 0


def exported(folder: Path) -> bool:
    """Whether the arm's final/ holds its last checkpoint's weights: the trainer writes the checkpoint, then the
    export, so a stop between the two leaves final/ missing or a segment behind; each finished training process
    records the step it exported in EXPORTED (a step, not file times, which copies rewrite)."""
    marker = folder / EXPORTED
    return (folder / "final" / "config.yaml").is_file() and marker.is_file() and \
        marker.read_text().strip() == str(last_step(folder))


def reached(folder: Path) -> tuple[int, int]:
    """(step, images seen) of the arm's last export, from its last checkpoint (written with the export)."""
    import yaml

    from core.checkpoints import list_checkpoints

    step = json.loads((list_checkpoints(folder)[-1] / "trainer_state.json").read_text())["step"]
    config = yaml.safe_load((folder / "final" / "config.yaml").read_text())
    return step, step * config["batch_size"] * config["gradient_accumulation_steps"]


def score(model: Path, args, out: Path, tag: str, scheduler: str | None = None) -> float:
    """FID of `model` at --num-images training prompts (the main row of `ldm eval generate`), sampled with
    `scheduler` (default --scheduler)."""
    command = [str(BIN / "ldm"), "eval", "generate", "--model", str(model), "--data", args.data, "--num-images",
               str(args.num_images), "--sweep-images", "2", "--heldout-split", "none", "--samplers", "none",
               "--guidance-scales", "none", "--scheduler", scheduler or args.scheduler,
               "--num-inference-steps", str(args.steps),
               "--guidance-scale", str(args.guidance), "--out", str(out / "scores" / tag), "--cache-dir",
               str(out / "fid-cache")]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"scoring {model} failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "scores" / tag / "metrics.json").read_text())["train"]["fid"]


def post_hoc_model(arm_folder: Path, lengths: list[float], out: Path, tag: str) -> Path:
    """The post-hoc EMA arm's snapshot as `ldm ema` picks it by validation loss."""
    target = out / "post-hoc" / tag
    command = [str(BIN / "ldm"), "ema", str(arm_folder), "--out", str(target), "--overwrite"]
    for length in lengths:
        command += ["--sigma-rel", str(length)]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ldm ema on {arm_folder} failed: {result.stderr.strip().splitlines()[-1:]}")
    return target


REPLAYABLE = ("constant", "constant_with_warmup", "inverse_sqrt")  # the other schedules decay over max_steps


def replay_schedule(arm: str) -> str:
    """The arm's lr_scheduler: the shipped config with the arm's overrides, read as train_ldm.py reads them."""
    from core.config import read_config

    return read_config(ROOT / SHIPPED, ARMS[arm])[0]["lr_scheduler"]


def replay_rows(arm: str, record: dict, steps: list[int], args, out: Path, common: list[str],
                env: dict) -> list[dict]:
    """Scores of `arm` at earlier steps than its segments reached: the arm's recipe and seed trained again from its
    own cache (not rebuilt) to each step in `steps` on the same --threads (so the same kernels, hence the same
    weights as the arm had there), each step mapped to the arm's own minutes by its scored (step, minutes) pairs
    (`record`: the arm's entry in metrics.json)."""
    out_rows: list[dict] = []
    scored = record["rows"]
    if not scored:
        raise SystemExit(f"--replay {arm}: the arm has no scored segment yet to time its steps by")
    base = [o for o in common if not o.startswith("max_steps=")] + ARMS[arm]
    for step in sorted(set(steps)):
        if not 0 < step < scored[-1]["step"]:
            raise SystemExit(f"--replay {arm}:{step}: the arm's last scored step is {scored[-1]['step']}; replay "
                             "earlier steps only")
        folder = out / "replay" / arm
        if last_step(folder) > step:  # a step before one replayed earlier: a run of its own
            folder = out / "replay" / f"{arm}-{step}"
        if last_step(folder) < step or not exported(folder):  # to the step; or, stopped before its export, export it
            train_segment(str(folder.relative_to(out)), out, SHIPPED, base + [f"cache_dir={out / arm / 'cache'}",
                                                                              f"max_steps={step}"], None, env)
        points = [(0, 0.0)] + [(r["step"], r["training_minutes"]) for r in scored]
        (s0, m0), (s1, m1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= step <= b[0])
        minutes = m0 + (m1 - m0) * (step - s0) / (s1 - s0)  # the arm's pace over the segment holding the step
        batch = scored[-1]["images"] // scored[-1]["step"]
        fid = score(folder / "final", args, out, f"replay-{arm}-{step}", ARM_SAMPLERS.get(arm))
        out_rows.append({"minutes": round(record["cache_minutes"] + minutes, 3), "step": step, "images": step * batch,
                         "training_minutes": round(minutes, 3), "fid": fid, "replayed": True})
        print(f"{arm} (replayed): step {step} ~ {minutes:.2f} min, FID {fid:.2f}", flush=True)
    return out_rows


def all_rows(arm: dict) -> list[dict]:
    """An arm's scored segments and its replayed earlier steps, in order of minutes."""
    return sorted(arm["rows"] + arm.get("replayed", []), key=lambda r: r["minutes"])


def minutes_to_reach(rows: list[dict], fid: float, start: float = 0.0) -> tuple[float, float] | None:
    """When an arm's FID first got to `fid` or below, bracketed by the scores: (the score before, which had not yet
    reached it, or `start` (its untrained start) for the first; the first score that had). None: never within the
    budget."""
    for i, row in enumerate(rows):
        if row["fid"] <= fid:
            return (rows[i - 1]["minutes"] if i else start), row["minutes"]
    return None


def interpolated_minutes(rows: list[dict], fid: float) -> float | None:
    """When an arm's FID crossed `fid`, read off the straight line between the scores either side (None: it never
    got there, or its first score already had: nothing scored before it to draw the line from)."""
    for before, row in zip(rows, rows[1:]):
        if before["fid"] > fid >= row["fid"]:
            return before["minutes"] + (row["minutes"] - before["minutes"]) * (before["fid"] - fid) / (
                before["fid"] - row["fid"])
    return None


def table(metrics: dict) -> str:
    arms = metrics["arms"]
    reference = arms.get("diffusers", {}).get("rows")
    target = reference[-1]["fid"] if reference else None
    lines = ["| arm | minutes | images seen | s / step | FID (N = %d) | best FID | minutes to diffusers' final FID | "
             "share of diffusers' minutes | share, linear between scores |" % metrics["settings"]["num_images"],
             "|---|---|---|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        rows = all_rows(arm)
        if not rows:
            continue
        last, best = rows[-1], min(r["fid"] for r in rows)
        reach = minutes_to_reach(rows, target, arm["cache_minutes"]) if target is not None else None
        total = reference[-1]["minutes"] if reference else None
        when = "-" if reach is None else f"{reach[0]:.1f}-{reach[1]:.1f}"
        share = "-" if reach is None else f"{reach[0] / total:.2f}-{reach[1] / total:.2f}"
        between = interpolated_minutes(rows, target) if target is not None else None
        linear = "-" if between is None else f"{between / total:.2f}"
        per_step = 60 * last["training_minutes"] / last["step"]  # the step's cost: the lever's price
        lines.append(f"| {name} | {last['minutes']:.1f} | {last['images']:,} | {per_step:.2f} | {last['fid']:.1f} | "
                     f"{best:.1f} | {when} | {share} | {linear} |")
    return "\n".join(lines)


def plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    colours = plt.get_cmap("tab10").colors
    for i, (name, arm) in enumerate(metrics["arms"].items()):
        rows = all_rows(arm)
        if rows:  # past ten arms the colours repeat: square markers and dashes tell those apart
            line, = axis.plot([r["minutes"] for r in rows], [r["fid"] for r in rows], color=colours[i % 10],
                              marker="os^D"[i // 10 % 4], linestyle=["-", "--", ":", "-."][i // 10 % 4], label=name)
            replayed = [r for r in rows if r.get("replayed")]
            axis.plot([r["minutes"] for r in replayed], [r["fid"] for r in replayed], linestyle="none",
                      marker=line.get_marker(), markerfacecolor="white", color=line.get_color())  # hollow: replayed
    settings = metrics["settings"]
    cores = f"{settings['threads']} CPU thread{'s' if settings['threads'] > 1 else ''} per arm" + (
        f", {settings['parallel']} arms at a time" if settings["parallel"] > 1 else "")
    axis.set_xlabel(f"minutes: cache build + training ({cores})")
    axis.set_ylabel(f"FID, N = {metrics['settings']['num_images']} training prompts")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="diffusers,shipped", help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--budget", type=float, default=45.0, help="training minutes per arm")
    parser.add_argument("--segment", type=float, default=9.0, help="training minutes between scores")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--scheduler", default="dpm++")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--parallel", type=int, default=1,
                        help="arms trained side by side, segment by segment (each then scored alone, on every core)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per training process (default: the cores / --parallel)")
    parser.add_argument("--replay", action="append", default=[], metavar="ARM:STEP,STEP",
                        help="after the segments: also score ARM at these earlier steps (trained again from its "
                             "cache on --threads), to narrow when it first reached diffusers' final FID")
    parser.add_argument("--ema-lengths", default="0.03,0.05,0.08,0.1,0.15", help="post-hoc-ema arm's candidates")
    parser.add_argument("--quick", action="store_true",
                        help="tiny U-Net on --data with --autoencoder (a test: seconds per arm, not a measurement)")
    parser.add_argument("--autoencoder", default=None, help="--quick: the tiny autoencoder's folder")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-time-to-quality"))
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise SystemExit(f"unknown arm(s) {unknown}; valid: {', '.join(ARMS)}")
    if args.segment <= 0 or args.budget < args.segment:
        raise SystemExit("--segment must be > 0 and --budget at least one segment")
    if args.quick and not args.autoencoder:
        raise SystemExit("--quick needs --autoencoder DIR (a tiny autoencoder, e.g. the tests' fixture)")
    if args.parallel < 1:
        raise SystemExit("--parallel must be at least 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    lengths = [float(x) for x in args.ema_lengths.split(",")]
    common = COMMON + [f"data={args.data}"] + ([o.format(autoencoder=args.autoencoder) for o in QUICK] if args.quick else [])
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / "metrics.json"
    settings = {"segment": args.segment, "ema_lengths": lengths, "data": args.data, "num_images": args.num_images,
                "scheduler": args.scheduler, "steps": args.steps, "guidance": args.guidance, "quick": args.quick,
                "parallel": args.parallel, "threads": args.threads}
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {"arms": {}}
    if metrics.get("settings", settings) != settings:  # a larger --budget continues the same run
        raise SystemExit(f"{metrics_path} holds a run with other settings ({metrics['settings']}); pick another --out")
    metrics["settings"] = settings
    segments = round(args.budget / args.segment)
    train_env = {**ENV, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for arm in arms:
        if metrics["arms"].setdefault(arm, {"overrides": ARMS[arm], "rows": []})["overrides"] != ARMS[arm]:
            raise SystemExit(f"arm {arm} in {metrics_path} was trained with {metrics['arms'][arm]['overrides']}, not "
                             f"today's {ARMS[arm]}; pick another --out")
    replays: list[tuple[str, list[int]]] = []  # checked now, before any arm trains
    for spec in args.replay:
        arm, _, steps = spec.partition(":")
        parts = steps.split(",")
        if arm not in metrics["arms"] or arm == "post-hoc-ema" or not all(x.strip().isdigit() and int(x) > 0
                                                                           for x in parts):
            raise SystemExit(f"--replay {spec}: give ARM:STEP,... (whole steps above 0) for an arm of this run, not "
                             "post-hoc-ema")
        schedule = replay_schedule(arm)
        if schedule not in REPLAYABLE:
            raise SystemExit(f"--replay {arm}: its lr_scheduler={schedule} depends on max_steps, which a replay "
                             "changes")
        replays.append((arm, sorted(int(x) for x in parts)))  # steps past the arm's last score: refused after it
    if len(arms) % args.parallel:
        print(f"note: {len(arms)} arms in groups of {args.parallel}: the last group trains with fewer beside it, so "
              "faster per step (each row's 'beside' in metrics.json says with what it trained)", flush=True)
    for group in [arms[i:i + args.parallel] for i in range(0, len(arms), args.parallel)]:
        # the group's caches first, side by side on the threads its arms train with
        uncached = [a for a in group if "cache_minutes" not in metrics["arms"][a]]
        with ThreadPoolExecutor(max_workers=len(uncached) or 1) as pool:
            built = list(pool.map(lambda a: build_cache(a, args.out, SHIPPED, common + ARMS[a], train_env), uncached))
        if len(uncached) > 1 and 0.0 in built:
            print("note: an uncached arm's group mate built its cache alone", flush=True)
        for arm, minutes in zip(uncached, built):
            metrics["arms"][arm]["cache_minutes"] = round(minutes, 3)
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
        for k in range(1, segments + 1):
            # the group's arms train segment k side by side (each on --threads), then each is scored alone
            todo = [a for a in group if len(metrics["arms"][a]["rows"]) < k]
            stale = [a for a in todo if last_step(args.out / a) <= (metrics["arms"][a]["rows"][-1]["step"]
                                                                     if metrics["arms"][a]["rows"] else 0)]
            with ThreadPoolExecutor(max_workers=len(stale) or 1) as pool:  # else: trained, stopped before scoring
                list(pool.map(lambda a: train_segment(a, args.out, SHIPPED, common + ARMS[a], args.segment, train_env),
                              stale))
            for arm in todo:
                record = metrics["arms"][arm]
                if not exported(args.out / arm):  # stopped between its checkpoint and its export
                    print(f"note: {arm}'s final/ is missing or behind its last checkpoint: exporting that "
                          "checkpoint", flush=True)
                    at_step = [f"max_steps={last_step(args.out / arm)}"]  # resumed there: trains nothing, exports
                    train_segment(arm, args.out, SHIPPED, common + ARMS[arm] + at_step, None, train_env)
                step, images = reached(args.out / arm)
                model = args.out / arm / "final"
                if arm == "post-hoc-ema":
                    model = post_hoc_model(args.out / arm, lengths, args.out, f"{arm}-{k}")
                fid = score(model, args, args.out, f"{arm}-{k}", ARM_SAMPLERS.get(arm))
                record["rows"].append({"minutes": round(record["cache_minutes"] + k * args.segment, 3), "step": step,
                                       "images": images, "training_minutes": round(k * args.segment, 3), "fid": fid,
                                       "beside": [a for a in stale if a != arm] if arm in stale else None})
                metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
                print(f"{arm}: {k * args.segment:g} min, step {step}, FID {fid:.2f}", flush=True)
    for arm, steps in replays:
        done = {r["step"] for r in metrics["arms"][arm].get("replayed", [])}
        missing = [x for x in steps if x not in done]
        if missing:
            rows = replay_rows(arm, metrics["arms"][arm], missing, args, args.out, common, train_env)
            metrics["arms"][arm]["replayed"] = sorted(metrics["arms"][arm].get("replayed", []) + rows,
                                                      key=lambda r: r["step"])
            metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    (args.out / "table.md").write_text(table(metrics) + "\n")
    plot(metrics, args.out / "fid-vs-minutes.png")
    print(table(metrics))


if __name__ == "__main__":
    main()
