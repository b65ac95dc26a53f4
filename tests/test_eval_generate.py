"""`ldm eval generate` on a tiny model: every table row and file is produced, bad input is named."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from core.errors import UserError
from pipelines import Pipeline
from evaluation.generation import alignment, evaluate_generation, format_tables
from evaluation.real_images import RealImages


def test_alignment_counts_name_hits_and_chance():
    gallery = RealImages(np.eye(4, 8), ["a", "b", "c", "d"], ["a", "b", "c", "a"], ["x", "x", "y", "y"])
    samples = np.eye(4, 8)[[0, 2, 1, 3]]  # sample i lands on image 0, 2, 1, 3: right, wrong, wrong, right
    result = alignment(samples, gallery, top=1)
    assert result["name_top1"] == 0.5
    assert result["chance_name_top1"] == pytest.approx(np.mean([2 / 4, 1 / 4, 1 / 4, 2 / 4]))
    assert result["category_top1"] == 0.5


def test_eval_generate_writes_tables_plots_and_caps_n(tiny_components, emoji_dir, tmp_path):
    pipe = Pipeline(**tiny_components)
    metrics = evaluate_generation(pipe, str(emoji_dir), tmp_path / "out", num_images=50, sweep_images=4,
                                  num_inference_steps=2, samplers=(("ddim", 2), ("dpm++", 2)),
                                  guidance_scales=(1.0, 3.0), batch_size=8)
    train_images = len((emoji_dir / "train" / "metadata.jsonl").read_text().splitlines())
    assert metrics["num_images"] == train_images // 2 and "N capped" in metrics["notes"][0]
    assert metrics["heldout"]["images"] == len((emoji_dir / "validation" / "metadata.jsonl").read_text().splitlines())
    assert [r["scheduler"] for r in metrics["samplers"]["rows"]] == ["ddim", "dpm++"]
    assert [r["guidance_scale"] for r in metrics["guidance"]["rows"]] == [1.0, 3.0]
    for key in ("train", "heldout"):
        assert 0 <= metrics[key]["name_top1"] <= metrics[key]["name_top5"] <= 1
    for name in ("metrics.json", "samplers.png", "guidance.png", "samples.png"):
        assert (tmp_path / "out" / name).is_file()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train"]["fid"] == metrics["train"]["fid"]
    assert "| ddim | 2 |" in format_tables(metrics)
    # run again with one more sampler: the saved rows of the same model and settings are reused, the new one computed
    again = evaluate_generation(pipe, str(emoji_dir), tmp_path / "out", num_images=50, sweep_images=4,
                                num_inference_steps=2, samplers=(("ddim", 2), ("dpm++", 2), ("euler", 2)),
                                guidance_scales=(1.0, 3.0), batch_size=8)
    assert [r["fid"] for r in again["samplers"]["rows"][:2]] == [r["fid"] for r in metrics["samplers"]["rows"]]
    assert again["train"] == metrics["train"] and again["samplers"]["rows"][2]["scheduler"] == "euler"
    assert sum("reused from the earlier, interrupted run" in note for note in again["notes"]) == 6
    # another decoder under the same U-Net is another model: its rows are computed, not reused from the folder
    vae = copy.deepcopy(tiny_components["vae"])
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.2)
    other = evaluate_generation(Pipeline(**dict(tiny_components, vae=vae)), str(emoji_dir), tmp_path / "out",
                                num_images=50, sweep_images=4, num_inference_steps=2, samplers=(("ddim", 2),),
                                guidance_scales=(), batch_size=8)
    assert not any("reused" in note for note in other["notes"]) and other["train"]["fid"] != metrics["train"]["fid"]
    # pinned on the seeded tiny model (2026-12-02): a change to sampling, features or FID moves them
    pinned = [metrics[k][m] for k in ("train", "heldout") for m in ("fid", "fid_real_vs_real", "name_top5")]
    assert pinned == pytest.approx([434.80, 76.19, 0.2222, 454.87, 119.75, 1.0], rel=0.01)
    assert [r["fid"] for r in metrics["samplers"]["rows"] + metrics["guidance"]["rows"]] == pytest.approx(
        [469.97, 470.11, 463.71, 468.64], rel=0.01)


def test_eval_generate_without_a_heldout_split_says_how_to_skip(tiny_components, emoji_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(emoji_dir / "train", data / "train")
    pipe = Pipeline(**tiny_components)
    with pytest.raises(UserError, match="no split 'validation'.*--heldout-split none"):
        evaluate_generation(pipe, str(data), tmp_path / "out", num_images=4, sweep_images=2, num_inference_steps=1,
                            samplers=(), guidance_scales=(), batch_size=4)
    with pytest.raises(UserError, match="unknown scheduler 'dpm\\+\\+2'"):
        evaluate_generation(pipe, str(data), tmp_path / "out", heldout_split=None, samplers=(("dpm++2", 10),))
    with pytest.raises(UserError, match="guidance scales must be finite"):
        evaluate_generation(pipe, str(data), tmp_path / "out", heldout_split=None, guidance_scales=(3.0, -1.0))
    assert not (tmp_path / "out").exists()  # refused before any work, nothing written
    metrics = evaluate_generation(pipe, str(data), tmp_path / "out", num_images=4, sweep_images=6,
                                  num_inference_steps=1, heldout_split=None, samplers=(), guidance_scales=(),
                                  batch_size=4)
    assert "heldout" not in metrics and "samplers" not in metrics
    assert "capped" not in format_tables(metrics)  # no sweep ran: nothing was capped
    # the sweeps draw from the main rows' prompts: a larger --sweep-images is capped, and the table says so
    swept = evaluate_generation(pipe, str(data), tmp_path / "swept", num_images=4, sweep_images=6,
                                num_inference_steps=1, heldout_split=None, samplers=(), guidance_scales=(1.0,),
                                batch_size=4)
    assert swept["guidance"]["images"] == 4
    assert "sweeps N = 4: --sweep-images 6 is capped by the main rows' N" in format_tables(swept)


def test_a_settings_sweep_counts_calls_and_draws_the_pareto_front(tiny_model_dir, emoji_dir, tmp_path):
    """Sampling settings side by side: the interval makes fewer U-Net calls, the guide's calls are its own, the main
    model as its own guide scores as the unguided model, and the held-out rows, the table and settings.png follow."""
    from evaluation.settings import parse_settings, pareto_front

    pipe = Pipeline(model=tiny_model_dir, guide_model=tiny_model_dir)
    settings = parse_settings("ddim:4:3,ddim:4:3:interval=0.5-3,ddim:4:3:guide,ddim:4:1")
    metrics = evaluate_generation(pipe, str(emoji_dir), tmp_path / "out", num_images=6, sweep_images=6,
                                  num_inference_steps=1, samplers=(), guidance_scales=(), batch_size=6,
                                  sampling_settings=settings, settings_heldout=True)
    rows = {r["setting"]: r for r in metrics["sampling_settings"]["rows"]}
    assert list(rows) == [s.text for s in settings]
    assert rows["ddim:4:3"]["unet_calls_per_image"] == 8 and rows["ddim:4:3"]["guide_calls_per_image"] == 0
    assert 4 <= rows["ddim:4:3:interval=0.5-3"]["unet_calls_per_image"] < 8
    assert (rows["ddim:4:3:guide"]["unet_calls_per_image"], rows["ddim:4:3:guide"]["guide_calls_per_image"]) == (4, 4)
    assert rows["ddim:4:1"]["unet_calls_per_image"] == 4
    assert rows["ddim:4:3:guide"]["fid"] == pytest.approx(rows["ddim:4:1"]["fid"], rel=1e-6)
    assert rows["ddim:4:3:guide"]["fid"] != pytest.approx(rows["ddim:4:3"]["fid"], rel=1e-3)
    assert [r["setting"] for r in metrics["sampling_settings_heldout"]["rows"]] == list(rows)
    assert (tmp_path / "out" / "settings.png").is_file() and "(front)" in format_tables(metrics)
    # the main row is classifier-free guided although a guide is loaded: the guide is for ':guide' settings alone
    plain = evaluate_generation(Pipeline(model=tiny_model_dir), str(emoji_dir), tmp_path / "plain", num_images=6,
                                sweep_images=6, num_inference_steps=1, samplers=(), guidance_scales=(), batch_size=6,
                                heldout_split=None)
    assert metrics["train"]["fid"] == pytest.approx(plain["train"]["fid"], rel=1e-9)
    front = pareto_front(list(rows.values()))
    assert front and all(not (o["fid"] < f["fid"] and o["seconds_per_image"] < f["seconds_per_image"])
                         for f in front for o in rows.values())


@pytest.mark.parametrize("text, message", [
    ("ddim:4", "write SAMPLER:STEPS:GUIDANCE"),
    ("ddim:x:3", "steps must be a whole number"),
    ("ddim:4:3:interval=a-b", "interval=LO-HI"),
    ("ddim:4:3:schedule=cosine", "unknown part 'schedule=cosine'"),
])
def test_bad_settings_are_one_line(text, message):
    from evaluation.settings import parse_settings

    with pytest.raises(UserError, match=message):
        parse_settings(text)


def test_settings_the_model_cannot_take_are_refused_before_any_work(tiny_model_dir, emoji_dir, tmp_path):
    from evaluation.settings import parse_settings

    pipe = Pipeline(model=tiny_model_dir)
    for text, message in (("ddim:4:3:guide", "asks for the guide: pass --guide-model"),
                          ("ddim:4:3:schedule=karras", "needs a sampler with Karras sigmas"),
                          ("dpm++:4:3:interval=50-60", "outside this model's noise levels")):
        with pytest.raises(UserError, match=message):
            evaluate_generation(pipe, str(emoji_dir), tmp_path / "out", num_images=4, sweep_images=2,
                                samplers=(), guidance_scales=(), sampling_settings=parse_settings(text))
    assert not (tmp_path / "out").exists()
