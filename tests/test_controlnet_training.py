"""The ControlNet recipe (recipes/controlnet.py): control maps cached beside the latents, the base frozen, the export a
diffusers ControlNet recording its base; through `accelerate launch train_ldm.py` (resume bit-exact, 2 ranks); one
clear line for each bad setting; `ldm eval control` (evaluation/control.py) and its edge F1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from cli.training_args import ldm_config
from core.data.dataset import ImageCaptionDataset, load_image_caption_dataset
from core.errors import UserError
from ldm.cache import CachedLatents
from ldm.control import control_map, control_tensor
from ldm.lora import base_fingerprint
from pipelines import Pipeline
from recipes.controlnet import ControlNetTrainConfig, ControlNetTrainer
from helpers import LAUNCH, ROOT, TWO_RANKS, run, scalars

CONFIG = ROOT / "configs" / "ldm" / "tiny-controlnet.yaml"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_control_tensor_is_the_map_a_user_would_pass():
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    maps = control_tensor(pixels, "canny")
    assert maps.dtype == torch.uint8 and maps.shape == (2, 3, 16, 16)
    image = Image.fromarray(((pixels[1].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy())
    assert np.array_equal(maps[1].permute(1, 2, 0).numpy(), np.asarray(control_map(image, "canny")))


def test_a_photo_is_resized_before_the_detector_as_training_sees_maps():
    from ldm.control import control_input

    small = np.full((32, 32, 4), 0, np.uint8)  # transparent, as emoji PNGs are: composited on white
    small[8:24, 10:22] = (40, 120, 220, 255)
    photo = Image.fromarray(small, "RGBA").resize((256, 256), Image.Resampling.NEAREST)
    fed = np.asarray(control_input(photo, "canny", 32, 32))
    assert fed.shape == (32, 32, 3) and set(np.unique(fed)) == {0, 255}  # crisp edges, not shrunk ones
    on_white = Image.alpha_composite(Image.new("RGBA", (256, 256), "white"), photo).convert("RGB")
    assert np.array_equal(fed, np.asarray(control_map(on_white.resize((32, 32), Image.Resampling.BICUBIC), "canny")))
    shrunk = np.asarray(control_map(on_white, "canny").resize((32, 32), Image.Resampling.BICUBIC))
    assert shrunk.max() < 255 // 2  # what detecting first would feed: faint edges
    ready = Image.fromarray(np.kron(fed[..., 0], np.ones((8, 8), np.uint8)))  # a map drawn at 256 px
    assert np.array_equal(np.asarray(control_input(ready, "none", 32, 32)), fed)  # nearest keeps its values


def test_a_controlnet_run_caches_the_maps_trains_only_the_controlnet_and_exports_it(emoji_dir, base_model_dir,
                                                                                     tmp_path):
    from cli.main import main as ldm_main

    out = tmp_path / "cn"
    overrides = [f"data={emoji_dir}", f"init_from={base_model_dir}", f"output_dir={out}", "max_steps=3",
                 "sample_every=3", "checkpoint_every=3", "learning_rate=0.01"]
    ldm_main(["cache", "--config", str(CONFIG), *overrides])  # built ahead by `ldm cache`: the recipe's own cache
    config = ldm_config(CONFIG, overrides)
    assert isinstance(config, ControlNetTrainConfig) and config.text_max_length == 16  # the base's, inherited
    trainer = ControlNetTrainer(config)
    final = trainer.run()

    # the cache holds each image's Canny map as uint8, the same map as computed from the image's pixels
    [cache_folder] = [p for p in (out / "cache").iterdir() if p.is_dir()]  # training found the one `ldm cache` built
    assert json.loads((cache_folder / "spec.json").read_text())["control_type"] == "canny"
    cached = CachedLatents(cache_folder, 1)
    images = ImageCaptionDataset(load_image_caption_dataset(str(emoji_dir), "train"), 32)
    for i in (0, 5, len(cached) - 1):
        row = cached[i]
        expected = control_tensor(images[int(row["index"])]["pixel_values"][None], "canny")[0]
        assert row["control"].dtype == torch.uint8 and torch.equal(row["control"], expected)
    assert any(cached[i]["control"].any() for i in range(len(cached)))  # edges, not blank maps

    # the base U-Net was not trained; the ControlNet's zero convolutions were
    base = UNet2DConditionModel.from_pretrained(base_model_dir / "unet")
    assert all(torch.equal(a, b) for a, b in zip(trainer.unet.state_dict().values(), base.state_dict().values()))
    controlnet = ControlNetModel.from_pretrained(final)
    assert controlnet.controlnet_mid_block.weight.abs().max() > 0
    info = json.loads((final / "controlnet.json").read_text())
    assert info["control_type"] == "canny" and info["base_fingerprint"] == base_fingerprint(base)
    assert (final / "config.yaml").is_file()

    # grid: sources, maps, base samples, controlled samples (2 held-out images, 32 px)
    assert Image.open(out / "samples" / "step-00000003.png").size == (2 * 32, 4 * 32)
    pipe = Pipeline(model=base_model_dir, controlnet=out)  # a run's output_dir resolves to final/
    control = control_map(Image.new("RGB", (32, 32), "white"), "canny")
    assert pipe.generate("a cat", control_image=control, num_inference_steps=2, progress=False)[0].size == (32, 32)


def _config(*overrides):
    return ldm_config(CONFIG, ["output_dir=/tmp/never", "data=somewhere", *overrides])


def test_bad_controlnet_settings_are_refused_with_what_is_supported(base_model_dir, tmp_path):
    with pytest.raises(UserError, match="controlnet=true needs a base: add init_from"):
        _config()
    with pytest.raises(UserError, match="unknown control_type 'depth'; valid: canny, colour"):
        _config(f"init_from={base_model_dir}", "control_type=depth")
    with pytest.raises(UserError, match="lora cannot be combined with controlnet=true"):
        _config(f"init_from={base_model_dir}", "lora=true")
    with pytest.raises(UserError, match="post_hoc_ema cannot be combined with controlnet=true"):
        _config(f"init_from={base_model_dir}", "post_hoc_ema=[0.05]")
    with pytest.raises(UserError, match="distill=true and controlnet=true: a run trains one of these recipes"):
        _config(f"init_from={base_model_dir}", "distill=true")
    with pytest.raises(UserError, match="sample_images must be at least 1"):
        _config(f"init_from={base_model_dir}", "sample_images=0")
    with pytest.raises(UserError, match="text_max_length=8 differs from"):
        _config(f"init_from={base_model_dir}", "text_max_length=8")


@pytest.mark.slow  # about 90 s: CI's second stage
def test_controlnet_training_through_accelerate_launch_resumes_bit_exactly_and_runs_on_two_ranks(emoji_dir,
                                                                                                   base_model_dir,
                                                                                                   tmp_path):
    common = ["train_ldm.py", "--config", str(CONFIG), f"data={emoji_dir}", f"init_from={base_model_dir}",
              "checkpoint_every=3", "sample_every=1000", "learning_rate=0.01", "cache_latents=false"]
    run(LAUNCH + common + [f"output_dir={tmp_path / 'straight'}", "max_steps=6"])
    run(LAUNCH + common + [f"output_dir={tmp_path / 'resumed'}", "max_steps=3"])
    resumed = run(LAUNCH + common + [f"output_dir={tmp_path / 'resumed'}", "max_steps=6"])
    assert "at step 3" in resumed.stderr
    weights = "final/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "resumed" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(scalars(tmp_path / "straight", "val/loss")) >= 2
    two_ranks = TWO_RANKS + ["--num_cpu_threads_per_process", "1"]
    ddp = run(two_ranks + common + [f"output_dir={tmp_path / 'ddp'}", "max_steps=2", "cache_latents=true"],
              env={"ACCELERATE_USE_CPU": "1"})
    assert "differ across ranks" not in ddp.stderr
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000002" / "random_states_1.pkl").is_file()
    assert ControlNetModel.from_pretrained(tmp_path / "ddp" / "final").config.in_channels == 4


def test_edge_f1_matches_within_two_pixels_and_pools_counts():
    from evaluation.control import edge_counts, edge_scores

    target = np.zeros((16, 16), bool)
    target[4, 2:12] = True  # a 10-pixel line
    near, far = np.roll(target, 2, axis=0), np.roll(target, 3, axis=0)
    assert edge_scores(edge_counts(near, target)) == {"edge_precision": 1.0, "edge_recall": 1.0, "edge_f1": 1.0}
    assert edge_scores(edge_counts(far, target))["edge_f1"] == 0.0
    half = target.copy()
    half[4, 7:12] = False  # half the line found, nothing spurious: precision 1, recall 0.5 (with the 2-px reach 0.7)
    scores = edge_scores(edge_counts(half, target))
    assert scores["edge_precision"] == 1.0 and scores["edge_recall"] == 0.7
    point, diagonal = np.zeros((9, 9), bool), np.zeros((9, 9), bool)
    point[4, 4], diagonal[5, 5] = True, True
    assert edge_counts(diagonal, point)[0] == 1  # sqrt(2) px away: matched
    diagonal[5, 5], diagonal[5, 6] = False, True
    assert edge_counts(diagonal, point)[0] == 0 and edge_counts(diagonal.T, point)[0] == 0  # sqrt(5): neither way
    pooled = edge_counts(target, target) + edge_counts(np.zeros_like(target), target)
    assert edge_scores(pooled)["edge_recall"] == 0.5  # pooled over images, not averaged per image


@pytest.mark.slow  # 8-18 s: moved to the slow stage to keep the default suite under 12 minutes
def test_eval_control_rows_grid_and_rerun(emoji_dir, base_model_dir, tmp_path, capsys):
    from cli.main import main as ldm_main
    from evaluation.control import evaluate_control

    run_dir = tmp_path / "cn"
    ControlNetTrainer(ldm_config(CONFIG, [f"data={emoji_dir}", f"init_from={base_model_dir}", f"output_dir={run_dir}",
                                          "max_steps=2", "sample_every=1000", "learning_rate=0.05"])).run()
    base, pipe = Pipeline(model=base_model_dir), Pipeline(model=base_model_dir, controlnet=run_dir)
    kwargs = {"split": "validation", "num_images": 4, "scales": (1.0, 2.0), "num_inference_steps": 2, "seed": 1}
    metrics = evaluate_control(base, pipe, str(emoji_dir), tmp_path / "eval", **kwargs)
    assert [r["row"] for r in metrics["rows"]] == ["base", "controlnet x1", "controlnet x2"]
    assert metrics["control_type"] == "canny" and metrics["num_images"] == 4
    rows = {r["row"]: r for r in metrics["rows"]}
    assert all(0 <= r["edge_f1"] <= 1 and np.isfinite(r["fid"]) for r in metrics["rows"])
    assert rows["base"]["fid"] != rows["controlnet x2"]["fid"]  # the ControlNet changes the samples
    # a column per image: source, control map, base, x1, x2
    assert Image.open(tmp_path / "eval" / "examples.png").size == (4 * 32, 5 * 32)
    again = evaluate_control(base, pipe, str(emoji_dir), tmp_path / "eval", **kwargs)  # finished rows are kept
    assert again["rows"] == metrics["rows"]
    with pytest.raises(UserError, match="the base row needs the same model without a ControlNet"):
        evaluate_control(pipe, pipe, str(emoji_dir), tmp_path / "eval", **kwargs)
    for bad, message in (("1,x", "--scales must be numbers"), ("nan", "must be finite numbers")):
        with pytest.raises(SystemExit):
            ldm_main(["eval", "control", "--controlnet", str(run_dir), "--model", str(base_model_dir), "--data",
                      str(emoji_dir), "--scales", bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a canny ControlNet given colour maps
        ldm_main(["generate", "a cat", "--model", str(base_model_dir), "--controlnet", str(run_dir), "--control",
                  str(tmp_path / "eval" / "examples.png"), "--control-type", "colour", "--out", str(tmp_path / "x.png")])
    assert "was trained on canny maps, not colour: leave --control-type out" in capsys.readouterr().err
