"""The latent diffusion trainer: resume equivalence, two ranks, caching, non-finite losses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from core.config import load_config
from core.errors import UserError
from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer
from helpers import LAUNCH, run


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))


def _args(emoji_dir, autoencoder_dir, output_dir, *extra):
    return ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={emoji_dir}", f"autoencoder={autoencoder_dir}",
            f"output_dir={output_dir}", "sample_every=1000", *extra]


def test_interrupted_and_resumed_run_ends_with_the_same_weights(emoji_dir, autoencoder_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(LAUNCH + _args(emoji_dir, autoencoder_dir, straight, "max_steps=12", "checkpoint_every=5"))
    run(LAUNCH + _args(emoji_dir, autoencoder_dir, resumed, "max_steps=7", "checkpoint_every=5"))
    # the run was stopped at step 7; step 5 is the last periodic checkpoint. Resume from there explicitly.
    result = run(LAUNCH + _args(emoji_dir, autoencoder_dir, resumed, "max_steps=12", "checkpoint_every=5",
                                f"resume={resumed / 'checkpoints' / 'step-00000005'}"))
    assert "at step 5" in result.stderr
    for weights in ("final/unet/diffusion_pytorch_model.safetensors", "checkpoints/step-00000012/model.safetensors"):
        a, b = load_file(straight / weights), load_file(resumed / weights)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), weights


def test_two_processes(emoji_dir, autoencoder_dir, tmp_path):
    out = tmp_path / "ddp"
    launch = [LAUNCH[0], "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = run(launch + _args(emoji_dir, autoencoder_dir, out, "max_steps=6", "checkpoint_every=3"),
                 env={"ACCELERATE_USE_CPU": "1"})
    checkpoint = out / "checkpoints" / "step-00000006"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "differ across ranks" not in result.stderr  # U-Net and EMA identical on both ranks at export
    assert json.loads((checkpoint / "trainer_state.json").read_text())["batches_seen"] == 6


def _trainer(emoji_dir, autoencoder_dir, output_dir, *extra) -> LDMTrainer:
    config = load_config(LDMTrainConfig, "configs/ldm/tiny.yaml",
                         [f"data={emoji_dir}", f"autoencoder={autoencoder_dir}", f"output_dir={output_dir}", *extra])
    trainer = LDMTrainer(config)
    trainer.setup()
    return trainer


TEMPLATES = 'caption_templates=["{caption}", "{article} {caption}", "{caption}, {style} style"]'


def test_cached_and_uncached_batches_give_the_same_loss(emoji_dir, autoencoder_dir, tmp_path):
    cached = _trainer(emoji_dir, autoencoder_dir, tmp_path / "cached", "cache_latents=true", "cond_drop_prob=0.5",
                      TEMPLATES)
    uncached = _trainer(emoji_dir, autoencoder_dir, tmp_path / "uncached", "cache_latents=false",
                        "cond_drop_prob=0.5", TEMPLATES)
    batch_c, batch_u = next(iter(cached.loader)), next(iter(uncached.loader))
    assert torch.equal(batch_c["index"], batch_u["indices"])  # same images in the same order
    losses = []
    for trainer, batch in ((cached, batch_c), (uncached, batch_u)):
        torch.manual_seed(123)
        with torch.no_grad():
            losses.append(trainer.compute_loss(batch)["loss"].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.manual_seed(124)
    with torch.no_grad():
        assert cached.compute_loss(batch_c)["loss"].item() != pytest.approx(losses[0], rel=1e-3)  # the check can fail


def test_cache_is_rebuilt_when_an_input_changes(emoji_dir, autoencoder_dir, tmp_path):
    from ldm.cache import cache_key

    from core.data.dataset import ImageCaptionDataset, load_image_caption_dataset

    trainer = _trainer(emoji_dir, autoencoder_dir, tmp_path / "a")
    images = ImageCaptionDataset(load_image_caption_dataset(str(emoji_dir)), 32)
    key = cache_key(images, trainer.vae, trainer.text_encoder)
    assert cache_key(images, trainer.vae, trainer.text_encoder) == key
    assert cache_key(ImageCaptionDataset(images.ds, 16), trainer.vae, trainer.text_encoder) != key
    trainer.text_encoder.max_length += 1
    assert cache_key(images, trainer.vae, trainer.text_encoder) != key
    trainer.text_encoder.max_length -= 1
    with torch.no_grad():
        next(trainer.vae.parameters()).add_(1e-3)
    assert cache_key(images, trainer.vae, trainer.text_encoder) != key
    fewer = ImageCaptionDataset(images.ds.select(range(10)), 32)
    assert cache_key(fewer, trainer.vae, trainer.text_encoder) != key
    templated = ImageCaptionDataset(images.ds, 32, templates=("{caption}", "{caption} emoji"))
    assert cache_key(templated, trainer.vae, trainer.text_encoder) != key


def test_caption_variants_are_drawn_per_image_and_step(emoji_dir, autoencoder_dir, tmp_path):
    trainer = _trainer(emoji_dir, autoencoder_dir, tmp_path / "variants", TEMPLATES, "cond_drop_prob=0")
    cache = trainer.cache
    assert cache.caption_ids.shape == (len(cache), 3)
    first = json.loads(emoji_dir.joinpath("train", "metadata.jsonl").read_text().splitlines()[0])
    caption, style = first["caption"], first["style"]
    expected = [caption, f"a {caption}" if caption[0] not in "aeiou" else f"an {caption}", f"{caption}, {style} style"]
    embeddings = trainer.text_encoder.encode(expected).hidden_states
    for j in range(3):
        torch.testing.assert_close(cache.caption_embeddings[cache.caption_ids[0, j]], embeddings[j])
    batch = next(iter(trainer.loader))
    drawn = set()
    for seed in range(8):
        torch.manual_seed(seed)
        _, context = trainer.encode_batch(batch)
        drawn |= {int((cache.caption_embeddings - c).abs().flatten(1).sum(1).argmin()) for c in context}
    variants = {int(i) for i in batch["caption_ids"].flatten()}
    assert drawn <= variants and len(drawn) > len(batch["caption_ids"])  # more than one variant per image used


def test_nonfinite_losses_skip_then_stop_without_saving(emoji_dir, autoencoder_dir, tmp_path, monkeypatch):
    trainer = _trainer(emoji_dir, autoencoder_dir, tmp_path / "nan", "max_nonfinite_steps=3", "checkpoint_every=1")
    real = trainer.compute_loss
    calls = {"n": 0}

    def sometimes_nan(batch):
        calls["n"] += 1
        losses = real(batch)
        return {"loss": losses["loss"] * float("nan")} if calls["n"] in (2, 4, 5, 6) else losses

    monkeypatch.setattr(trainer, "compute_loss", sometimes_nan)
    with pytest.raises(UserError, match="NaN/inf for 3 steps in a row"):
        trainer.train()
    assert trainer.step == 2 and trainer.guard.total == 4  # steps 1 and 2 trained, call 2 skipped and counted
    for checkpoint in (tmp_path / "nan" / "checkpoints").iterdir():
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_init_from_continues_a_model_and_max_minutes_stops_at_a_checkpoint_and_exports(emoji_dir, autoencoder_dir,
                                                                                        tmp_path):
    from diffusers import UNet2DConditionModel

    first = tmp_path / "first"
    run(LAUNCH + _args(emoji_dir, autoencoder_dir, first, "max_steps=2"))
    # in process: the U-Net starts as init_from's (EMA) weights, and the autoencoder defaults to init_from's vae/
    trainer = _trainer(emoji_dir, autoencoder_dir, tmp_path / "check", f"init_from={first / 'final'}",
                       "autoencoder=")
    assert trainer.config.autoencoder == str(first / "final" / "vae")
    init = UNet2DConditionModel.from_pretrained(first / "final" / "unet").state_dict()
    started = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert init.keys() == started.keys() and all(torch.equal(init[k], started[k]) for k in init)
    # through accelerate launch: a wall-clock budget far below one step stops after the first step, with a
    # checkpoint and an export of that step; resume=auto then goes on from it
    second = tmp_path / "second"
    budget = _args(emoji_dir, autoencoder_dir, second, f"init_from={first / 'final'}", "max_steps=50",
                   "checkpoint_every=1000")
    stopped = run(LAUNCH + budget + ["max_minutes=0.00001"])
    assert "max_minutes=1e-05 reached at step 1 of 50" in stopped.stderr
    assert (second / "checkpoints" / "step-00000001").is_dir() and (second / "final" / "unet").is_dir()
    resumed = run(LAUNCH + budget + ["max_steps=3"])
    assert "at step 1" in resumed.stderr and (second / "checkpoints" / "step-00000003").is_dir()


def test_bad_init_from_and_max_minutes(emoji_dir, autoencoder_dir, tmp_path):
    import shutil

    folder = shutil.copytree("pipelines/default_model", tmp_path / "inpainting")
    index = folder / "model_index.json"
    index.write_text(index.read_text().replace('"StableDiffusionPipeline"', '"StableDiffusionInpaintPipeline"'))
    (folder / "checksums.json").unlink()  # under checksums the edited index would be refused as corrupted first
    base = [f"data={emoji_dir}", f"autoencoder={autoencoder_dir}", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(UserError, match="names StableDiffusionInpaintPipeline"):
        load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", base + [f"init_from={folder}"])
    with pytest.raises(UserError, match="max_minutes must be positive"):
        load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", base + ["max_minutes=0"])
    with pytest.raises(UserError, match="inpainting=true selects the inpainting recipe"):
        load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", base + ["inpainting=true"])
