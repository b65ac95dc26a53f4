import dataclasses
from typing import ClassVar, Optional

import pytest
import yaml

from core.config import load_config, parse_overrides, save_config
from core.errors import UserError


@dataclasses.dataclass
class Example:
    output_dir: str = ""
    max_steps: int = 10
    learning_rate: float = 1e-4
    use_ema: bool = True
    resolution: Optional[int] = None
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a cat"])


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["max_steps=5", "learning_rate=0.5", "use_ema=false", "resolution=null", "x="]) == {
        "max_steps": 5, "learning_rate": 0.5, "use_ema": False, "resolution": None, "x": ""}


def test_exponent_without_dot_is_a_float():
    assert load_config(Example, None, ["learning_rate=3e-4"]).learning_rate == 3e-4
    with pytest.raises(UserError, match="learning_rate.*must be float"):
        load_config(Example, None, ["learning_rate=fast"])


def test_yaml_then_overrides_then_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 3\nlearning_rate: 1\nprompts: [a, b]\n")
    config = load_config(Example, path, ["output_dir=runs/x", "max_steps=7"])
    assert config == Example(output_dir="runs/x", max_steps=7, learning_rate=1.0, prompts=["a", "b"])
    assert isinstance(config.learning_rate, float)


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'max_step'.*did you mean 'max_steps'"):
        load_config(Example, None, ["max_step=3"])


@pytest.mark.parametrize("override, message", [
    ("max_steps=abc", "max_steps.*must be int"),
    ("use_ema=3", "use_ema.*must be bool"),
    ("prompts=cat", "prompts.*must be a list"),
    ("nonsense", "key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(Example, None, [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(Example, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="flat mapping"):
        load_config(Example, bad)


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(Example, None, ["max_steps=9", "resolution=32"])
    save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["max_steps"] == 9
    assert load_config(Example, tmp_path / "config.yaml") == config



@dataclasses.dataclass
class Renamed:
    renamed: ClassVar[dict[str, str]] = {"steps": "num_inference_steps"}
    num_inference_steps: int = 1


def test_renamed_keys_are_read_under_their_new_name(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("steps: 7\n")
    assert load_config(Renamed, old).num_inference_steps == 7
    assert load_config(Renamed, None, ["steps=3"]).num_inference_steps == 3
    with pytest.raises(UserError, match="'steps' \\(the old name\\) and 'num_inference_steps' are both set"):
        load_config(Renamed, old, ["num_inference_steps=2"])


def test_a_bad_value_names_where_it_came_from(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("num_inference_steps: 5\n")
    with pytest.raises(UserError, match="from the command line"):
        load_config(Renamed, config, ["num_inference_steps=five"])
    config.write_text("num_inference_steps: five\n")
    with pytest.raises(UserError, match=rf"from {config}\) must be int"):
        load_config(Renamed, config)
