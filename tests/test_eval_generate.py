"""`ldm eval generate` on a tiny model: every table row and file is produced, bad input is named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

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
    metrics = evaluate_generation(pipe, str(data), tmp_path / "out", num_images=4, sweep_images=2,
                                  num_inference_steps=1, heldout_split=None, samplers=(), guidance_scales=(),
                                  batch_size=4)
    assert "heldout" not in metrics and "samplers" not in metrics
