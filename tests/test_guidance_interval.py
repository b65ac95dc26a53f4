"""Limited-interval classifier-free guidance (Kynkaanniemi et al. 2024): the call count and pixels it gives, the
diffusers step-end callback recipe of docs/generating.md held to our pixels, and the bad intervals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from core.errors import UserError
from pipelines import InpaintPipeline, Pipeline

ROOT = Path(__file__).resolve().parents[1]


def _counting(pipe):
    """Record the batch size of every U-Net call."""
    calls, forward = [], pipe._unet_forward

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return forward(x, *args, **kwargs)
    pipe._unet_forward = counted
    return calls


def test_steps_outside_the_interval_make_one_call_and_the_pixels_follow(tiny_model_dir):
    pipe = Pipeline(model=tiny_model_dir)
    calls = _counting(pipe)
    sigmas = [pipe.noise_schedule.sigma_at(t) for t in _timesteps(pipe, 10)]
    kwargs = dict(num_inference_steps=10, guidance_scale=4.0, seed=0, output_type="numpy", progress=False)
    plain = pipe.generate(["a cat", "red apple"], **kwargs)
    assert calls == [4] * 10  # two prompts, two branches, every step
    calls.clear()
    interval = (0.5, 3.0)
    limited = pipe.generate(["a cat", "red apple"], guidance_interval=interval, **kwargs)
    inside = [0.5 < s <= 3.0 for s in sigmas]
    assert calls == [4 if on else 2 for on in inside] and 0 < sum(inside) < 10
    assert np.abs(plain - limited).max() > 0.01  # the unguided steps change the picture
    calls.clear()
    everywhere = pipe.generate(["a cat", "red apple"], guidance_interval=(0.0, 1e6), **kwargs)
    assert calls == [4] * 10 and np.array_equal(everywhere, plain)  # an interval holding every step = plain CFG
    calls.clear()
    guidance_one = pipe.generate(["a cat", "red apple"], **{**kwargs, "guidance_scale": 1.0})
    between = sorted(sigmas)[:2]  # between the two lowest steps' sigmas: no step guided = the conditional model
    nowhere = pipe.generate(["a cat", "red apple"], guidance_interval=(between[0] * 1.01, between[1] * 0.99), **kwargs)
    assert calls == [2] * 20 and np.array_equal(guidance_one, nowhere)


def _timesteps(pipe, steps):
    sampler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sampler.set_timesteps(steps)
    return sampler.timesteps


def _recipe():
    """The code block of docs/generating.md's guidance-interval recipe, run as it stands."""
    text = (ROOT / "docs" / "generating.md").read_text()
    code = re.search(r"<!-- guidance-interval-recipe -->\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/generating.md", "exec"), namespace)
    return namespace["generate_with_interval"]


@pytest.mark.parametrize("interval", [(0.5, 3.0), (0.0, 1.0), (2.0, 1e6)])
def test_the_diffusers_callback_recipe_gives_our_pixels(tiny_model_dir, interval):
    ours = Pipeline(model=tiny_model_dir).generate("a cat", num_inference_steps=8, guidance_scale=4.0, seed=2,
                                                   guidance_interval=interval, output_type="numpy", progress=False)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    images = _recipe()(theirs, "a cat", 4.0, interval, 8, generator=torch.Generator().manual_seed(2),
                       output_type="np").images
    assert np.abs(ours - images).max() <= 1 / 255
    plain = theirs("a cat", num_inference_steps=8, guidance_scale=4.0, generator=torch.Generator().manual_seed(2),
                   output_type="np").images
    assert np.abs(plain - images).max() > 1 / 255  # the recipe is not plain guidance in disguise


def test_the_inpainting_pipeline_takes_the_interval(tiny_model_dir):
    pipe = InpaintPipeline(model=tiny_model_dir)
    calls = _counting(pipe)
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    pipe.generate("a cat", image=image, mask_image=mask, num_inference_steps=6, guidance_scale=4.0, seed=0,
                  guidance_interval=(0.5, 3.0), progress=False)
    assert calls == [2 if 0.5 < pipe.noise_schedule.sigma_at(t) <= 3.0 else 1 for t in _timesteps(pipe, 6)]
    assert 1 in calls and 2 in calls


@pytest.mark.parametrize("interval, message", [
    ((3.0, 1.0), "empty or reversed"),
    ((1.0, 1.0), "empty or reversed"),
    ((-1.0, 2.0), "must be a number >= 0"),
    ((float("nan"), 2.0), "finite number"),
    ((0.5, float("inf")), "finite number"),
    ((100.0, 200.0), "outside this model's noise levels"),
    ((0.0, 0.01), "outside this model's noise levels"),
    ((1.0,), "must be a pair"),
    ("0.1 5", "must be a pair"),
])
def test_bad_intervals_are_one_line_before_any_work(tiny_model_dir, interval, message):
    pipe = Pipeline(model=tiny_model_dir)
    calls = _counting(pipe)
    with pytest.raises(UserError, match=message):
        pipe.generate("a cat", num_inference_steps=2, guidance_interval=interval, progress=False)
    assert calls == []


def test_the_command_line_takes_the_interval(tiny_model_dir, tmp_path):
    from cli.main import main as ldm_main
    from PIL import Image

    out = tmp_path / "cat.png"
    ldm_main(["generate", "a cat", "--model", str(tiny_model_dir), "-o", str(out), "--num-inference-steps", "4",
              "--guidance-interval", "0.5", "3", "--seed", "1"])
    expected = Pipeline(model=tiny_model_dir).generate("a cat", num_inference_steps=4, seed=1,
                                                       guidance_interval=(0.5, 3.0), progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_the_page_takes_an_interval_and_a_step_schedule_and_records_them(tiny_model_dir):
    """The Generate tab's interval box and step-schedule menu reach the pipeline (the same pixels as the API) and
    the PNG's settings; a malformed interval is one line on the page."""
    import json

    pytest.importorskip("gradio")
    import gradio as gr

    from web.app import build_app

    app = build_app(model=str(tiny_model_dir))
    generate = next(f.fn for f in app.fns.values() if f.fn.__name__ == "generate")
    history, _, _ = generate("a cat", "", "model's own", 6, 3.0, 5, False, 1, 32, [], "none", 1.0, False,
                             "0.5-3", "karras")
    image = history[0][0]
    settings = json.loads(image.info["parameters"])
    assert (settings["guidance_interval"], settings["step_schedule"]) == ([0.5, 3.0], "karras")
    expected = Pipeline(model=tiny_model_dir).generate("a cat", num_inference_steps=6, guidance_scale=3.0, seed=5,
                                                       guidance_interval=(0.5, 3.0), step_schedule="karras",
                                                       height=32, width=32, progress=False)[0]
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    for interval, message in (("0.5", "LO-HI"), ("3-0.5", "empty or reversed")):
        with pytest.raises(gr.Error, match=message):
            generate("a cat", "", "model's own", 2, 3.0, 5, False, 1, 32, [], "none", 1.0, False, interval,
                     "sampler's own")
