"""Sampling latency: our Pipeline vs diffusers' StableDiffusionPipeline on the same model folder, in one process.

Same prompt, seed, scheduler (DDIM), steps and guidance; warm-up excluded; the two alternate call by call and the
median of `--repeats` is reported as ms/image, with the ratio ours / diffusers, the max abs pixel difference between
their outputs, and the peak RSS each call needed above its start. Without `--model`, a randomly initialised model
of the default recipe's shape (kl-f4 autoencoder, emoji-l U-Net, MiniLM) is used: speed does not depend on weights.

    python benchmarks/sample_latency.py [--model DIR] [--steps 20 50] [--batch 1 4] [--repeats 5] [--compile]
        [--levers] [--threads N]

`--levers` times the CPU inference levers on our Pipeline, each row with its max abs pixel difference from diffusers'
output (equal images within one 8-bit level is the condition) and the seconds of its first call (compilation):
channels_last memory format for the U-Net and VAE; torch.compile (inductor); torch.compile with inductor freezing
(weights folded in as constants, oneDNN convolutions prepacked). `--threads` sets torch's intra-op threads. Each
variant's calls alternate with diffusers' call by call; its ratio is against the diffusers calls of its own phase (the
two compiled variants run in separate phases: dynamo would otherwise reuse one variant's graph for the other).

`--student DIR` times a consistency-distilled student (recipes/consistency.py; the lcm sampler, one U-Net call per
step) against its teacher (`--model`, default the embedded default) at `--teacher-steps` DPM-Solver++ steps, each on
our Pipeline and on diffusers' StableDiffusionPipeline, calls alternating; plus the fixed costs every call pays (prompt
encoding, decoding the latents). `--teacher-own` times the teacher with its own sampling settings instead (its
folder's sampling.json: steps, guidance and step schedule; diffusers given the same timesteps), the way `Pipeline()`
samples it:

    python benchmarks/sample_latency.py --student runs/lcm/final --student-steps 1 2 4 8 --batch 1 8
    python benchmarks/sample_latency.py --student STUDENT --teacher-own --student-steps 2 4 --batch 1 8
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import random_default_shaped_model  # noqa: E402


def timed(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def peak_memory_mb(side: str, model: Path, steps: int, batch: int, guidance: float) -> float:
    """Peak RSS of a fresh process that loads one side's pipeline and generates once (MB)."""
    result = subprocess.run([sys.executable, __file__, "--child", side, "--model", str(model), "--steps", str(steps),
                             "--batch", str(batch), "--guidance", str(guidance)], capture_output=True, text=True,
                            check=True)
    return float(result.stdout.strip().splitlines()[-1])


