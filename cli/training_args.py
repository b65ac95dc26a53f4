"""The shared command line of the training scripts (`--config FILE` followed by `key=value` overrides) and the
choice of the latent diffusion recipe's config class, made once from the values (a saved config.yaml too)."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.config import build_config, read_config


def parse_training_args(description: str, argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    """Return (config path, overrides)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="flat YAML config (presets in configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def ldm_config(path: str | Path | None, overrides: list[str] | None = None,
               validate: bool = True):
    """A text-to-image (`LDMTrainConfig`), with `inpainting: true` an inpainting fine-tune config
    (`InpaintTrainConfig`), with `distill: true` a consistency distillation config (`DistillTrainConfig`), with
    `controlnet: true` a ControlNet config (`ControlNetTrainConfig`): the file read once. The recipes load here, not for the other training scripts."""
    from recipes.consistency import DistillTrainConfig
    from recipes.controlnet import ControlNetTrainConfig
    from recipes.inpainting import InpaintTrainConfig
    from recipes.latent_diffusion import LDMTrainConfig

    values, sources = read_config(path, overrides)
    chosen = [key for key in ("inpainting", "distill", "controlnet") if values.get(key) is True]
    if len(chosen) > 1:
        from core.errors import UserError
        raise UserError(f"{' and '.join(f'{k}=true' for k in chosen)}: a run trains one of these recipes (an "
                        "inpainting fine-tune, a distilled student or a ControlNet), each from a text-to-image model")
    cls = {"inpainting": InpaintTrainConfig, "distill": DistillTrainConfig,
           "controlnet": ControlNetTrainConfig}.get(chosen[0] if chosen else "", LDMTrainConfig)
    return build_config(cls, values, sources, validate=validate)


def trainer_for(config):
    """The recipe's trainer for a config `ldm_config` gave (its class says which recipe)."""
    from recipes.consistency import DistillTrainConfig, DistillTrainer
    from recipes.controlnet import ControlNetTrainConfig, ControlNetTrainer
    from recipes.inpainting import InpaintTrainConfig, InpaintTrainer
    from recipes.latent_diffusion import LDMTrainer

    for config_class, trainer in ((InpaintTrainConfig, InpaintTrainer), (DistillTrainConfig, DistillTrainer),
                                  (ControlNetTrainConfig, ControlNetTrainer)):
        if isinstance(config, config_class):
            return trainer(config)
    return LDMTrainer(config)
