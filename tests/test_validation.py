"""The validation loss: fixed per image and seed (comparable across steps, runs and rank counts), logged by every
recipe, `keep_best`, a held-out share never trained on, and the trackers."""

from __future__ import annotations

import json

import pytest
import torch

from core.config import load_config
from core.data.batches import BucketBatchSampler
from core.errors import UserError
from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer
from helpers import LAUNCH, ROOT, TWO_RANKS, run, scalars


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _config(emoji_dir, autoencoder_dir, output_dir, *extra) -> LDMTrainConfig:
    return load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", [f"data={emoji_dir}", f"autoencoder={autoencoder_dir}",
                                                                 f"output_dir={output_dir}", *extra])


def test_the_same_weights_give_the_same_loss_and_the_training_rng_is_left_alone(emoji_dir, autoencoder_dir,
                                                                                tmp_path):
    losses = []
    for name in ("a", "b"):
        trainer = LDMTrainer(_config(emoji_dir, autoencoder_dir, tmp_path / name))
        trainer.setup()
        state = torch.get_rng_state()
        losses.append(trainer.validate())
        assert torch.equal(torch.get_rng_state(), state)
        assert len(trainer.validation_rows) == 8  # the 4 held-out names x 2 styles of the test set
        trainer.cleanup()
    assert losses[0] == losses[1] and 0.1 < losses[0] < 10


@pytest.mark.slow
def test_one_and_two_ranks_log_the_same_loss_and_keep_best_exports_its_minimum(emoji_dir, autoencoder_dir,
                                                                               tmp_path):
    args = ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={emoji_dir}", f"autoencoder={autoencoder_dir}",
            "max_steps=6", "checkpoint_every=3", "sample_every=1000", "learning_rate=0.01", "batch_size=4"]
    run(LAUNCH + args + [f"output_dir={tmp_path / 'one'}", "keep_best=true"])
    launch = TWO_RANKS
    run(launch + args + [f"output_dir={tmp_path / 'two'}"], env={"ACCELERATE_USE_CPU": "1"})
    one, two = scalars(tmp_path / "one", "val/loss"), scalars(tmp_path / "two", "val/loss")
    assert len(one) == len(two) == 3  # steps 0, 3 and 6
    assert one[0] == pytest.approx(two[0], rel=1e-6)  # the same initial weights, batches dealt to two ranks
    record = json.loads((tmp_path / "one" / "best" / "validation.json").read_text())
    assert record["validation_loss"] == pytest.approx(min(one), rel=1e-6)
    assert record["step"] == [0, 3, 6][one.index(min(one))]
    assert (tmp_path / "one" / "best" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_held_out_share_is_never_trained_on(emoji_dir, autoencoder_dir, tmp_path):
    for cached in ("true", "false"):
        trainer = LDMTrainer(_config(emoji_dir, autoencoder_dir, tmp_path / cached, "validation_fraction=0.25",
                                     f"cache_latents={cached}"))
        trainer.setup()
        held = set(trainer.held_out.tolist())
        assert len(held) == round(0.25 * 72) and len(trainer.validation_rows) == len(held)
        if cached == "true":
            sampler = trainer.loader.batch_sampler
            drawn = {i for epoch in range(3) for batch in sampler.epoch_batches(epoch) for i in batch}
        else:
            drawn = set(trainer.loader.dataset.indices)
        assert drawn and not drawn & held
        trainer.cleanup()


def test_the_bucket_sampler_leaves_out_excluded_items():
    sampler = BucketBatchSampler([0] * 10 + [1] * 10, 2, seed=0, exclude=torch.tensor([0, 1, 2, 15]))
    drawn = [i for batch in sampler.epoch_batches(0) for i in batch]
    # 7 items left in bucket 0 and 9 in bucket 1: 3 + 4 full batches of 2
    assert len(drawn) == len(set(drawn)) == 14 and not {0, 1, 2, 15} & set(drawn)
    assert len(sampler) == 7


def test_the_autoencoder_logs_its_validation_loss(autoencoder_dir):
    assert len(scalars(autoencoder_dir, "val/loss")) == 2  # before the first step and at the last (4)


@pytest.mark.parametrize("override, message", [
    ("log_with=[nonsense]", "unknown tracker 'nonsense' in log_with; valid: "),
    ("log_with=[wandb]", "log_with=wandb needs its package, which is not installed: pip install wandb"),
    ("validation_fraction=1.0", r"validation_fraction must be in \[0, 1\)"),
    ("validation_every=0", "validation_every must be at least 1"),
])
def test_bad_validation_and_tracker_settings(emoji_dir, autoencoder_dir, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        _config(emoji_dir, autoencoder_dir, tmp_path, override)
