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
    (`InpaintTrainConfig`), with `distill: true` a consistency distillation config (`DistillTrainConfig`): the file
    read once. The recipes load here, not for the other training scripts."""
    from recipes.consistency import DistillTrainConfig
    from recipes.inpainting import InpaintTrainConfig
    from recipes.latent_diffusion import LDMTrainConfig

    values, sources = read_config(path, overrides)
    if values.get("inpainting") is True and values.get("distill") is True:
        from core.errors import UserError
        raise UserError("inpainting=true and distill=true: distillation supports text-to-image teachers only")
    cls = (InpaintTrainConfig if values.get("inpainting") is True
           else DistillTrainConfig if values.get("distill") is True else LDMTrainConfig)
    return build_config(cls, values, sources, validate=validate)
