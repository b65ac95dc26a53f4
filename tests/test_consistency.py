"""Consistency distillation (recipes/consistency.py) and the lcm sampler: the LCM math against diffusers'
LCMScheduler and StableDiffusionPipeline, the recipe through `accelerate launch train_ldm.py` (resume bit-exact, the
export drawing the same pixels in diffusers, an LCM-LoRA), and one clear line for each bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from cli.main import main as ldm_main
from core.config import load_config
from core.errors import MissingFileError, UserError
from ldm.diffusion import (NoiseSchedule, consistency_output, consistency_scalings, guidance_embedding,
                           guided_ddim_step, pseudo_huber_loss, solver_timesteps)
from ldm.unet import build_unet
from pipelines import InpaintPipeline, Pipeline
from recipes.consistency import DistillTrainConfig, DistillTrainer, student_from
from web.app import build_app, sampler_choices
from web.requests import MODEL_SCHEDULER, SAMPLER_SPACING
from helpers import LAUNCH, ROOT, dropdown_values, page_component, run


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def teacher_dir(base_model_dir):
    """A seeded tiny text-to-image model folder: the teacher."""
    return base_model_dir


def _args(emoji_dir, teacher_dir, output_dir, *extra):
    return ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={emoji_dir}", f"init_from={teacher_dir}",
            f"output_dir={output_dir}", "distill=true", "learning_rate=0.01", "ema_decay=0.9",
            "guidance_scale_min=1.5", "guidance_scale_max=4", "sample_every=1000", "checkpoint_every=5",
            "sample_num_inference_steps=2", *extra]


@pytest.fixture(scope="module")
def lcm_run(emoji_dir, teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm") / "run"
    run(LAUNCH + _args(emoji_dir, teacher_dir, out, "max_steps=10"))
    return out


def _sample(pipe, steps=4, guidance=3.0, **kwargs):
    return pipe.generate(["a cat", "red apple"], num_inference_steps=steps, guidance_scale=guidance,
                         output_type="numpy", seed=3, progress=False, **kwargs)


# ---- the math, against diffusers ---------------------------------------------------------------------------------

def test_the_lcm_math_is_diffusers_lcm_scheduler_and_pipeline_math():
    scheduler = LCMScheduler.from_config({**NoiseSchedule().to_scheduler_config(), "original_inference_steps": 50})
    scheduler.set_timesteps(50)
    assert torch.equal(solver_timesteps(1000, 50), scheduler.timesteps.flip(0).cpu())  # 19, 39, ..., 999
    for t in (0, 1, 19, 500, 999):
        c_skip, c_out = consistency_scalings(torch.tensor([t]))
        theirs = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert abs(c_skip.item() - theirs[0]) < 1e-6 and abs(c_out.item() - theirs[1]) < 1e-6
    scales = torch.tensor([1.0, 2.5, 7.0])
    expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, scales - 1, embedding_dim=256)
    assert torch.allclose(guidance_embedding(scales, 256), expected, atol=1e-6)
    assert guidance_embedding(scales, 7).shape == (3, 7)


def test_boundary_condition_and_an_exact_teacher_step():
    schedule = NoiseSchedule()
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    # f(x, 0) = x whatever the network says
    zero = torch.zeros(2, dtype=torch.long)
    assert torch.allclose(consistency_output(schedule, x0, zero, torch.randn_like(x0)), x0, atol=1e-6)
    # a teacher that predicts the true noise steps exactly along the ODE: x_prev is x0 noised to t_prev, with any
    # guidance scale (cond == uncond)
    t, prev = torch.tensor([519, 999]), torch.tensor([499, 979])
    xt = schedule.add_noise(x0, noise, t)
    step = guided_ddim_step(schedule, xt, t, prev, noise, noise, torch.tensor([3.0, 5.0]))
    assert torch.allclose(step, schedule.add_noise(x0, noise, prev), atol=1e-5)
    # guidance: uncond + s (cond - uncond) in both x0 and eps
    other = torch.randn_like(noise)
    guided = guided_ddim_step(schedule, xt, t, prev, noise, other, torch.tensor([1.0, 1.0]))
    assert torch.allclose(guided, step, atol=1e-5)  # s = 1: the conditional branch alone
    assert pseudo_huber_loss(x0, x0, 0.001).item() == 0
    assert abs(pseudo_huber_loss(torch.ones(4), torch.zeros(4), 0.001).item() - (1.0000005 - 0.001)) < 1e-6


def _recorded(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    """Record each call of a U-Net: (input latents, timesteps, output)."""
    return module.register_forward_hook(lambda m, args, kwargs, out: calls.append((args[0], args[1], out.sample)),
                                        with_kwargs=True)


def test_the_consistency_pair_steps_the_teacher_to_the_ddim_solvers_previous_point_clamped_at_0(emoji_dir,
                                                                                               teacher_dir, tmp_path):
    """`consistency_pair` against diffusers' train_lcm_distill_sd_wds.py, written out here: its DDIMSolver grid
    (ddim_timesteps, ddim_alpha_cumprods_prev), the target's timestep start - T // N with negatives set to 0, the
    guided DDIM step, and LCMScheduler's boundary scalings; at every point of the grid."""
    trainer = DistillTrainer(load_config(DistillTrainConfig, ROOT / "configs" / "ldm" / "tiny.yaml", [
        f"data={emoji_dir}", f"init_from={teacher_dir}", f"output_dir={tmp_path}", "distill=true"]))
    trainer.setup()
    config = trainer.config
    steps, total = config.num_solver_steps, config.num_train_timesteps
    alphas_cumprod = DDPMScheduler.from_config(config.noise_schedule().to_scheduler_config()).alphas_cumprod
    assert (steps, total, config.prediction_type) == (50, 1000, "epsilon")
    # DDIMSolver: the grid, and each point's previous alpha_bar (alpha_bar[0] before the first point)
    ddim_timesteps = torch.arange(1, steps + 1) * (total // steps) - 1  # 19, 39, ..., 999
    ddim_alpha_cumprods_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])
    index = torch.arange(steps)
    start = ddim_timesteps[index]
    previous = start - total // steps
    previous = torch.where(previous < 0, torch.zeros_like(previous), previous)
    assert previous[:3].tolist() == [0, 19, 39] and previous[-1] == 979

    torch.manual_seed(0)
    latents = torch.randn(steps, 4, 16, 16)
    context = torch.randn(steps, *trainer.validation_batches[0]["context"].shape[1:])
    scale = torch.linspace(1.5, 6.0, steps)
    student, target = trainer.inference_model(), trainer.target
    calls = {"student": [], "teacher": [], "target": []}
    hooks = [_recorded(m, calls[name]) for name, m in (("student", student), ("teacher", trainer.teacher),
                                                       ("target", target))]
    with torch.no_grad():
        prediction, goal = trainer.consistency_pair(student, target, latents, context, index, scale)
    for hook in hooks:
        hook.remove()
    (noisy, student_t, student_out), = calls["student"]
    (teacher_in, teacher_t, teacher_out), = calls["teacher"]
    (earlier, target_t, target_out), = calls["target"]
    assert student_t.tolist() == start.tolist() and teacher_t.tolist() == 2 * start.tolist()
    assert torch.equal(teacher_in, torch.cat([noisy, noisy]))
    assert target_t.tolist() == previous.tolist()

    def alpha_sigma(t):
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def x0_from(output, x, t):  # epsilon prediction
        alpha, sigma = alpha_sigma(t)
        return (x - sigma * output) / alpha

    # the guided DDIM step (w = scale - 1 in the script's cond + w (cond - uncond)) to ddim_alpha_cumprods_prev
    cond, uncond = teacher_out.chunk(2)
    w = (scale - 1).view(-1, 1, 1, 1)
    x0 = x0_from(cond, noisy, start) + w * (x0_from(cond, noisy, start) - x0_from(uncond, noisy, start))
    eps = cond + w * (cond - uncond)
    alpha_prev = ddim_alpha_cumprods_prev[index].view(-1, 1, 1, 1)
    assert torch.allclose(earlier, alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps, atol=1e-5)

    def boundary(x, t, output):  # c_skip x + c_out x0 with LCMScheduler's scalings
        lcm = config.lcm_scheduler()
        skip, out = zip(*(lcm.get_scalings_for_boundary_condition_discrete(int(s)) for s in t))
        shape = (-1, 1, 1, 1)
        return torch.tensor(skip).view(shape) * x + torch.tensor(out).view(shape) * x0_from(output, x, t)

    assert torch.allclose(prediction, boundary(noisy, start, student_out), atol=1e-5)
    assert torch.allclose(goal, boundary(earlier, previous, target_out), atol=1e-5)
    assert torch.equal(goal[0], earlier[0])  # clamped to t = 0: f(x, 0) = x
    trainer.cleanup()


