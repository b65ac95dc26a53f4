"""LoRA adapters: training through `accelerate launch train_ldm.py`, diffusers-format export and parity with
diffusers' `load_lora_weights`, resume, two ranks, and one clear line for each bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from cli.main import main as ldm_main
from core.config import load_config
from core.errors import UserError
from ldm.lora import WEIGHTS_NAME, add_lora
from ldm.unet import build_unet
from pipelines import InpaintPipeline, Pipeline
from recipes.inpainting import InpaintTrainConfig
from recipes.latent_diffusion import LDMTrainConfig
from helpers import LAUNCH, ROOT, TWO_RANKS, run, scalars


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def base_dir(base_model_dir):
    """A seeded tiny text-to-image model folder: the base the adapters are trained on."""
    return base_model_dir


def _args(emoji_dir, base_dir, output_dir, *extra):
    # a high learning rate so that 12 steps move the images well away from the base's
    return ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={emoji_dir}", f"init_from={base_dir}",
            f"output_dir={output_dir}", "lora=true", "lora_rank=4", "lora_alpha=8", "learning_rate=0.05",
            "sample_every=1000", "checkpoint_every=5", *extra]


@pytest.fixture(scope="module")
def lora_run(emoji_dir, base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    run(LAUNCH + _args(emoji_dir, base_dir, out, "max_steps=12"))
    return out


def _sample(pipe, **kwargs):
    return pipe.generate(["a cat", "red apple"], num_inference_steps=5, guidance_scale=3.0, output_type="numpy",
                         seed=3, progress=False, **kwargs)


def test_a_lora_run_saves_only_the_adapter_and_resumes_bit_exactly(emoji_dir, base_dir, lora_run, tmp_path):
    final = lora_run / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter.json", "config.yaml", WEIGHTS_NAME]
    weights = load_file(final / WEIGHTS_NAME)
    assert weights and all(k.startswith("unet.") and ".lora" in k for k in weights)
    assert all(v.dtype == torch.float16 for v in weights.values())
    checkpoint = load_file(lora_run / "checkpoints" / "step-00000012" / "model.safetensors")
    assert checkpoint and all("lora_" in k for k in checkpoint)  # the adapter alone, no frozen base weights
    assert sum(v.numel() for v in checkpoint.values()) == sum(v.numel() for v in weights.values())
    info = json.loads((final / "adapter.json").read_text())
    assert (info["rank"], info["alpha"], info["base_model"]) == (4, 8, str(base_dir))

    resumed = tmp_path / "resumed"
    run(LAUNCH + _args(emoji_dir, base_dir, resumed, "max_steps=7"))
    result = run(LAUNCH + _args(emoji_dir, base_dir, resumed, "max_steps=12",
                                f"resume={resumed / 'checkpoints' / 'step-00000005'}"))
    assert "at step 5" in result.stderr
    for name in (f"final/{WEIGHTS_NAME}", "checkpoints/step-00000012/model.safetensors"):
        a, b = load_file(lora_run / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_diffusers_load_lora_weights_draws_the_same_images_at_full_and_half_scale(base_dir, lora_run):
    theirs = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(lora_run / "final", adapter_name="new")
    base = _sample(Pipeline(model=base_dir))
    for scale in (1.0, 0.5):
        theirs.set_adapters(["new"], [scale])
        expected = theirs(["a cat", "red apple"], num_inference_steps=5, guidance_scale=3.0, output_type="np",
                          generator=torch.Generator().manual_seed(3)).images
        ours = Pipeline(model=base_dir, lora=lora_run / "final", lora_scale=scale)
        got = _sample(ours)
        assert np.abs(got - expected).max() <= 1 / 255, scale  # within one 8-bit level
        assert np.abs(got - base).max() > 20 / 255, scale  # and the adapter does change the images
    fused = _sample(ours.fuse_lora())
    assert np.abs(fused - got).max() <= 1 / 255


def test_two_adapters_with_their_own_scales_and_the_command_line(base_dir, lora_run, tmp_path):
    one = Pipeline(model=base_dir, lora=lora_run / "final", lora_scale=0.3)
    two = Pipeline(model=base_dir, lora=[lora_run / "final", lora_run / "final"], lora_scale=[0.2, 0.1])
    assert np.abs(_sample(one) - _sample(two)).max() <= 1 / 255  # two copies at 0.2 and 0.1 = one at 0.3
    two.set_lora_scale({"adapter_1": 0.0})
    assert np.abs(_sample(two) - _sample(Pipeline(model=base_dir, lora=lora_run, lora_scale=0.2))).max() <= 1 / 255
    out = tmp_path / "cat.png"
    ldm_main(["generate", "a cat", "--model", str(base_dir), "--lora", str(lora_run), "--lora-scale", "0.5",
              "--fuse", "--steps", "3", "-o", str(out)])
    assert out.is_file()


def test_an_adapter_for_another_base_is_refused_with_both_names_unless_forced(base_dir, lora_run, tmp_path):
    other = Pipeline(model=base_dir)
    with torch.no_grad():
        other.unet.conv_out.bias.add_(1e-3)  # one weight changed: another base
    other_dir = other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match=f"was trained on base {base_dir} .*not on this model {other_dir} .*"
                                        r"--force"):
        Pipeline(model=other_dir, lora=lora_run)
    Pipeline(model=other_dir, lora=lora_run, lora_force=True)  # a deliberate transfer


def test_a_text_to_image_adapter_on_an_inpainting_model_is_refused(lora_run, tiny_components):
    base = tiny_components["unet"]
    unet = type(base).from_config({**base.config, "in_channels": 9})
    with pytest.raises(UserError, match="trained on a U-Net with 4 input channels .*this model's U-Net takes 9"):
        InpaintPipeline(**{**tiny_components, "unet": unet}, lora=lora_run, lora_force=True)


@pytest.mark.parametrize("override, message", [
    ("lora_rank=0", "lora_rank must be a whole number of at least 1, got 0"),
    ("lora_rank=-2", "lora_rank must be a whole number of at least 1, got -2"),
    ("lora_alpha=-1", "lora_alpha must be a positive number"),
    ("lora_dropout=1.5", r"lora_dropout must be in \[0, 1\)"),
])
def test_bad_lora_settings_are_one_line_each(emoji_dir, base_dir, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", [f"data={emoji_dir}", f"init_from={base_dir}",
                                                              f"output_dir={tmp_path}", "lora=true", override])


def test_lora_needs_a_base_and_target_modules_that_exist(emoji_dir, tmp_path):
    with pytest.raises(UserError, match="lora=true adapts a trained model: add init_from"):
        load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", [f"data={emoji_dir}", "autoencoder=x",
                                                              f"output_dir={tmp_path}", "lora=true"])
    unet = build_unet("tiny", latent_size=16, latent_channels=4, cross_attention_dim=384)
    with pytest.raises(UserError, match=r"\['to_qq'\] match no Linear or Conv2d module .* to_k, to_out.0, to_q"):
        add_lora(unet, 4, None, ["to_q", "to_qq"])


def test_bad_adapter_folders_and_scales(base_dir, lora_run, tmp_path):
    with pytest.raises(UserError, match="lora_scale must be a finite number"):
        Pipeline(model=base_dir, lora=lora_run, lora_scale=math.nan)
    with pytest.raises(UserError, match="is not a folder on disk"):
        Pipeline(model=base_dir, lora=tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"is not a LoRA adapter folder: {WEIGHTS_NAME} is missing"):
        Pipeline(model=base_dir, lora=tmp_path)
    with pytest.raises(UserError, match="lora_scale has 2 values for 1 adapters"):
        Pipeline(model=base_dir, lora=lora_run, lora_scale=[1.0, 0.5])
    broken = tmp_path / "broken"
    shutil.copytree(lora_run / "final", broken)
    (broken / WEIGHTS_NAME).write_bytes((broken / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(UserError, match="cannot load the LoRA adapter"):
        Pipeline(model=base_dir, lora=broken)


@pytest.mark.slow
def test_two_ranks_train_one_adapter(emoji_dir, base_dir, tmp_path):
    out = tmp_path / "ddp"
    launch = TWO_RANKS
    result = run(launch + _args(emoji_dir, base_dir, out, "max_steps=6", "checkpoint_every=3"),
                 env={"ACCELERATE_USE_CPU": "1"})
    assert "differ across ranks" not in result.stderr
    assert (out / "final" / WEIGHTS_NAME).is_file()
    assert all("lora_" in k for k in load_file(out / "checkpoints" / "step-00000006" / "model.safetensors"))


def _instance_folder(emoji_dir, folder, count=3):
    folder.mkdir()
    for path in sorted((emoji_dir / "train").glob("*.png"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.slow
def test_dreambooth_with_prior_preservation_draws_class_images_once(emoji_dir, base_dir, tmp_path):
    instance = _instance_folder(emoji_dir, tmp_path / "subject")
    args = ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"init_from={base_dir}", f"data={emoji_dir}",
            f"instance_data={instance}", "instance_prompt=a sks face", "identifier=sks", "class_prompts=[a face]",
            "num_class_images=4", f"class_data_dir={tmp_path / 'class'}", "max_steps=4", "checkpoint_every=4",
            "sample_every=1000", "batch_size=2"]
    run(LAUNCH + args + [f"output_dir={tmp_path / 'lora'}", "lora=true"])
    drawn = sorted((tmp_path / "class").glob("class-*.png"))
    record = json.loads((tmp_path / "class" / "drawn_with.json").read_text())
    assert len(drawn) == 4 and record["prompts"] == ["a face"] and len(record["base_fingerprint"]) == 64
    assert (tmp_path / "lora" / "final" / WEIGHTS_NAME).is_file()
    stamps = [p.stat().st_mtime_ns for p in drawn]
    result = run(LAUNCH + args + [f"output_dir={tmp_path / 'full'}"])  # a full fine-tune, the same class images
    assert [p.stat().st_mtime_ns for p in drawn] == stamps and "drawing" not in result.stderr
    assert (tmp_path / "full" / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert len(scalars(tmp_path / "full", "val/loss")) == 2  # validation images from data's held-out split


def test_class_images_are_drawn_by_every_rank_and_keyed_by_base_and_settings(base_dir, tmp_path):
    """Two ranks (threads here) draw their shares and each waits, polling, for the other's; together the same
    pixels as one rank alone. Another base, other settings or other prompts are refused, naming what differs."""
    import threading

    from PIL import Image

    from recipes.dreambooth import class_images, model_fingerprint

    drawing = {"base_fingerprint": model_fingerprint(base_dir), "num_inference_steps": 2, "guidance_scale": 3.0,
               "seed": 7}
    prompts = ["a face", "a cat"]
    pipe = Pipeline(model=base_dir)
    calls, results = [], {}

    def rank(r, delay):
        def make():
            calls.append(r)
            threading.Event().wait(delay)  # rank 0 is slow: rank 1 must wait for its images, not return early
            return pipe
        paths = class_images(tmp_path / "two", prompts, 5, make, drawing, rank=r, world=2, poll=0.05)
        results[r] = [p.is_file() for p in paths]

    threads = [threading.Thread(target=rank, args=(r, 1.0 - r)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == [0, 1] and results == {0: [True] * 5, 1: [True] * 5}
    alone = class_images(tmp_path / "one", prompts, 5, lambda: pipe, drawing)
    for a, b in zip(alone, sorted((tmp_path / "two").glob("class-*.png"))):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert class_images(tmp_path / "one", prompts, 5, lambda: 1 / 0, drawing)  # all there: the base not loaded

    for changed, what in (({**drawing, "guidance_scale": 5.0}, "guidance_scale"),
                          ({**drawing, "base_fingerprint": "0" * 64}, "base_fingerprint"),
                          ({**drawing, "num_inference_steps": 3}, "num_inference_steps")):
        with pytest.raises(UserError, match=f"drawn with another {what}"):
            class_images(tmp_path / "one", prompts, 5, lambda: pipe, changed)
    with pytest.raises(UserError, match="drawn with another prompts"):
        class_images(tmp_path / "one", ["a dog"], 5, lambda: pipe, drawing)
    (tmp_path / "one" / "drawn_with.json").unlink()  # images whose record is gone (or an older release's folder)
    with pytest.raises(UserError, match="drawn before their base and settings were recorded"):
        class_images(tmp_path / "one", prompts, 5, lambda: pipe, drawing)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "prompts.json").write_text('["a dog"]')
    with pytest.raises(UserError, match="drawn before their base and settings were recorded"):
        class_images(legacy, prompts, 5, lambda: pipe, drawing)


def test_the_prior_loss_is_instance_plus_weighted_class_loss():
    from recipes.dreambooth import prior_weights

    losses = torch.tensor([1.0, 3.0, 10.0, 20.0])  # two instance images, then their two class images
    weights = prior_weights(torch.tensor([False, False, True, True]), 0.5)
    assert (weights * losses).mean().item() == pytest.approx(2.0 + 0.5 * 15.0)


def test_dreambooth_validation_leaves_out_its_instance_images(emoji_dir, base_dir, tmp_path):
    """Instance images taken from data's held-out split (as the adaptation benchmark takes them) are not
    validation rows: the validation loss would otherwise score the images being trained on."""
    from PIL import Image

    from recipes.latent_diffusion import LDMTrainer

    held = sorted((emoji_dir / "validation").glob("*.png"))
    instance = tmp_path / "subject"
    instance.mkdir()
    for path in held[:2]:
        shutil.copy(path, instance / path.name)
    Image.open(held[2]).convert("RGB").save(instance / "resaved.png")  # other bytes, the same picture
    config = load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", [
        f"init_from={base_dir}", f"output_dir={tmp_path / 'run'}", f"data={emoji_dir}", f"instance_data={instance}",
        "instance_prompt=a sks face", "identifier=sks", "lora=true", "validation_max_images=1000"])
    trainer = LDMTrainer(config)
    trainer.setup()
    assert len(trainer.validation_rows) == len(held) - 3
    pictures = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in held[:3]]
    for row in trainer.validation_rows:
        values = row["pixel_values"].permute(1, 2, 0).numpy()
        assert all(np.abs(values - picture).mean() > 0.01 for picture in pictures)


def test_bad_dreambooth_inputs_are_one_line_each(emoji_dir, base_dir, tmp_path):
    from recipes.latent_diffusion import LDMTrainer

    def config(*extra):
        return load_config(LDMTrainConfig, "configs/ldm/tiny.yaml", [f"init_from={base_dir}",
                                                                     f"output_dir={tmp_path / 'run'}", *extra])

    with pytest.raises(UserError, match="does not contain the identifier 'sks'"):
        config(f"instance_data={tmp_path}", "instance_prompt=a photo of a dog", "identifier=sks")
    with pytest.raises(UserError, match="identifier is required with instance_data"):
        config(f"instance_data={tmp_path}", "instance_prompt=a photo of a dog")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = _instance_folder(emoji_dir, tmp_path / "broken", count=2)
    (broken / "zz-bad.png").write_bytes(b"not a png")
    for folder, message in ((empty, f"instance_data {empty} holds no images"),
                            (broken, f"image {broken / 'zz-bad.png'} does not decode")):
        trainer = LDMTrainer(config(f"instance_data={folder}", "instance_prompt=a sks face", "identifier=sks"))
        with pytest.raises(UserError, match=message):
            trainer.run()


def test_a_lora_on_an_inpainting_model_trains_loads_like_diffusers_and_refuses_the_wrong_kind(emoji_dir, base_dir,
                                                                                              lora_run, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from ldm.unet import inpainting_unet_from

    base = Pipeline(model=base_dir)
    torch.manual_seed(1)
    unet = inpainting_unet_from(base.unet, 4)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(0, 0.2)
    inpaint_dir = InpaintPipeline(vae=base.vae, text_encoder=base.text_encoder, unet=unet,
                                  scheduler=base.scheduler).save_pretrained(tmp_path / "inpaint-base")
    with pytest.raises(UserError, match="already an inpainting model: add lora=true"):
        load_config(InpaintTrainConfig, "configs/ldm/tiny-inpaint.yaml",
                    [f"data={emoji_dir}", f"init_from={inpaint_dir}", f"output_dir={tmp_path / 'x'}"])
    out = tmp_path / "run"
    run(LAUNCH + ["train_ldm.py", "--config", "configs/ldm/tiny-inpaint.yaml", f"data={emoji_dir}",
                  f"init_from={inpaint_dir}", f"output_dir={out}", "lora=true", "learning_rate=0.05", "max_steps=6",
                  "checkpoint_every=6", "sample_every=6"])
    assert json.loads((out / "final" / "adapter.json").read_text())["in_channels"] == 9
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    mask = Image.fromarray(mask)
    kwargs = dict(num_inference_steps=5, guidance_scale=3.0, output_type="numpy", seed=2, paste_back=False,
                  progress=False)
    plain = InpaintPipeline(model=inpaint_dir).generate("a cat", image=image, mask=mask, **kwargs)
    got = InpaintPipeline(model=inpaint_dir, lora=out).generate("a cat", image=image, mask=mask, **kwargs)
    theirs = StableDiffusionInpaintPipeline.from_pretrained(inpaint_dir, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(out / "final")
    expected = theirs("a cat", image=image, mask_image=mask, num_inference_steps=5, guidance_scale=3.0,
                      output_type="np", generator=torch.Generator().manual_seed(2)).images
    assert np.abs(got - expected).max() <= 1 / 255 and np.abs(got - plain).max() > 10 / 255
    with pytest.raises(UserError, match="trained on a U-Net with 4 input channels"):
        InpaintPipeline(model=inpaint_dir, lora=lora_run, lora_force=True)


# ---- an LCM-LoRA among the adapters: the sampling mode follows the active ones ------------------------------------

def _as_lcm_lora(final, folder):
    """The trained adapter re-recorded as an LCM-LoRA (what `distill=true lora=true` writes): the record is what
    switches the sampling mode, so the weights need not be distilled for these checks."""
    shutil.copytree(final, folder)
    info = json.loads((folder / "adapter.json").read_text())
    info["consistency"] = {"original_inference_steps": 50, "timestep_scaling": 10.0, "max_steps": 8}
    (folder / "adapter.json").write_text(json.dumps(info))
    return folder


def _draw(pipe, **kwargs):
    return pipe.generate(["a cat"], seed=3, progress=False, output_type="numpy", **kwargs)


def test_an_lcm_lora_samples_as_a_student_only_while_it_is_active(base_dir, lora_run, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    lcm = _as_lcm_lora(lora_run / "final", tmp_path / "lcm-lora")
    pipe = Pipeline(model=base_dir, lora=[lora_run / "final", lcm])
    assert pipe.consistency_adapter == "adapter_1" and pipe.is_consistency_student
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.default_steps() == 4
    assert pipe.default_guidance_scale() == 1.0  # no classifier-free guidance: what it learnt
    assert np.array_equal(_draw(pipe), _draw(pipe, guidance_scale=1.0, num_inference_steps=4))
    assert not np.array_equal(_draw(pipe), _draw(pipe, guidance_scale=5.0, num_inference_steps=4))

    base = Pipeline(model=base_dir)
    plain = Pipeline(model=base_dir, lora=lora_run / "final")
    for active, reference in (({}, base), ({"adapter_0": 1.0}, plain)):
        pipe.activate_lora(active)  # the LCM-LoRA off: the base's own sampler, steps and guidance again
        assert not pipe.is_consistency_student and pipe.consistency_adapter is None
        assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.default_steps() == 30
        assert pipe.default_guidance_scale() == 5.0
        assert np.abs(_draw(pipe, num_inference_steps=5) - _draw(reference, num_inference_steps=5)).max() < 1e-5
        with pytest.raises(UserError, match="lcm sampler needs a consistency-distilled model"):
            _draw(pipe, scheduler="lcm")
    pipe.activate_lora({"adapter_1": 1.0})  # and on again
    assert pipe.is_consistency_student and isinstance(pipe.scheduler, LCMScheduler)
    assert np.array_equal(_draw(pipe), _draw(Pipeline(model=base_dir, lora=lcm)))


def test_the_page_samples_the_base_with_its_own_sampler_beside_an_lcm_lora(base_dir, lora_run, tmp_path):
    """`ldm serve --lora-dir` with an LCM-LoRA in the folder: 'none' and a plain adapter sample as the base does,
    the LCM-LoRA with the lcm sampler."""
    pytest.importorskip("gradio")
    from web.app import build_app

    adapters = tmp_path / "adapters"
    shutil.copytree(lora_run / "final", adapters / "plain")
    _as_lcm_lora(lora_run / "final", adapters / "fast")
    app = build_app(model=str(base_dir), lora_dir=str(adapters))
    generate = next(f.fn for f in app.fns.values() if f.fn.__name__ == "generate")

    def page(adapter, steps, guidance):
        history, _, _ = generate("a cat", "", "model's own", steps, guidance, 5, False, 1, 32, [], adapter, 1.0,
                                 False)
        return np.asarray(history[0][0], dtype=int)

    def ours(steps, guidance, **kwargs):
        image = Pipeline(model=base_dir, **kwargs).generate("a cat", num_inference_steps=steps, guidance_scale=guidance,
                                                            seed=5, height=32, width=32, progress=False)[0]
        return np.asarray(image, dtype=int)

    assert np.abs(page("none", 5, 3.0) - ours(5, 3.0)).max() <= 1
    assert np.abs(page("plain", 5, 3.0) - ours(5, 3.0, lora=adapters / "plain")).max() <= 1
    assert np.abs(page("fast", 4, 1.0) - ours(4, 1.0, lora=adapters / "fast")).max() <= 1
    assert np.abs(page("none", 5, 3.0) - ours(5, 3.0)).max() <= 1  # and back
    switch = next(f.fn for f in app.fns.values() if f.fn.__name__ == "<lambda>" and f.inputs
                  and getattr(f.inputs[0], "elem_id", None) == "adapter")
    # an LCM-LoRA's own steps and guidance, on its own timestep grid (no step schedule)
    assert switch("fast", 12, 3.0) == (4, 1.0, "sampler's own")
    # leaving it: the model's own (this base has no sampling.json: the library's, even spacing)
    assert switch("plain", 4, 1.0) == (30, 5.0, "sampler's own") == switch("none", 4, 1.0)
    kept = switch("plain", 12, 3.0)  # between other adapters, the visitor's values stay
    assert all(isinstance(u, dict) and set(u) <= {"__type__"} for u in kept)
