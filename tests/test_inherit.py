"""A fine-tune inherits what its base decided (recipes/inherit.py): text encoder and length, noise schedule,
prediction type, variance and latent space come from init_from's folder, never from a config default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli.training_args import ldm_config
from core.errors import UserError
from recipes.inherit import SCRATCH_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "pipelines" / "default_model"


@pytest.fixture(scope="module")
def unusual_base(tmp_path_factory, text_encoder):
    """A tiny base trained (as far as its folder says) at 16 tokens, a linear schedule with other betas, 500
    timesteps and v-prediction: every inherited setting differs from the config defaults."""
    from diffusers import DDIMScheduler

    from autoencoder.model import build_autoencoder
    from ldm.diffusion import NoiseSchedule
    from ldm.unet import build_unet
    from pipelines import Pipeline

    torch.manual_seed(0)
    vae = build_autoencoder("tiny", resolution=32)
    vae.register_to_config(scaling_factor=0.75)
    unet = build_unet("tiny", latent_size=16, latent_channels=4, cross_attention_dim=text_encoder.hidden_size)
    schedule = NoiseSchedule(500, "linear", 0.0005, 0.02, "v_prediction")
    scheduler = DDIMScheduler.from_config(schedule.to_scheduler_config())
    return Pipeline(vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler).save_pretrained(
        tmp_path_factory.mktemp("unusual") / "model")


EXPECTED = {"text_max_length": 16, "num_train_timesteps": 500, "beta_schedule": "linear", "beta_start": 0.0005,
            "beta_end": 0.02, "prediction_type": "v_prediction", "zero_terminal_snr": False,
            "learned_variance": False}


@pytest.mark.parametrize("preset", ["emoji-64-lora.yaml", "emoji-64-dreambooth.yaml", "emoji-64-lcm.yaml",
                                    "emoji-64-inpaint.yaml"])
def test_fine_tune_presets_train_at_the_base_settings(preset, unusual_base, tmp_path):
    """Every fine-tune preset, pointed at a base unlike the defaults, trains at the base's settings."""
    extra = ["instance_data=x", "instance_prompt=a sks face", "identifier=sks"] if "dreambooth" in preset else []
    config = ldm_config(ROOT / "configs" / "ldm" / preset,
                        [f"init_from={unusual_base}", f"output_dir={tmp_path}", f"data={tmp_path}", *extra])
    for key, value in EXPECTED.items():
        assert getattr(config, key) == pytest.approx(value) if isinstance(value, float) else getattr(config, key) \
            == value, key
    assert config.text_encoder == str(unusual_base)  # a full folder's own text_encoder/
    assert config.autoencoder == str(unusual_base / "vae")
    schedule = config.noise_schedule()
    assert schedule.prediction_type == "v_prediction" and len(schedule.alphas_cumprod) == 500


def test_the_default_base_gives_its_32_tokens(tmp_path):
    """The embedded default was trained and samples at 32 tokens: its LoRA, DreamBooth and student train at 32."""
    for preset in ("emoji-64-lora.yaml", "emoji-64-lcm.yaml"):
        config = ldm_config(ROOT / "configs" / "ldm" / preset, [f"output_dir={tmp_path}", f"data={tmp_path}"])
        assert (config.text_encoder, config.text_max_length) == ("minilm", 32)
        assert config.beta_schedule == "scaled_linear" and config.prediction_type == "epsilon"