def test_the_student_starts_as_the_teacher_for_every_guidance_scale(text_encoder):
    torch.manual_seed(0)
    teacher = build_unet("tiny", latent_size=8, latent_channels=4, cross_attention_dim=text_encoder.hidden_size)
    student = student_from(teacher, 32)
    assert student.config.time_cond_proj_dim == 32
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, text_encoder.hidden_size)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = teacher(x, t, encoder_hidden_states=context).sample
        for scale in (1.0, 6.0):
            got = student(x, t, encoder_hidden_states=context,
                          timestep_cond=guidance_embedding(torch.full((2,), scale), 32)).sample
            assert torch.allclose(got, expected, atol=1e-6)


# ---- the recipe through accelerate launch -----------------------------------------------------------------------

def test_distillation_exports_a_student_that_diffusers_samples_to_the_same_pixels(lcm_run, teacher_dir):
    final = lcm_run / "final"
    assert json.loads((final / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    config = json.loads((final / "unet" / "config.json").read_text())
    assert config["time_cond_proj_dim"] == 256
    student = Pipeline(model=final)
    assert student.is_consistency_student and student.default_steps() == 4
    assert sampler_choices(student) == ([MODEL_SCHEDULER, "lcm"], [SAMPLER_SPACING])  # what the page offers it
    app = build_app(model=str(final))  # and what the page built on it shows
    assert dropdown_values(page_component(app, "gen-sampler")) == [MODEL_SCHEDULER, "lcm"]
    assert dropdown_values(page_component(app, "gen-step-schedule")) == [SAMPLER_SPACING]
    assert student.unet.time_embedding.cond_proj.weight.abs().max() > 0  # the guidance input was trained
    theirs = StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert isinstance(theirs.scheduler, LCMScheduler)
    for steps, guidance in ((1, 3.0), (4, 3.0), (4, 1.5)):
        expected = theirs(["a cat", "red apple"], num_inference_steps=steps, guidance_scale=guidance,
                          output_type="np", generator=torch.Generator().manual_seed(3)).images
        got = _sample(student, steps, guidance)
        assert np.abs(got - expected).max() <= 1 / 255, (steps, guidance)  # within one 8-bit level
    # the guidance scale is an input (ten steps moved it a little: exactly equal if it were ignored)
    assert np.abs(_sample(student, 4, 1.5) - _sample(student, 4, 4.0)).max() > 1e-4
    # the distilled student differs from the teacher sampled the same way (which the lcm sampler refuses)
    with pytest.raises(UserError, match="lcm sampler needs a consistency-distilled model.*--fast"):
        _sample(Pipeline(model=teacher_dir), scheduler="lcm")


@pytest.mark.slow  # 2 launches: CI's second stage (the same loop's resume: test_train_ldm.py, test_lora.py)
def test_distillation_resumes_bit_exactly(emoji_dir, teacher_dir, lcm_run, tmp_path):
    resumed = tmp_path / "resumed"
    run(LAUNCH + _args(emoji_dir, teacher_dir, resumed, "max_steps=7"))
    result = run(LAUNCH + _args(emoji_dir, teacher_dir, resumed, "max_steps=10",
                                f"resume={resumed / 'checkpoints' / 'step-00000005'}"))
    assert "at step 5" in result.stderr
    for name in ("final/unet/diffusion_pytorch_model.safetensors", "checkpoints/step-00000010/model.safetensors"):
        a, b = load_file(lcm_run / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_an_lcm_lora_is_an_adapter_that_switches_the_base_to_the_lcm_sampler(emoji_dir, teacher_dir, tmp_path):
    out = tmp_path / "lcm-lora"
    run(LAUNCH + _args(emoji_dir, teacher_dir, out, "max_steps=4", "lora=true", "lora_rank=4"))
    info = json.loads((out / "final" / "adapter.json").read_text())
    assert info["consistency"]["original_inference_steps"] == 50
    pipe = Pipeline(model=teacher_dir, lora=out / "final")
    assert pipe.is_consistency_student and isinstance(pipe.scheduler, LCMScheduler)
    assert _sample(pipe, 2, 1.0).shape == (2, 32, 32, 3)
    base = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
    base.set_progress_bar_config(disable=True)
    base.load_lora_weights(out / "final")
    base.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    expected = base(["a cat", "red apple"], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images
    assert np.abs(_sample(pipe, 2, 1.0) - expected).max() <= 1 / 255


# ---- bad input ---------------------------------------------------------------------------------------------------

def _config(*overrides):
    return load_config(DistillTrainConfig, ROOT / "configs" / "ldm" / "tiny.yaml",
                       ["output_dir=/tmp/never", "data=somewhere", "distill=true", *overrides])


def test_bad_distillation_settings_are_refused_with_what_is_supported(teacher_dir, tmp_path, tiny_components):
    with pytest.raises(UserError, match="needs a teacher: add init_from"):
        _config()
    with pytest.raises(UserError, match="0 <= min <= max"):
        _config(f"init_from={teacher_dir}", "guidance_scale_min=5", "guidance_scale_max=2")
    with pytest.raises(UserError, match="0 <= min <= max"):
        _config(f"init_from={teacher_dir}", "guidance_scale_min=-1")
    with pytest.raises(UserError, match="learned_variance=true is not supported"):
        _config(f"init_from={teacher_dir}", "learned_variance=true")
    with pytest.raises(UserError, match="distill=true: a run trains one of these recipes"):
        from cli.training_args import ldm_config
        ldm_config(ROOT / "configs" / "ldm" / "tiny.yaml", ["distill=true", "inpainting=true"])
    inpaint = InpaintPipeline(**tiny_components)  # a text-to-image U-Net in the inpainting pipeline
    inpaint_dir = tmp_path / "inpaint"
    from ldm.unet import inpainting_unet_from
    inpaint.unet = inpainting_unet_from(inpaint.unet, 4)
    inpaint.save_pretrained(inpaint_dir)
    with pytest.raises(UserError, match="not a text-to-image model folder"):
        _config(f"init_from={inpaint_dir}")
    learned = Pipeline(**{**tiny_components, "unet": build_unet("tiny", 16, 4, 384, learned_variance=True)})
    with pytest.raises(UserError, match="learned-variance model; distillation supports fixed-variance"):
        _config(f"init_from={learned.save_pretrained(tmp_path / 'learned')}")
    with pytest.raises(UserError, match="use_ema=true"):
        _config(f"init_from={teacher_dir}", "use_ema=false")


def test_the_lcm_sampler_and_a_student_refuse_what_does_not_fit(lcm_run, teacher_dir, capsys):
    student = Pipeline(model=lcm_run / "final")
    with pytest.raises(UserError, match="consistency-distilled student: it samples with the lcm sampler"):
        _sample(student, scheduler="dpm++")
    with pytest.warns(UserWarning, match="distilled for 1-8 steps"):
        _sample(student, 10)
    with pytest.warns(UserWarning, match="negative_prompt is ignored"):
        _sample(student, 2, negative_prompt="blurry")
    with pytest.raises(UserError, match="more than this student's 50-point timestep grid"):
        _sample(student, 51)
    with pytest.raises(UserError, match="fast=True loads the embedded distilled default"):
        Pipeline(model=teacher_dir, fast=True)
    from pipelines.loading import DEFAULT_FAST_MODEL_DIR
    if not DEFAULT_FAST_MODEL_DIR.exists():  # none ships in this release: the message says why and what to do
        with pytest.raises(MissingFileError, match="no consistency-distilled default is shipped.*emoji-64-lcm"):
            Pipeline(fast=True)
    with pytest.raises(UserError, match="cannot inpaint here"):
        InpaintPipeline(model=lcm_run / "final")
    with pytest.raises(SystemExit):
        ldm_main(["generate", "a cat", "--model", str(teacher_dir), "--scheduler", "lcm", "-o", "/tmp/never.png"])
    assert "lcm sampler needs a consistency-distilled model" in capsys.readouterr().err


def test_eval_generate_rows_for_student_and_teacher_and_their_quality_vs_time_plot(lcm_run, teacher_dir, emoji_dir,
                                                                                   tmp_path, capsys):
    common = ["--data", str(emoji_dir), "--num-images", "8", "--sweep-images", "4", "--guidance-scales", "none",
              "--batch-size", "8", "--cache-dir", str(tmp_path / "cache")]
    ldm_main(["eval", "generate", "--model", str(teacher_dir), "--steps", "2", "--samplers", "none",
              "--full-rows", "ddim:1", "--out", str(tmp_path / "teacher"), *common])
    ldm_main(["eval", "generate", "--model", str(lcm_run / "final"), "--full-rows", "lcm:1,lcm:2",
              "--samplers", "lcm:1", "--out", str(tmp_path / "student"), "--compare", str(tmp_path / "teacher"),
              *common])
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert (metrics["train"]["scheduler"], metrics["train"]["steps"]) == ("lcm", 4)  # a student's defaults
    for part in ("full_train", "full_heldout"):
        assert [(r["scheduler"], r["steps"]) for r in metrics[part]["rows"]] == [("lcm", 1), ("lcm", 2)]
        assert all(r["images"] == metrics["train" if part == "full_train" else "heldout"]["images"]
                   for r in metrics[part]["rows"])
    assert (tmp_path / "student" / "quality-vs-time.png").is_file()
    assert "more settings, held-out prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # lcm refused for the teacher before any image
        ldm_main(["eval", "generate", "--model", str(teacher_dir), "--samplers", "lcm:4",
                  "--out", str(tmp_path / "never"), *common])
    assert "lcm sampler needs a consistency-distilled model" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_two_ranks_distil_one_student(emoji_dir, teacher_dir, tmp_path):
    from helpers import TWO_RANKS

    out = tmp_path / "ddp"
    result = run(TWO_RANKS + _args(emoji_dir, teacher_dir, out, "max_steps=4", "checkpoint_every=2"),
                 env={"ACCELERATE_USE_CPU": "1"})
    assert "differ across ranks" not in result.stderr
    assert Pipeline(model=out / "final").is_consistency_student


def test_the_pages_fast_box_samples_a_student_and_a_non_student_is_refused(lcm_run, teacher_dir):
    pytest.importorskip("gradio")
    from web.app import build_app

    with pytest.raises(UserError, match="is not a consistency-distilled student"):
        build_app(model=str(teacher_dir), fast_model=str(teacher_dir))
    app = build_app(model=str(teacher_dir), fast_model=str(lcm_run / "final"))
    generate = next(f.fn for f in app.fns.values() if f.fn.__name__ == "generate")
    history, _, _ = generate("a cat", "", "model's own", 2, 3.0, 5, False, 1, 32, [], "none", 1.0, True)
    image = history[0][0]
    settings = json.loads(image.info["parameters"])
    assert (settings["model"], settings["steps"]) == (str(lcm_run / "final"), 2)
    expected = Pipeline(model=lcm_run / "final").generate("a cat", num_inference_steps=2, guidance_scale=3.0, seed=5,
                                                          height=32, width=32, progress=False)[0]
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
