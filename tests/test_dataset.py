import json

import pytest
from PIL import Image

from core.data.dataset import (ImageCaptionDataset, SkippingCollate, check_caption_templates, format_captions,
                              load_image_caption_dataset, to_rgb)
from core.errors import UserError


def _folder(tmp_path, rows, broken=()):
    split = tmp_path / "train"
    split.mkdir(parents=True)
    for i, caption in enumerate(rows):
        name = f"{i:03d}.png"
        if i in broken:
            (split / name).write_bytes(b"not a png at all")
        else:
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(split / name)
    with open(split / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps({"file_name": f"{i:03d}.png", "text": c}) + "\n" for i, c in enumerate(rows))
    return tmp_path


def test_custom_caption_column_and_center_crop(tmp_path):
    folder = _folder(tmp_path, ["one", "two"])
    ds = load_image_caption_dataset(str(folder), "train", caption_column="text")
    item = ImageCaptionDataset(ds, 16, caption_column="text")[1]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["captions"] == ["two"]
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    folder = _folder(tmp_path, ["a", "b", "c", "d"], broken={1, 2})
    ds = ImageCaptionDataset(load_image_caption_dataset(str(folder), caption_column="text"), 8, caption_column="text")
    collate = SkippingCollate()
    batch = collate([ds[i] for i in range(4)])
    assert batch["captions"] == [["a"], ["d"]] and batch["pixel_values"].shape == (2, 3, 8, 8)
    assert collate.skipped == 2
    assert collate([ds[1]]) is None and collate.skipped == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"data": "/nonexistent/folder"}, "does not exist"),
    ({"data": ""}, "no dataset given"),
    ({"data": "some-hub-dataset-name"}, "cannot load dataset"),
])
def test_bad_dataset_paths(kwargs, message):
    with pytest.raises(UserError, match=message):
        load_image_caption_dataset(**kwargs)


def test_missing_and_empty_caption_columns(tmp_path):
    folder = _folder(tmp_path, ["", " "])
    with pytest.raises(UserError, match="no column 'caption'.*caption_column"):
        load_image_caption_dataset(str(folder))
    with pytest.raises(UserError, match="caption column 'text'.*is empty"):
        load_image_caption_dataset(str(folder), caption_column="text")
    with pytest.raises(UserError, match="no split 'validation'"):
        load_image_caption_dataset(str(folder), "validation", caption_column="text")


def test_transparency_becomes_white():
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 10)).getpixel((0, 0)) == (10, 10, 10)


def test_caption_templates_fill_columns_and_articles():
    row = {"caption": "apple", "style": "noto", "image": None}
    templates = ("{caption}", "{article} {caption}", "{caption}, {style} style")
    assert format_captions(row, "caption", templates) == ["apple", "an apple", "apple, noto style"]
    assert format_captions({"caption": "cat face"}, "caption", ("{article} {caption}",)) == ["a cat face"]


def test_caption_template_with_an_unknown_field_fails_early(tmp_path):
    ds = load_image_caption_dataset(str(_folder(tmp_path, ["a", "b"])), caption_column="text")
    check_caption_templates(ds, "text", ("{caption} emoji", "{text}"))
    with pytest.raises(UserError, match="'style' is not a text column.*valid fields: caption, article, text"):
        check_caption_templates(ds, "text", ("{caption}, {style} style",))
    with pytest.raises(UserError, match="caption_templates is empty"):
        check_caption_templates(ds, "text", ())
