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
from helpers import LAUNCH, TWO_RANKS, run


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
    launch = TWO_RANKS
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


def _loss(trainer, batch, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return trainer.compute_loss(batch)["loss"].item()


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float16", 1e-4)])
def test_cached_and_uncached_batches_give_the_same_loss(emoji_dir, autoencoder_dir, tmp_path, dtype, tolerance):
    cached = _trainer(emoji_dir, autoencoder_dir, tmp_path / "cached", "cache_latents=true", "cond_drop_prob=0.5",
                      TEMPLATES, f"cache_dtype={dtype}")
    uncached = _trainer(emoji_dir, autoencoder_dir, tmp_path / "uncached", "cache_latents=false",
                        "cond_drop_prob=0.5", TEMPLATES)
    batch_c = next(iter(cached.loader))
    batch_u = uncached.collate([uncached.loader.dataset[int(i)] for i in batch_c["index"]])  # the same images
    assert torch.equal(batch_u["indices"], batch_c["index"])
    loss_c, loss_u = _loss(cached, batch_c, 123), _loss(uncached, batch_u, 123)
    assert loss_c == pytest.approx(loss_u, rel=tolerance)
    assert _loss(cached, batch_c, 124) != pytest.approx(loss_c, rel=1e-3)  # the check can fail


def test_cache_is_rebuilt_when_an_input_changes(emoji_dir, autoencoder_dir, tmp_path):
    from dataclasses import replace

    from core.data.buckets import Bucketer
    from core.data.sources import open_source
    from ldm.cache import CacheInputs

    trainer = _trainer(emoji_dir, autoencoder_dir, tmp_path / "a")
    square = Bucketer(32, 8, enabled=False)
    inputs = CacheInputs(open_source(str(emoji_dir)), ("{caption}",), square, trainer.vae, trainer.text_encoder)
    key = inputs.key()
    assert inputs.key() == key
    assert replace(inputs, bucketer=Bucketer(16, 8, enabled=False)).key() != key
    assert replace(inputs, bucketer=Bucketer(32, 8, enabled=True)).key() != key
    assert replace(inputs, dtype="float32").key() != key
    assert replace(inputs, source=open_source(str(emoji_dir), rows_per_shard=10)).key() != key
    assert replace(inputs, templates=("{caption}", "{caption} emoji")).key() != key
    assert replace(inputs, source=open_source(str(emoji_dir), caption_column="short_name")).key() != key
    trainer.text_encoder.max_length += 1
    assert inputs.key() != key
    trainer.text_encoder.max_length -= 1
    with torch.no_grad():
        next(trainer.vae.parameters()).add_(1e-3)
    assert inputs.key() != key


def test_caption_variants_are_drawn_per_image_and_step(emoji_dir, autoencoder_dir, tmp_path):
    trainer = _trainer(emoji_dir, autoencoder_dir, tmp_path / "variants", TEMPLATES, "cond_drop_prob=0",
                       "cache_dtype=float32")
    row = trainer.cache[0]
    assert row["caption_ids"].shape == (3,)
    first = json.loads(emoji_dir.joinpath("train", "metadata.jsonl").read_text().splitlines()[int(row["index"])])
    caption, style = first["caption"], first["style"]
    expected = [caption, f"a {caption}" if caption[0] not in "aeiou" else f"an {caption}", f"{caption}, {style} style"]
    torch.testing.assert_close(trainer.cache.text_states(row["shard"].expand(3), row["caption_ids"]),
                               trainer.text_encoder.encode(expected).hidden_states)
    reads = []
    for f in trainer.cache.files:  # count the text-state rows read from disk
        f.row = lambda name, i, f=f, row=f.row: reads.append(name == "text_states") or row(name, i)
    batch = next(iter(trainer.loader))
    assert sum(reads) == 0  # loading a batch reads no text states; encode_batch reads the drawn variant's alone
    variants = torch.stack([trainer.cache.text_states(batch["shard"], batch["caption_ids"][:, j]) for j in range(3)],
                           dim=1)
    drawn = set()
    for seed in range(8):
        torch.manual_seed(seed)
        reads.clear()
        _, context = trainer.encode_batch(batch)
        assert sum(reads) == len(context)
        drawn |= {(i, int((variants[i] - c).abs().flatten(1).sum(1).argmin())) for i, c in enumerate(context)}
    assert len(drawn) > len(context)  # more than one variant per image used
    assert {j for _, j in drawn} == {0, 1, 2}


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


@pytest.mark.slow  # 41 s: the slow stage (default-suite budget)
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
