"""The walking skeleton through the real commands: ldm data emoji -> accelerate launch train_autoencoder.py ->
accelerate launch train_ldm.py -> ldm generate, on tiny configs, on CPU."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import BIN, LAUNCH, run, scalars


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    data, ae, ldm = tmp / "emoji", tmp / "ae", tmp / "ldm"
    built = run([str(BIN / "ldm"), "data", "emoji", "--out", str(data), "--size", "32", "--npm", "no",
                 "--limit", "60", "--val-fraction", "0.1"])
    run(LAUNCH + ["train_autoencoder.py", "--config", "configs/autoencoder/tiny.yaml", f"output_dir={ae}",
                  f"data={data}", "max_steps=30", "log_every=3"])
    run(LAUNCH + ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"output_dir={ldm}", f"data={data}",
                  f"autoencoder={ae}", "max_steps=30", "log_every=3"])
    return {"tmp": tmp, "data": data, "ae": ae, "ldm": ldm, "build_output": built.stdout}


def test_emoji_command_reports_counts(chain):
    assert "wrote 120 images" in chain["build_output"]


def test_autoencoder_run(chain):
    ae = chain["ae"]
    losses = scalars(ae, "train/loss")
    assert len(losses) == 10 and all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ae / "final")
    assert 0.2 < vae.config.scaling_factor < 5 and vae.config.scaling_factor != 1.0
    assert yaml.safe_load((ae / "final" / "config.yaml").read_text())["max_steps"] == 30
    for checkpoint in (ae / "checkpoints").iterdir():
        assert (checkpoint / "config.yaml").is_file() and (checkpoint / "trainer_state.json").is_file()
    grid = Image.open(ae / "samples" / "step-00000030.png")
    assert grid.size == (4 * 32, 2 * 32)  # originals above reconstructions


def test_ldm_run_exports_a_diffusers_folder(chain):
    ldm = chain["ldm"]
    losses = scalars(ldm, "train/loss")
    assert len(losses) == 10 and all(v == v for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    final = ldm / "final"
    index = json.loads((final / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["text_encoder"][1] == "BertModel"
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "scheduler/scheduler_config.json", "config.yaml"):
        assert (final / part).is_file(), part
    assert [p.name for p in (ldm / "checkpoints").iterdir()] == ["step-00000030"] or \
        sorted(p.name for p in (ldm / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    assert Image.open(ldm / "samples" / "step-00000030.png").size == (2 * 32, 32)


def test_ldm_generate_command_and_python_api(chain):
    out = chain["tmp"] / "cat.png"
    result = run([str(BIN / "ldm"), "generate", "a cat", "--model", str(chain["ldm"] / "final"), "-o", str(out),
                  "--steps", "5"])
    assert f"wrote {out}" in result.stdout
    image = Image.open(out)
    assert image.size == (32, 32) and image.mode == "RGB"
    grid = chain["tmp"] / "grid.png"
    run([str(BIN / "ldm"), "generate", "a cat", "--model", str(chain["ldm"]), "-o", str(grid), "-n", "4",
         "--steps", "3"])
    assert Image.open(grid).size == (64, 64)

    from pipelines import Pipeline

    # the Python API with the command's settings gives the command's PNG, pixel for pixel, and a picture, not a
    # constant image
    images = Pipeline("a cat", model=str(chain["ldm"] / "final")).generate(num_inference_steps=5, seed=0,
                                                                           progress=False)
    assert np.array_equal(np.asarray(images[0]), np.asarray(image))
    assert all(hi - lo > 10 for lo, hi in images[0].getextrema())


@pytest.mark.slow  # 2 launches: CI's second stage (resume=auto: test_train_ldm.py; refusal: test_checkpoints.py)
def test_resume_continues_and_refusal_protects_the_run(chain, tmp_path):
    ldm = chain["ldm"]
    refused = run(LAUNCH + ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"output_dir={ldm}",
                            f"data={chain['data']}", f"autoencoder={chain['ae']}", "resume=never"], check=False)
    assert refused.returncode != 0 and "is not empty; pass resume=auto" in refused.stderr
    resumed = run(LAUNCH + ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"output_dir={ldm}",
                            f"data={chain['data']}", f"autoencoder={chain['ae']}", "max_steps=34"])
    assert "resumed from" in resumed.stderr and "step-00000030 at step 30" in resumed.stderr
    assert json.loads((ldm / "checkpoints" / "step-00000034" / "trainer_state.json").read_text())["step"] == 34


@pytest.mark.parametrize("args, message", [
    (["max_step=3"], "unknown config key 'max_step'"),
    (["data=/nonexistent"], "dataset folder /nonexistent does not exist"),
    (["text_encoder=openai/clip-vit-base-patch32"], "is not on disk"),
])
def test_user_mistakes_give_one_clear_line(chain, tmp_path, args, message):
    result = run([sys.executable, "train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"output_dir={tmp_path / 'x'}",
                  f"data={chain['data']}", f"autoencoder={chain['ae']}", *args], check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
