"""The shared command line of the training scripts: `--config FILE` followed by `key=value` overrides."""

from __future__ import annotations

import argparse


def parse_training_args(description: str, argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    """Return (config path, overrides)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="flat YAML config (presets in configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    args = parser.parse_args(argv)
    return args.config, args.overrides