@pytest.mark.parametrize("override, message", [
    ("text_max_length=77", "text_max_length=77 differs from init_from"),
    ("prediction_type=epsilon", "prediction_type=epsilon differs"),
    ("beta_schedule=scaled_linear", "which was trained with beta_schedule=linear"),
    ("beta_end=0.012", "beta_end=0.012 differs"),
    ("num_train_timesteps=1000", "num_train_timesteps=1000 differs"),
    ("text_encoder=minilm", "text_encoder=minilm differs"),
    ("learned_variance=true", "learned_variance=True differs"),
])
def test_a_setting_other_than_the_base_is_refused(override, message, unusual_base, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        ldm_config(ROOT / "configs" / "ldm" / "emoji-64-lora.yaml",
                   [f"init_from={unusual_base}", f"output_dir={tmp_path}", f"data={tmp_path}", override])


def test_the_base_value_written_out_is_accepted(unusual_base, tmp_path):
    """A config repeating the base's own values (as a resumed run's saved config does) is fine."""
    overrides = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in EXPECTED.items()]
    config = ldm_config(ROOT / "configs" / "ldm" / "emoji-64-lora.yaml",
                        [f"init_from={unusual_base}", f"output_dir={tmp_path}", f"data={tmp_path}", *overrides])
    assert config.prediction_type == "v_prediction"


def test_another_latent_space_is_refused(unusual_base, tmp_path):
    """An autoencoder beside init_from must encode as the base's does: the default's vae is another latent space;
    the base's own vae under another path is accepted."""
    with pytest.raises(UserError, match="does not encode as init_from"):
        ldm_config(ROOT / "configs" / "ldm" / "emoji-64-lora.yaml",
                   [f"init_from={unusual_base}", f"output_dir={tmp_path}", f"data={tmp_path}",
                    f"autoencoder={DEFAULT / 'vae'}"])
    import shutil
    copy = shutil.copytree(unusual_base / "vae", tmp_path / "vae-copy")
    config = ldm_config(ROOT / "configs" / "ldm" / "emoji-64-lora.yaml",
                        [f"init_from={unusual_base}", f"output_dir={tmp_path}", f"data={tmp_path}",
                         f"autoencoder={copy}"])
    assert config.autoencoder == str(copy)


def test_from_scratch_the_defaults_apply(tmp_path):
    config = ldm_config(ROOT / "configs" / "ldm" / "tiny.yaml",
                        [f"output_dir={tmp_path}", f"data={tmp_path}", "autoencoder=x"])
    assert config.text_max_length == 16  # the preset's own
    for key in ("num_train_timesteps", "beta_schedule", "prediction_type", "learned_variance"):
        assert getattr(config, key) == SCRATCH_DEFAULTS[key]
    config = ldm_config(None, [f"output_dir={tmp_path}", f"data={tmp_path}", "autoencoder=x", f"data={tmp_path}"])
    assert (config.text_encoder, config.text_max_length) == ("minilm", 77)


def test_the_student_teacher_step_and_export_use_the_base_schedule(unusual_base, tmp_path):
    """The distillation's LCMScheduler (its export) is built on the teacher's schedule and prediction type."""
    config = ldm_config(ROOT / "configs" / "ldm" / "emoji-64-lcm.yaml",
                        [f"init_from={unusual_base}", f"output_dir={tmp_path}", f"data={tmp_path}"])
    scheduler = config.lcm_scheduler()
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.num_train_timesteps == 500 and scheduler.config.beta_schedule == "linear"


def test_a_training_exports_installed_text_encoder_is_inherited_by_name(unusual_base, tmp_path):
    """A train_ldm.py export holds a copy of the encoder its config.yaml names: a fine-tune records the name (so its
    own export does not depend on the base folder's path); the folder's path is accepted as the same setting."""
    import shutil

    export = shutil.copytree(unusual_base, tmp_path / "export")
    (export / "config.yaml").write_text("text_encoder: minilm\ntext_max_length: 16\n")
    config = ldm_config(ROOT / "configs" / "ldm" / "emoji-64-lora.yaml",
                        [f"init_from={export}", f"output_dir={tmp_path / 'a'}", f"data={tmp_path}"])
    assert config.text_encoder == "minilm"
    config = ldm_config(ROOT / "configs" / "ldm" / "emoji-64-lora.yaml",
                        [f"init_from={export}", f"output_dir={tmp_path / 'b'}", f"data={tmp_path}",
                         f"text_encoder={export}"])
    assert config.text_encoder == str(export)