def child(side: str, model: Path, steps: int, batch: int, guidance: float) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipelines import Pipeline

    if side == "ours":
        Pipeline.from_pretrained(model).generate("a cat", num_images=batch, num_inference_steps=steps, seed=0,
                                                 guidance_scale=guidance, scheduler="ddim", progress=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe("a cat", num_images_per_prompt=batch, num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(0))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def levers(args) -> None:
    """One row per (steps, batch, variant): ms/image, ratio to diffusers, max abs diff to diffusers, first call."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from pipelines import Pipeline

    diffusers_logging.set_verbosity_error()
    model = Path(args.model) if args.model else random_default_shaped_model(Path(tempfile.mkdtemp()) / "model")
    theirs = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    eager = Pipeline.from_pretrained(model)
    channels_last = Pipeline.from_pretrained(model)
    for module in (channels_last.unet, channels_last.vae):
        module.to(memory_format=torch.channels_last)
    variants = {"ours": (eager, {}), "ours + channels_last": (channels_last, {}),
                "ours + compile": (Pipeline.from_pretrained(model).compile(), {}),
                "ours + compile + freezing": (Pipeline.from_pretrained(model).compile(), {"freezing": True})}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model or 'random emoji-l'}; "
          f"DDIM, guidance {args.guidance}, median of {args.repeats}")
    print("| steps | batch | variant | ms/img | vs diffusers | max abs diff vs diffusers | first call s |")
    print("|---|---|---|---|---|---|---|")
    import torch._inductor.config as inductor_config

    # dynamo keeps one graph per code object, so the two compiled variants cannot alternate in one process: each
    # phase compiles at most one, and its calls alternate with diffusers' (and the eager variants') call by call
    phases = (("ours", "ours + channels_last", "ours + compile"), ("ours + compile + freezing",))
    for steps in args.steps:
        for batch in args.batch:
            def run_theirs():
                return theirs("a cat", num_images_per_prompt=batch, num_inference_steps=steps,
                              guidance_scale=args.guidance, generator=torch.Generator().manual_seed(0),
                              output_type="np").images

            first, outputs, ratios, ms = {}, {}, {}, {}
            first["diffusers"], reference = timed(run_theirs)
            for phase in phases:
                torch._dynamo.reset()
                calls = {"diffusers": run_theirs}
                for name in phase:
                    pipe, patch = variants[name]
                    calls[name] = functools.partial(pipe.generate, "a cat", num_images=batch,
                                                    num_inference_steps=steps, seed=0, scheduler="ddim",
                                                    guidance_scale=args.guidance, output_type="numpy",
                                                    progress=False)
                    with inductor_config.patch(patch):  # freezing is read when the graph compiles, at the first call
                        first[name], outputs[name] = timed(calls[name])
                times = {name: [] for name in calls}
                for _ in range(args.repeats):
                    for name, call in calls.items():
                        times[name].append(timed(call)[0])
                phase_ms = {name: statistics.median(t) * 1000 / batch for name, t in times.items()}
                ms.setdefault("diffusers", phase_ms["diffusers"])
                for name in phase:
                    ms[name], ratios[name] = phase_ms[name], phase_ms[name] / phase_ms["diffusers"]
            print(f"| {steps} | {batch} | diffusers | {ms['diffusers']:.0f} | 1.00 | 0 | {first['diffusers']:.1f} |")
            for name in variants:
                diff = float(np.abs(outputs[name] - reference).max())
                print(f"| {steps} | {batch} | {name} | {ms[name]:.0f} | {ratios[name]:.2f} | {diff:.1e} | "
                      f"{first[name]:.1f} |", flush=True)


def student_rows(args) -> None:
    """ms/image of the student at each step count and the teacher at --teacher-steps, ours and diffusers', and the
    ratios; the fixed costs measured alone."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from pipelines import Pipeline
    from pipelines.loading import resolve_model_path
    from pipelines.schedulers import ays_timesteps

    diffusers_logging.set_verbosity_error()
    teacher_dir, student_dir = resolve_model_path(args.model), resolve_model_path(args.student)
    teacher, student = Pipeline(model=teacher_dir), Pipeline(model=student_dir)
    full = Path(tempfile.mkdtemp())  # slim folders name their text encoder; diffusers needs a copy of it
    theirs = {name: StableDiffusionPipeline.from_pretrained(pipe.save_pretrained(full / name), safety_checker=None)
              for name, pipe in (("teacher", teacher), ("student", student))}
    theirs["teacher"].scheduler = DPMSolverMultistepScheduler.from_config(theirs["teacher"].scheduler.config)
    for pipe in theirs.values():
        pipe.set_progress_bar_config(disable=True)
    steps_t, guidance_t, schedule = args.teacher_steps, args.guidance, None
    if args.teacher_own:  # the teacher's own settings (sampling.json), as Pipeline() samples it
        steps_t, guidance_t = teacher.own_defaults()
        schedule = teacher.sampling_defaults.get("step_schedule")
        # what diffusers' side can be given the same way: DPM-Solver++, plain or AYS steps, guidance at every step
        if type(teacher.model_scheduler).__name__ != "DPMSolverMultistepScheduler" or schedule not in (None, "ays") \
                or teacher.sampling_defaults.get("guidance_interval") is not None or guidance_t <= 1:
            raise SystemExit("--teacher-own times teachers that sample with DPM-Solver++ (plain or AYS steps) and "
                             "guidance > 1 at every step, as the embedded default does; pass --teacher-steps instead")
    sampler_t = "dpm++" + (f" {schedule}" if schedule else "")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; teacher {teacher_dir} ({sampler_t} {steps_t}, "
          f"guidance {guidance_t:g}), student {student_dir} (lcm, guidance {args.guidance:g}); median of "
          f"{args.repeats}, calls alternating")
    print("| batch | model | sampler | steps | U-Net calls | ours ms/img | diffusers ms/img | ours / our teacher "
          f"{steps_t} | ours / diffusers' teacher {steps_t} | diffusers / diffusers' teacher {steps_t} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        prompts = ["a cat"] * batch

        def ours(pipe, steps, scheduler, guidance=args.guidance):
            if scheduler is None:  # the model's own sampler, steps, guidance and step schedule
                return lambda: pipe.generate(prompts, seed=0, output_type="numpy", progress=False)
            return lambda: pipe.generate(prompts, num_inference_steps=steps, seed=0, scheduler=scheduler,
                                         guidance_scale=guidance, output_type="numpy", progress=False)

        def diffusers_call(name, steps, guidance=args.guidance, timesteps=None):
            placement = {"num_inference_steps": steps} if timesteps is None else {"timesteps": timesteps}
            return lambda: theirs[name](prompts, guidance_scale=guidance, **placement,
                                        generator=torch.Generator().manual_seed(0), output_type="np").images

        latents = torch.randn(batch, 4, 16, 16)
        timesteps_t = ays_timesteps(steps_t) if schedule == "ays" else None
        calls = {("teacher", steps_t, "ours"): ours(teacher, steps_t, None if args.teacher_own else "dpm++"),
                 ("teacher", steps_t, "diffusers"): diffusers_call("teacher", steps_t, guidance_t, timesteps_t),
                 "encode": lambda: student.text_embeddings(prompts),
                 "decode": lambda: student.decode(latents, "numpy")}
        for steps in args.student_steps:
            calls[("student", steps, "ours")] = ours(student, steps, "lcm")
            calls[("student", steps, "diffusers")] = diffusers_call("student", steps)
        times = {key: [] for key in calls}
        with torch.inference_mode():
            for call in calls.values():
                call()  # warm-up
            for _ in range(args.repeats):
                for key, call in calls.items():
                    times[key].append(timed(call)[0])
        ms = {key: statistics.median(t) * 1000 / batch for key, t in times.items()}
        base_ours, base_theirs = ms[("teacher", steps_t, "ours")], ms[("teacher", steps_t, "diffusers")]
        rows = [("teacher", sampler_t, steps_t, 2 * steps_t)] + [("student", "lcm", n, n) for n in args.student_steps]
        for name, sampler, steps, unet_calls in rows:
            mine, other = ms[(name, steps, "ours")], ms[(name, steps, "diffusers")]
            print(f"| {batch} | {name} | {sampler} | {steps} | {unet_calls} | {mine:.1f} | {other:.1f} | "
                  f"{mine / base_ours:.3f} | {mine / base_theirs:.3f} | {other / base_theirs:.3f} |")
        print(f"| {batch} | fixed costs | prompt encoding | | | {ms['encode']:.1f} | | | | |")
        print(f"| {batch} | fixed costs | decoding | | | {ms['decode']:.1f} | | | | |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: random weights, default recipe's shape)")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--compile", action="store_true", help="also time our Pipeline after .compile()")
    parser.add_argument("--levers", action="store_true", help="time the inference levers instead (see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--student", help="a consistency student's folder: time it against --model (see above)")
    parser.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--teacher-steps", type=int, default=20)
    parser.add_argument("--teacher-own", action="store_true",
                        help="time the teacher with its own sampling settings (sampling.json) instead of "
                             "--teacher-steps DPM-Solver++ steps at --guidance")
    parser.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, Path(args.model), args.steps[0], args.batch[0], args.guidance)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.levers:
        return levers(args)
    if args.student:
        return student_rows(args)

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from pipelines import Pipeline

    diffusers_logging.set_verbosity_error()
    model = Path(args.model) if args.model else random_default_shaped_model(Path(tempfile.mkdtemp()) / "model")
    ours = Pipeline.from_pretrained(model)
    theirs = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    compiled = Pipeline.from_pretrained(model).compile() if args.compile else None

    def run_ours(pipe, steps, batch):
        return lambda: pipe.generate("a cat", num_images=batch, num_inference_steps=steps, seed=0, scheduler="ddim",
                                     guidance_scale=args.guidance, output_type="numpy", progress=False)

    def run_theirs(steps, batch):
        return lambda: theirs("a cat", num_images_per_prompt=batch, num_inference_steps=steps,
                              guidance_scale=args.guidance, generator=torch.Generator().manual_seed(0),
                              output_type="np").images

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model or 'random emoji-l'}; "
          f"DDIM, guidance {args.guidance}, median of {args.repeats}")
    header = ("| steps | batch | diffusers ms/img | ours ms/img | ours/diffusers | max abs diff "
              "| diffusers peak RSS MB | ours peak RSS MB |")
    if compiled is not None:
        header += " ours+compile ms/img | compile/diffusers |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for steps in args.steps:
        for batch in args.batch:
            candidates = {"theirs": run_theirs(steps, batch), "ours": run_ours(ours, steps, batch)}
            if compiled is not None:
                candidates["compiled"] = run_ours(compiled, steps, batch)
            results = {name: [] for name in candidates}
            for fn in candidates.values():
                fn()  # warm-up (and compilation)
            for _ in range(args.repeats):
                for name, fn in candidates.items():
                    results[name].append(timed(fn))
            ms = {name: statistics.median(r[0] for r in rs) * 1000 / batch for name, rs in results.items()}
            peak = {name: peak_memory_mb(side, model, steps, batch, args.guidance)
                    for name, side in (("theirs", "diffusers"), ("ours", "ours"))}
            diff = float(np.abs(results["ours"][0][1] - results["theirs"][0][1]).max())
            row = (f"| {steps} | {batch} | {ms['theirs']:.0f} | {ms['ours']:.0f} | {ms['ours'] / ms['theirs']:.2f} "
                   f"| {diff:.1e} | {peak['theirs']:.0f} | {peak['ours']:.0f} |")
            if compiled is not None:
                row += f" {ms['compiled']:.0f} | {ms['compiled'] / ms['theirs']:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
