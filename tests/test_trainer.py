"""The one training loop (core/trainer.py) as both stages run it: the drift the two old copies had is gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.config import load_config
from recipes.autoencoder import AutoencoderTrainConfig, AutoencoderTrainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "autoencoder" / "tiny.yaml"


def _autoencoder(data: Path, output_dir: Path, *overrides: str) -> AutoencoderTrainer:
    trainer = AutoencoderTrainer(load_config(AutoencoderTrainConfig, CONFIG, [
        f"data={data}", f"output_dir={output_dir}", "sample_every=1000", "log_every=1", *overrides]))
    trainer.setup()
    return trainer


def _state(output_dir: Path, step: int) -> dict:
    return json.loads((output_dir / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())


def test_autoencoder_honours_gradient_accumulation(emoji_dir, tmp_path):
    trainer = _autoencoder(emoji_dir, tmp_path / "accumulate", "gradient_accumulation_steps=3", "max_steps=2",
                           "checkpoint_every=2")
    trainer.train()
    assert trainer.step == 2 and _state(tmp_path / "accumulate", 2)["batches_seen"] == 6


@pytest.fixture()
def broken_images(emoji_dir, tmp_path):
    """The test set with every fourth training image replaced by bytes no decoder reads."""
    data = tmp_path / "data"
    shutil.copytree(emoji_dir, data)
    rows = [json.loads(line) for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    for row in rows[::4]:
        (data / "train" / row["file_name"]).write_bytes(b"not an image")
    return data


def test_a_resumed_run_reports_the_same_nonfinite_and_skipped_counts(broken_images, tmp_path, monkeypatch):
    def nan_on_second_call(trainer):
        real, calls = trainer.compute_loss, {"n": 0}

        def compute_loss(batch):
            calls["n"] += 1
            losses = real(batch)
            return {**losses, "loss": losses["loss"] * float("nan")} if calls["n"] == 2 else losses

        monkeypatch.setattr(trainer, "compute_loss", compute_loss)

    straight = _autoencoder(broken_images, tmp_path / "straight", "max_steps=6", "checkpoint_every=3")
    nan_on_second_call(straight)
    straight.train()
    first = _autoencoder(broken_images, tmp_path / "resumed", "max_steps=3", "checkpoint_every=3")
    nan_on_second_call(first)
    first.train()
    resumed = _autoencoder(broken_images, tmp_path / "resumed", "max_steps=6", "checkpoint_every=3")
    assert resumed.step == 3
    resumed.train()
    expected = _state(tmp_path / "straight", 6)
    assert expected["nonfinite_steps"] == 1 and expected["skipped_images"] > 0
    assert _state(tmp_path / "resumed", 6) == expected
