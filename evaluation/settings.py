"""Sampling settings as one string each, for `ldm eval generate --settings`: sampler, steps and guidance, plus a
guidance interval, a step schedule and autoguidance, so one sweep can put them side by side:

    dpm++:20:4                       DPM-Solver++, 20 steps, guidance 4 (classifier-free)
    dpm++:20:4:interval=0.28-5.42    the same, guided only at sigma in (0.28, 5.42]
    dpm++:12:4:schedule=karras       Karras sigmas (or schedule=ays)
    dpm++:20:2:guide                 autoguidance with the --guide-model instead of the unconditional branch

Also the U-Net evaluations a setting costs, counted while it samples, and the Pareto front of FID against time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

from core.errors import UserError
from pipelines import defaults as D


@dataclass(frozen=True)
class Setting:
    scheduler: str
    steps: int
    guidance_scale: float
    interval: tuple[float, float] | None = None
    step_schedule: str | None = None
    guide: bool = False
    text: str = field(default="", compare=False)

    def generate_kwargs(self) -> dict:
        """What `Pipeline.generate` takes for this setting (the guide is switched on and off around it)."""
        return {"scheduler": self.scheduler, "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                "guidance_interval": self.interval, "step_schedule": self.step_schedule}


def parse_setting(text: str) -> Setting:
    """`SAMPLER:STEPS:GUIDANCE[:interval=LO-HI][:schedule=NAME][:guide]`, or one line saying what is wrong."""
    parts = text.strip().split(":")
    usage = "write SAMPLER:STEPS:GUIDANCE[:interval=LO-HI][:schedule=karras|ays][:guide], e.g. dpm++:20:4"
    if len(parts) < 3:
        raise UserError(f"setting '{text}': {usage}")
    try:
        steps, scale = int(parts[1]), float(parts[2])
    except ValueError:
        raise UserError(f"setting '{text}': steps must be a whole number and guidance a number; {usage}") from None
    interval, schedule, guide = None, None, False
    for extra in parts[3:]:
        key, _, value = extra.partition("=")
        if key == "interval":
            low, sep, high = value.partition("-")
            try:
                interval = (float(low), float(high))
            except ValueError:
                raise UserError(f"setting '{text}': interval=LO-HI, e.g. interval=0.28-5.42") from None
        elif key == "schedule" and value in D.STEP_SCHEDULES:
            schedule = value
        elif key == "guide" and not value:
            guide = True
        else:
            raise UserError(f"setting '{text}': unknown part '{extra}'; {usage}")
    return Setting(parts[0], steps, scale, interval, schedule, guide, text.strip())


def parse_settings(text: str | None) -> tuple[Setting, ...]:
    """A comma-separated list of settings; none or "none" = no sweep."""
    if not text or text == "none":
        return ()
    return tuple(parse_setting(item) for item in text.split(",") if item.strip())


@contextlib.contextmanager
def guide_switched(pipe, on: bool) -> Iterator[None]:
    """The pipeline's guide in use (on) or set aside (off) for the duration."""
    if on and pipe.guide_unet is None:
        raise UserError("a ':guide' setting needs a guide model: pass --guide-model DIR")
    guide = pipe.guide_unet
    pipe.guide_unet = guide if on else None
    try:
        yield
    finally:
        pipe.guide_unet = guide


@contextlib.contextmanager
def counting_calls(pipe) -> Iterator[dict]:
    """Counts the rows the main U-Net and the guide evaluate while sampling (a CFG step on B images: 2B)."""
    counts = {"unet": 0, "guide": 0}
    unet_forward, guide = pipe._unet_forward, pipe.guide_unet

    def counted_unet(x, *args, **kwargs):
        counts["unet"] += x.shape[0]
        return unet_forward(x, *args, **kwargs)

    def counted_guide(x, *args, **kwargs):
        counts["guide"] += x.shape[0]
        return guide(x, *args, **kwargs)

    pipe._unet_forward = counted_unet
    if guide is not None:
        pipe.guide_unet = counted_guide
    try:
        yield counts
    finally:
        pipe._unet_forward, pipe.guide_unet = unet_forward, guide


def pareto_front(rows: list[dict], cost: str = "seconds_per_image", quality: str = "fid") -> list[dict]:
    """The rows no other row beats on both cost and quality (lower is better for both), cheapest first."""
    front, best = [], float("inf")
    for row in sorted(rows, key=lambda r: (r[cost], r[quality])):
        if row[quality] < best:
            front.append(row)
            best = row[quality]
    return front
