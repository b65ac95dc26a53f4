"""Flat YAML configs: load, apply `key=value` overrides, validate against a dataclass, save beside checkpoints."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.errors import MissingFileError, UserError

C = TypeVar("C")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["lr=1e-4", "name=run"]` into a dict; values are parsed as YAML scalars (numbers, booleans, null)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"cannot read override '{item}': write it as key=value, e.g. max_steps=100")
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as err:
            raise UserError(f"cannot read the value of override '{item}' as YAML ({type(err).__name__}); quote "
                            f"text that starts with [ {{ or a colon: {key}='...'") from err
    return overrides


def _check_type(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Return `value` converted to the field's type, or raise a UserError naming the key and the expected type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(name, value, inner[0], source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{name}' (from {source}) must be a list, got {value!r}")
        return [_check_type(name, v, args[0], source) for v in value] if args else list(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise UserError(f"config key '{name}' (from {source}) must be {annotation.__name__}, got {value!r}")


def read_config(path: str | Path | None, overrides: list[str] | None = None
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw values a flat YAML file and its `key=value` overrides set (overrides last), and where each came from.
    The file is read once, so a caller can choose the config class by a value (e.g. `inpainting`) before building."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"config file {path} does not exist; presets live in configs/, e.g. "
                                   "configs/ldm/tiny.yaml")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UserError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path} must be a flat mapping of key: value")
        values.update(loaded)
        sources.update(dict.fromkeys(loaded, str(path)))
    command_line = parse_overrides(overrides or [])
    values.update(command_line)
    sources.update(dict.fromkeys(command_line, "the command line"))
    return values, sources


def build_config(cls: type[C], values: dict[str, Any], sources: dict[str, str], validate: bool = True) -> C:
    """A config dataclass from raw values; unknown keys and wrong types are errors naming the key and its source.

    Keys a class lists in `renamed` (old name -> new name) are read under their new name, so configs and
    checkpoints written before a rename still load. `validate=False` skips the class's `validate` (reading a saved
    config for its settings, not to train with it).
    """
    values, sources = dict(values), dict(sources)
    renamed: dict[str, str] = getattr(cls, "renamed", {})
    for old, new in renamed.items():
        if old in values:
            if new in values:
                raise UserError(f"config keys '{old}' (the old name) and '{new}' are both set; keep '{new}'")
            values[new], sources[new] = values.pop(old), sources.pop(old)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise UserError(f"unknown config key '{key}' (from {sources[key]}){hint}")
    checked = {k: _check_type(k, v, hints[k], sources[k]) for k, v in values.items()}
    config = cls(**checked)
    if validate and hasattr(config, "validate"):
        config.validate()
    return config


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None,
                validate: bool = True) -> C:
    """Build a config dataclass from a flat YAML file plus `key=value` overrides (see `build_config`)."""
    return build_config(cls, *read_config(path, overrides), validate=validate)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as flat YAML (the exact settings a checkpoint was made with)."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
