"""The embedded default model: it loads offline from the repository and draws, seeded, what it drew when shipped."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from cli.main import main as ldm_main
from core.errors import UserError
from pipelines import Pipeline
from pipelines.loading import DEFAULT_MODEL_DIR

# measured when the fifth release shipped (2026-12-07: the fourth release's U-Net + 3,100 cosine-decayed CPU steps of
# 64, with the continued decoder). Tolerances tight enough that one decoder swapped under the same U-Net fails (the
# decoder before the continued one moved the mean by 6e-4 and a channel by 1.6e-3)
PINNED_MEAN, PINNED_STD = 0.74743, 0.29395


@pytest.fixture(scope="module")
def default_pipe():
    return Pipeline("a cat")


def test_default_generates_seeded_images_of_the_pinned_statistics(default_pipe):
    # the weights' pins: the sampling settings of 2026-11-26 given explicitly (the folder's own may change apart)
    images = default_pipe.generate(num_images=2, num_inference_steps=4, guidance_scale=5.0, guidance_interval=None,
                                   step_schedule=None, seed=0, scheduler="dpm++", output_type="numpy",
                                   progress=False)
    assert images.shape == (2, 64, 64, 3)
    assert 0 <= images.min() and images.max() <= 1
    # a different value means the weights or the sampling math changed
    assert images.mean() == pytest.approx(PINNED_MEAN, abs=3e-4)
    assert images.std() == pytest.approx(PINNED_STD, abs=3e-4)
    # per channel and per 16x16 cell (grey), so a channel swap or a flip fails too (2026-12-02)
    assert images.mean(axis=(0, 1, 2)) == pytest.approx([0.9128, 0.7656, 0.5639], abs=3e-4)
    cells = images[0].mean(axis=2).reshape(4, 16, 4, 16).mean(axis=(1, 3)).flatten()
    assert cells == pytest.approx([0.8047, 0.9116, 0.9510, 0.8130, 0.8276, 0.6766, 0.6709, 0.8030,
                                   0.7040, 0.6771, 0.6373, 0.6872, 0.9322, 0.6746, 0.6375, 0.9264], abs=1e-3)


def test_default_is_the_shipped_recipe(default_pipe):
    reference = json.loads((DEFAULT_MODEL_DIR / "text_encoder.json").read_text())
    assert reference == {"name": "minilm", "max_length": default_pipe.text_encoder.max_length}
    assert not (DEFAULT_MODEL_DIR / "text_encoder").exists()  # MiniLM comes from its package, not a second copy
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 25e6
    assert Pipeline.from_pretrained().unet.config == default_pipe.unet.config


def test_the_default_samples_with_its_own_measured_settings(default_pipe):
    """sampling.json (2026-12-06, docs/evaluation.md): 10 DPM-Solver++ steps placed by Align Your Steps, guidance
    4 (half the U-Net calls of 20 evenly spaced steps, a third of the earlier default's 30); checksummed like the
    weights."""
    from pipelines.schedulers import ays_timesteps

    assert default_pipe.sampling_defaults == {"num_inference_steps": 10, "guidance_scale": 4.0,
                                              "step_schedule": "ays"}
    sampler = default_pipe.prepare_scheduler(None, 10)
    assert sampler.timesteps.tolist() == list(ays_timesteps(10))
    assert "sampling.json" in json.loads((DEFAULT_MODEL_DIR / "checksums.json").read_text())
    calls = []
    real = default_pipe.denoiser
    default_pipe.denoiser = lambda x, t, context: calls.append(x.shape[0]) or real(x, t, context)
    try:
        default_pipe.generate(seed=0, progress=False)
    finally:
        default_pipe.denoiser = real
    assert calls == [2] * 10  # ten steps, both guidance branches in one call each


def test_save_pretrained_of_the_default_loads_in_diffusers(default_pipe, tmp_path):
    folder = default_pipe.save_pretrained(tmp_path / "sd")
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler).__name__ == "DPMSolverMultistepScheduler"  # the default sampler on both sides
    # the default's own settings on both sides: diffusers takes Align Your Steps as `timesteps=`
    from pipelines.schedulers import ays_timesteps

    expected = theirs("a cat", timesteps=list(ays_timesteps(10)), guidance_scale=4.0, output_type="np",
                      generator=torch.Generator().manual_seed(3)).images
    got = default_pipe.generate(seed=3, output_type="numpy", progress=False)
    np.testing.assert_allclose(got, expected, atol=1 / 255)


def test_cli_generates_with_the_default(tmp_path, capsys):
    out = tmp_path / "cat.png"
    ldm_main(["generate", "a cat", "-o", str(out), "--steps", "4"])
    assert out.is_file() and "64x64" in capsys.readouterr().out


def test_a_corrupted_or_missing_default_weight_is_named(tmp_path, monkeypatch):
    import pipelines.loading as loading

    copy = tmp_path / "default_model"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", copy)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match="vae/diffusion_pytorch_model.safetensors is corrupted.*git checkout"):
        Pipeline("a cat")
    (copy / "model_index.json").unlink()
    with pytest.raises(UserError, match="embedded default model is missing.*git checkout"):
        Pipeline("a cat")
