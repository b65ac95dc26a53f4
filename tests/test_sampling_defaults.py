"""A model folder's own sampling settings (sampling.json): what Pipeline, `ldm generate` and the page start from."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import UserError
from pipelines import Img2ImgPipeline, Pipeline
from pipelines.defaults import GUIDANCE_SCALE, NUM_INFERENCE_STEPS


def test_a_folder_without_sampling_json_keeps_the_library_defaults(tiny_model_dir):
    pipe = Pipeline(model=tiny_model_dir)
    assert (pipe.default_steps(), pipe.default_guidance_scale()) == (NUM_INFERENCE_STEPS, GUIDANCE_SCALE)


def test_the_folders_steps_and_guidance_are_the_defaults_and_arguments_still_win(tiny_model_dir):
    (tiny_model_dir / "sampling.json").write_text(json.dumps({"num_inference_steps": 3, "guidance_scale": 2.5}))
    pipe = Pipeline(model=tiny_model_dir)
    assert pipe.own_defaults() == (3, 2.5) and (pipe.default_steps(), pipe.default_guidance_scale()) == (3, 2.5)
    calls = {"n": 0}
    real = pipe.denoiser

    def counting(x, t, context):
        calls["n"] += 1
        return real(x, t, context)

    pipe.denoiser = counting
    implicit = pipe.generate("a cat", seed=1, output_type="numpy", progress=False)
    assert calls["n"] == 3  # three steps, both branches batched in one call each
    explicit = pipe.generate("a cat", num_inference_steps=3, guidance_scale=2.5, seed=1, output_type="numpy",
                             progress=False)
    assert np.array_equal(implicit, explicit)
    other = pipe.generate("a cat", num_inference_steps=3, guidance_scale=5.0, seed=1, output_type="numpy",
                          progress=False)
    assert not np.array_equal(implicit, other)
    assert Img2ImgPipeline(model=tiny_model_dir).default_steps() == 3


@pytest.mark.parametrize("content, message", [
    ({"steps": 3}, "unknown keys ['steps']"),
    ({"num_inference_steps": 0}, "num_inference_steps must be a whole number >= 1"),
    ({"guidance_scale": -1}, "guidance_scale must be a number >= 0"),
    ({"guidance_interval": [0.3, 5.0]}, "unknown keys ['guidance_interval']"),
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
