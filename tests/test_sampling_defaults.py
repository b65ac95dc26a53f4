"""A model folder's own sampling settings (sampling.json): what Pipeline, `ldm generate` and the page start from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from pipelines import Img2ImgPipeline, Pipeline
from pipelines.defaults import GUIDANCE_SCALE, NUM_INFERENCE_STEPS
from helpers import count_denoiser_calls


def test_a_folder_without_sampling_json_keeps_the_library_defaults(tiny_model_dir):
    pipe = Pipeline(model=tiny_model_dir)
    assert (pipe.default_steps(), pipe.default_guidance_scale()) == (NUM_INFERENCE_STEPS, GUIDANCE_SCALE)


def test_the_folders_steps_and_guidance_are_the_defaults_and_arguments_still_win(tiny_model_dir):
    (tiny_model_dir / "sampling.json").write_text(json.dumps({"num_inference_steps": 3, "guidance_scale": 2.5}))
    pipe = Pipeline(model=tiny_model_dir)
    assert pipe.own_defaults() == (3, 2.5) and (pipe.default_steps(), pipe.default_guidance_scale()) == (3, 2.5)
    calls = count_denoiser_calls(pipe)
    implicit = pipe.generate("a cat", seed=1, output_type="numpy", progress=False)
    assert len(calls) == 3  # three steps, both branches batched in one call each
    explicit = pipe.generate("a cat", num_inference_steps=3, guidance_scale=2.5, seed=1, output_type="numpy",
                             progress=False)
    assert np.array_equal(implicit, explicit)
    other = pipe.generate("a cat", num_inference_steps=3, guidance_scale=5.0, seed=1, output_type="numpy",
                          progress=False)
    assert not np.array_equal(implicit, other)
    assert Img2ImgPipeline(model=tiny_model_dir).default_steps() == 3


def test_the_folders_guidance_interval_is_the_default_and_none_means_every_step(tiny_model_dir, tmp_path):
    (tiny_model_dir / "sampling.json").write_text(json.dumps({"num_inference_steps": 6, "guidance_interval": [0, 2]}))
    pipe = Pipeline(model=tiny_model_dir)
    calls = count_denoiser_calls(pipe)
    own = pipe.generate("a cat", seed=1, output_type="numpy", progress=False)
    assert 1 in calls and 2 in calls  # steps outside (0, 2] unguided (one branch), those inside guided (two)
    calls.clear()
    every = pipe.generate("a cat", seed=1, guidance_interval=None, output_type="numpy", progress=False)
    assert set(calls) == {2} and not np.array_equal(own, every)
    assert np.array_equal(own, pipe.generate("a cat", seed=1, guidance_interval=(0, 2), output_type="numpy",
                                             progress=False))
    with pytest.raises(UserError, match="or 'model' \\(the model's own\\), got 'every'"):
        pipe.generate("a cat", guidance_interval="every", progress=False)
    assert np.abs(own - every).max() > 2 / 255
    assert Pipeline(model=pipe.save_pretrained(tmp_path / "saved")).sampling_defaults["guidance_interval"] == (0, 2)


@pytest.mark.slow
def test_ldm_generate_takes_the_folders_interval_unless_told_every_step(tiny_model_dir, tmp_path):
    from helpers import BIN, run

    (tiny_model_dir / "sampling.json").write_text(json.dumps({"num_inference_steps": 6, "guidance_interval": [0, 2]}))
    pipe = Pipeline(model=tiny_model_dir)
    own = pipe.generate("a cat", seed=1, output_type="numpy", progress=False)
    every = pipe.generate("a cat", seed=1, guidance_interval=None, output_type="numpy", progress=False)
    assert np.abs(own - every).max() > 2 / 255  # the two runs below can tell them apart
    for extra, same_as in (([], own), (["--guide-every-step"], every)):
        out = tmp_path / f"out{len(extra)}.png"
        run([str(BIN / "ldm"), "generate", "a cat", "--model", str(tiny_model_dir), "--seed", "1", "-o", str(out),
             *extra])
        assert np.abs(np.asarray(Image.open(out), dtype=float) / 255 - same_as[0]).max() <= 1 / 255


def test_the_folders_step_schedule_applies_to_its_own_scheduler_only(tiny_model_dir):
    (tiny_model_dir / "sampling.json").write_text(json.dumps({"step_schedule": "karras"}))
    pipe = Pipeline(model=tiny_model_dir)
    own = pipe.prepare_scheduler(None, 5)
    assert own.config.use_karras_sigmas  # the model's own sampler, placed by its own schedule
    assert not pipe.prepare_scheduler(None, 5, step_schedule=None).config.use_karras_sigmas  # None: sampler's own
    assert not pipe.prepare_scheduler("euler", 5).config.use_karras_sigmas  # another sampler: its own spacing
    assert pipe.prepare_scheduler("euler", 5, step_schedule="karras").config.use_karras_sigmas


@pytest.mark.parametrize("content, message", [
    ({"steps": 3}, "unknown keys ['steps']"),
    ({"num_inference_steps": 0}, "num_inference_steps must be a whole number >= 1"),
    ({"guidance_scale": -1}, "guidance_scale must be a number >= 0"),
    ({"guidance_interval": [0.3]}, "guidance_interval must be [sigma_lo, sigma_hi] or null"),
    ({"step_schedule": "cosine"}, "step_schedule must be one of karras, ays or null"),
])
def test_a_bad_sampling_json_is_one_line_naming_the_file(tiny_model_dir, content, message):
    (tiny_model_dir / "sampling.json").write_text(json.dumps(content))
    with pytest.raises(UserError) as error:
        Pipeline(model=tiny_model_dir)
    assert message in str(error.value) and "sampling.json" in str(error.value)


def test_saving_and_exporting_keep_the_folders_own_settings(tiny_model_dir, tmp_path):
    from pipelines.loading import save_slim_model_folder

    (tiny_model_dir / "sampling.json").write_text(json.dumps({"num_inference_steps": 3, "guidance_scale": 2.5}))
    pipe = Pipeline(model=tiny_model_dir)
    assert Pipeline(model=pipe.save_pretrained(tmp_path / "saved")).own_defaults() == (3, 2.5)
    slim = save_slim_model_folder(tmp_path / "slim", pipe.vae, pipe.unet, pipe.model_scheduler, "minilm", 16,
                                  sampling=pipe.sampling_defaults)
    assert "sampling.json" in json.loads((slim / "checksums.json").read_text())  # it changes what the model draws
    assert Pipeline(model=slim).own_defaults() == (3, 2.5)


@pytest.mark.parametrize("content, message", [
    ({"guidance_interval": [20.0, 30.0]}, "lies outside this model's noise levels"),
    ({"step_schedule": "ays", "num_inference_steps": 1}, "needs at least 2 steps"),
])
def test_settings_that_do_not_fit_the_model_are_refused_at_load_naming_the_file(tiny_model_dir, content, message):
    (tiny_model_dir / "sampling.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match=message) as error:
        Pipeline(model=tiny_model_dir)
    assert "sampling.json" in str(error.value)
