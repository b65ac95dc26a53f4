"""The web page (`ldm serve`): request checks without a browser, then the real page in headless Chromium.

The browser tests start `ldm serve` on a free loopback port with the embedded default models and drive the page with
Playwright and the system's Chromium (`apt-get install chromium`; nothing is downloaded). They skip when either is
missing; `.ci/run` installs both.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from tools.browser import chromium_path, launch_chromium, running_server
from web.requests import MAX_SIDE, MAX_STEPS, check_settings, editor_image_and_mask, read_settings, with_settings


def _settings(**overrides):
    args = dict(prompt="a cat", negative_prompt="", sampler="dpm++", steps=20, guidance_scale=4.0, seed=3,
                random_seed=False, num_images=2, size=64, factor=4, model="m")
    args.update(overrides)
    return check_settings(**args)


def test_settings_refuse_huge_requests_naming_the_limit():
    with pytest.raises(UserError, match=f"from 4 to {MAX_SIDE}"):
        _settings(size=100_000)
    with pytest.raises(UserError, match=f"from 1 to {MAX_STEPS}"):
        _settings(steps=10**6)
    with pytest.raises(UserError, match="multiple of 4"):
        _settings(size=66)
    with pytest.raises(UserError, match="whole number"):
        _settings(steps=float("nan"))
    with pytest.raises(UserError, match="guidance"):
        _settings(guidance_scale=-1.0)
    empty = _settings(prompt=None)  # an empty prompt is allowed (unconditional)
    assert empty.prompt == "" and empty.pipeline_kwargs()["seed"] == 3


def test_random_seed_is_drawn_and_recorded_in_the_png(tmp_path):
    settings = _settings(random_seed=True, seed=None)
    assert 0 <= settings.seed < 2**32
    drawn = {_settings(random_seed=True, seed=None).seed for _ in range(20)}
    assert len(drawn) == 20  # drawn afresh per request, not a fixed default
    assert _settings(random_seed=False, seed=7).seed == 7  # and only when asked
    image = with_settings(Image.new("RGB", (8, 8)), settings, index=1)
    image.save(tmp_path / "a.png", pnginfo=_png_text(image))
    saved = read_settings(tmp_path / "a.png")
    assert saved["seed"] == settings.seed and saved["prompt"] == "a cat" and saved["index"] == 1


def _png_text(image):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", image.info["parameters"])
    return info


def test_editor_mask_from_drawn_layer_or_upload_resized(tmp_path):
    Image.new("RGB", (16, 16), "yellow").save(tmp_path / "bg.png")
    layer = np.zeros((16, 16, 4), np.uint8)
    layer[4:8, 2:10] = (255, 51, 153, 255)
    Image.fromarray(layer).save(tmp_path / "layer.png")
    editor = {"background": str(tmp_path / "bg.png"), "layers": [str(tmp_path / "layer.png")], "composite": None}
    image, mask = editor_image_and_mask(editor, None)
    assert image.size == (16, 16) and np.array_equal(np.asarray(mask) > 0, layer[..., 3] > 0)

    upload = np.zeros((32, 32), np.uint8)
    upload[:, :16] = 255  # a mask of another size is resized to the image (nearest): the left half
    Image.fromarray(upload).save(tmp_path / "mask.png")
    _, mask = editor_image_and_mask(editor, str(tmp_path / "mask.png"))
    assert mask.size == (16, 16) and (np.asarray(mask)[:, :8] == 255).all() and (np.asarray(mask)[:, 8:] == 0).all()


def test_editor_refuses_missing_image_blank_mask_and_non_images(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "bg.png")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "blank.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match="upload an image"):
        editor_image_and_mask(None, None)
    with pytest.raises(UserError, match="draw the mask"):
        editor_image_and_mask({"background": str(tmp_path / "bg.png"), "layers": [str(tmp_path / "blank.png")]}, None)
    with pytest.raises(UserError, match="not an image"):
        editor_image_and_mask({"background": str(tmp_path / "notes.png"), "layers": []}, None)
    with pytest.raises(UserError, match="not an image"):
        editor_image_and_mask({"background": str(tmp_path / "bg.png")}, str(tmp_path / "notes.png"))


# ---- the real page in a real browser ----

def browser(test):
    """A test in the real browser: marked `browser` (deselect with -m "not browser"), skipped without one."""
    needs = pytest.mark.skipif(chromium_path() is None, reason="needs playwright and Chromium (apt-get install "
                                                                "chromium)")
    return pytest.mark.browser(needs(test))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`ldm serve` with the embedded defaults on a free loopback port."""
    with running_server(tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


def _open(chromium, url: str):
    page = chromium.new_page(viewport={"width": 1280, "height": 1150})
    page.goto(url, wait_until="load")
    page.locator("#prompt textarea").wait_for(timeout=60_000)
    return page


def _wait_for(page, selector: str, timeout_s: float = 120) -> None:
    """Wait for `selector`, failing at once with the page's message if the server answered with an error."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if page.locator(selector).count() and page.locator(selector).first.is_visible():
            return
        toast = page.locator('[data-testid="toast-body"]')
        if toast.count():
            pytest.fail(f"the page shows an error: {toast.first.inner_text()}")
        time.sleep(0.25)
    pytest.fail(f"{selector} did not appear in {timeout_s} s")


def _wait_until_shows(element, colour: tuple[int, int, int], what: str, timeout_s: float = 60,
                      fail: bool = True) -> bool:
    """Wait until `element` (the editor, or one of its canvases) draws `colour` somewhere (the editor is ready only
    once it shows the image)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if element.count():
            pixels = np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("RGB")).astype(int)
            if (np.abs(pixels - colour).sum(-1) < 30).sum() > 50:
                return True
        time.sleep(0.5)
    if fail:
        pytest.fail(f"the editor did not show {what} in {timeout_s} s")
    return False


def _fetch_png(page, selector: str) -> Image.Image:
    """The image an <img> shows, as the server sent it (a PNG with its settings)."""
    response = page.request.get(page.locator(selector).get_attribute("src"))
    assert response.ok
    image = Image.open(io.BytesIO(response.body()))
    image.load()
    return image


def _shot(page, name: str) -> None:
    """The docs' screenshots (docs/web.md): LDM_SCREENSHOTS=docs python -m pytest tests/test_web.py."""
    if os.environ.get("LDM_SCREENSHOTS"):
        page.screenshot(path=str(Path(os.environ["LDM_SCREENSHOTS"]) / name), full_page=True)


@browser
def test_generate_tab_in_a_browser(server, chromium):
    page = _open(chromium, server)
    page.locator("#prompt textarea").fill("cat face")
    page.locator("#gen-num input").fill("2")
    page.locator("#gen-seed input").fill("7")
    page.locator("#generate").click()
    _wait_for(page, "#gallery img >> nth=1")
    assert page.locator("#gallery img").count() == 2
    image = _fetch_png(page, "#gallery img >> nth=0")
    assert image.format == "PNG" and image.size == (64, 64)
    settings = json.loads(image.text["parameters"])
    assert settings["prompt"] == "cat face" and settings["seed"] == 7 and settings["num_images"] == 2
    assert np.asarray(image.convert("RGB")).std() > 5  # a picture, not a flat fill
    _shot(page, "web-generate.png")

    # a refused request shows its limit on the page, and the server keeps serving
    page.locator("#gen-steps input").fill("100000")
    page.locator("#generate").click()
    page.get_by_text(f"from 1 to {MAX_STEPS}").first.wait_for(timeout=60_000)
    page.locator("#gen-steps input").fill("10")
    page.locator("#gen-num input").fill("1")
    page.locator("#generate").click()
    page.locator('[data-testid="toast-close"]').first.click()
    page.locator('[data-testid="toast-body"]').first.wait_for(state="detached")
    _wait_for(page, "#gallery img >> nth=2")  # newest first, the two earlier kept
    assert page.locator("#gallery img").count() == 3



@browser
def test_two_pages_at_once_are_queued_and_both_answered(server, chromium):
    pages = [_open(chromium, server) for _ in range(2)]
    for page, prompt in zip(pages, ("rocket", "red apple")):
        page.locator("#prompt textarea").fill(prompt)
        page.locator("#gen-num input").fill("1")
    for page in pages:
        page.locator("#generate").click()
    for page, prompt in zip(pages, ("rocket", "red apple")):
        _wait_for(page, "#gallery img")
        assert json.loads(_fetch_png(page, "#gallery img >> nth=0").text["parameters"])["prompt"] == prompt
        page.close()


@browser
def test_inpaint_tab_changes_only_the_painted_region(server, chromium, tmp_path):
    source = np.full((64, 64, 3), 255, np.uint8)
    source[16:48, 16:48] = (250, 200, 40)  # a yellow square on white, like an emoji
    Image.fromarray(source).save(tmp_path / "in.png")
    page = _open(chromium, server)
    for attempt in range(3):  # a file set while the tab is still being drawn is sometimes dropped: a fresh page
        if attempt:
            page.reload()
        page.get_by_role("tab", name="Inpaint").click()
        page.locator("#editor").wait_for()
        page.locator("#editor input[type=file]").first.set_input_files(str(tmp_path / "in.png"))
        # the whole editor, whichever of its canvases draws the image; 40 s: on two busy cores the editor can take that
        # long to draw an upload (15 s failed beside a training run)
        if _wait_until_shows(page.locator("#editor"), (250, 200, 40), "the uploaded image", timeout_s=40,
                             fail=attempt == 2):
            break
    canvas = page.locator("#editor canvas").first
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 50, y - 10)
    page.mouse.down()
    for k in range(21):
        page.mouse.move(x - 50 + 5 * k, y - 10 + k, steps=2)
    page.mouse.up()
    _wait_until_shows(canvas, (255, 51, 153), "the brush stroke")  # the brush colour, #ff3399
    page.locator("#in-prompt textarea").fill("cat face")
    page.locator("#inpaint").click()
    _wait_for(page, "#result img")
    _wait_for(page, "#used-mask img")
    result = np.asarray(_fetch_png(page, "#result img").convert("RGB")).astype(int)
    mask = np.asarray(_fetch_png(page, "#used-mask img").convert("L")) >= 128
    assert result.shape == source.shape and 20 < mask.sum() < 64 * 64 // 2  # the stroke, not the whole image
    assert np.array_equal(result[~mask], source[~mask])  # paste-back: untouched outside the painted region
    assert np.abs(result[mask] - source[mask]).mean() > 1  # and filled inside it
    _shot(page, "web-inpaint.png")


@browser
def test_image_to_image_tab_redraws_the_upload_as_the_pipeline_does(server, chromium, tmp_path):
    from pipelines import Img2ImgPipeline

    source = np.full((64, 64, 3), 255, np.uint8)
    source[12:52, 12:52] = (250, 200, 40)  # a yellow square on white
    Image.fromarray(source).save(tmp_path / "in.png")
    page = _open(chromium, server)
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#i2i-image input[type=file]").first.set_input_files(str(tmp_path / "in.png"))
    _wait_for(page, "#i2i-image img")
    page.locator("#i2i-prompt textarea").fill("cat face")
    page.locator("#img2img").click()
    _wait_for(page, "#i2i-result img")
    png = _fetch_png(page, "#i2i-result img")
    settings = json.loads(png.text["parameters"])
    assert settings["strength"] == 0.8 and settings["prompt"] == "cat face" and settings["seed"] == 0
    expected = Img2ImgPipeline().generate("cat face", image=Image.open(tmp_path / "in.png"), strength=0.8,
                                          num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                                          seed=0, progress=False, output_type="numpy")[0]
    got = np.asarray(png.convert("RGB")).astype(int)
    assert np.abs(got - np.round(expected * 255)).max() <= 1
    assert np.abs(got - source).mean() > 5  # redrawn, not returned as it was
    _shot(page, "web-img2img.png")


def test_upload_pixels_prompt_length_and_paths_are_checked_before_any_work(tmp_path):
    from web.requests import MAX_PROMPT_CHARS, open_upload, public_message

    with pytest.raises(UserError, match=f"the prompt is {MAX_PROMPT_CHARS + 1} characters; the limit is"):
        _settings(prompt="a" * (MAX_PROMPT_CHARS + 1))
    huge = tmp_path / "huge.png"  # a small file that declares 16.4 megapixels
    Image.new("L", (4100, 4000)).save(huge)
    assert huge.stat().st_size < 200_000
    with pytest.raises(UserError, match="is 4100x4000 pixels; the limit is 16 megapixels"):
        open_upload(huge, "the uploaded image")
    assert public_message(f"the uploaded image {tmp_path}/cat.png is broken") == "the uploaded image cat.png is broken"


@pytest.mark.slow  # 34 s: the slow stage (default-suite budget)
def test_an_open_host_warns_and_a_burst_of_requests_is_answered_or_refused(tmp_path):
    """20 requests at once from 4 clients on loopback (the server listening on every interface, without a login):
    each is answered or refused with Gradio's queue message, and the server still serves afterwards."""
    import threading

    from gradio_client import Client

    log = tmp_path / "serve.log"
    with running_server(log, "--host", "0.0.0.0") as url:
        assert "serving on 0.0.0.0 without a login" in log.read_text()
        outcomes = []

        def client() -> None:
            session = Client(url, verbose=False)
            jobs = [session.submit("a cat", "", "model's own", 4, 5.0, seed, False, 2, 64, api_name="/generate")
                    for seed in range(5)]
            for seed, job in enumerate(jobs):
                try:
                    gallery, answered_seed = job.result(timeout=60)
                    outcomes.append("answered" if answered_seed == seed and gallery else "wrong answer")
                except Exception as err:  # noqa: BLE001 - what the client reports is what is checked
                    outcomes.append(str(err))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert len(outcomes) == 20
        assert all(o == "answered" or "Queue is full" in o for o in outcomes), outcomes
        assert Client(url, verbose=False).predict("a dog", "", "model's own", 2, 5.0, 1, False, 1, 64,
                                                  api_name="/generate")[1] == 1


def test_a_login_must_name_user_and_password(capsys):
    from cli.main import main as ldm_main

    with pytest.raises(SystemExit):
        ldm_main(["serve", "--auth", "alice"])
    assert "--auth takes USER:PASSWORD" in capsys.readouterr().err


def _adapter_for(folder: Path, fingerprint_from=None) -> Path:
    """A LoRA adapter for the embedded default with seeded random weights (a visible change), written as training
    writes one; `fingerprint_from`: record another base instead."""
    from helpers import write_random_adapter
    from pipelines import Pipeline

    return write_random_adapter(folder, Pipeline().unet, "default", seed=0, std=0.2, fingerprint_from=fingerprint_from)


@browser
def test_an_adapter_picked_on_the_page_changes_the_image_and_is_recorded(tmp_path, chromium):
    import torch

    from ldm.unet import build_unet

    adapters = tmp_path / "adapters"
    _adapter_for(adapters / "subject")
    torch.manual_seed(1)
    other = build_unet("emoji-s", latent_size=16, latent_channels=4, cross_attention_dim=384)
    _adapter_for(adapters / "for-another-base", fingerprint_from=other)
    with running_server(tmp_path / "serve.log", "--lora-dir", str(adapters)) as url:
        page = _open(chromium, url)
        page.locator("#gen-num input").fill("1")
        page.locator("#gen-seed input").fill("5")
        page.locator("#generate").click()
        _wait_for(page, "#gallery img >> nth=0")
        plain = _fetch_png(page, "#gallery img >> nth=0")
        page.locator("#adapter input").click()
        options = [t.split("\n")[-1] for t in page.get_by_role("option").all_inner_texts()]
        assert options == ["none", "subject"]  # the adapter for another base is left out
        page.get_by_role("option", name="subject").click()
        page.locator("#generate").click()
        _wait_for(page, "#gallery img >> nth=1")
        adapted = _fetch_png(page, "#gallery img >> nth=0")
    settings = json.loads(adapted.text["parameters"])
    assert (settings["lora"], settings["lora_scale"], settings["seed"]) == ("subject", 1.0, 5)
    assert json.loads(plain.text["parameters"])["lora"] == ""
    difference = np.abs(np.asarray(adapted.convert("RGB"), dtype=int) - np.asarray(plain.convert("RGB"), dtype=int))
    assert difference.mean() > 5
    assert "LoRA adapter" in (tmp_path / "serve.log").read_text() and "left out" in (tmp_path / "serve.log").read_text()


@pytest.mark.slow  # 22 s: the slow stage (default-suite budget)
@browser
def test_control_tab_draws_what_the_pipeline_draws_with_the_controlnet(tmp_path, chromium):
    from ldm.control import control_input
    from pipelines import Pipeline
    from test_controlnet import _controlnet

    _controlnet(Pipeline(), tmp_path / "cn", seed=3)  # a ControlNet of the embedded default, its joins random
    source = np.full((64, 64, 3), 255, np.uint8)
    source[12:52, 20:44] = (40, 120, 220)  # a blue bar on white: edges around it, uploaded at 256 px
    Image.fromarray(source).resize((256, 256), Image.Resampling.NEAREST).save(tmp_path / "in.png")
    with running_server(tmp_path / "serve.log", "--controlnet", str(tmp_path / "cn")) as url:
        page = _open(chromium, url)
        page.get_by_role("tab", name="Control").click()
        page.locator("#cn-image input[type=file]").first.set_input_files(str(tmp_path / "in.png"))
        _wait_for(page, "#cn-image img")
        page.locator("#cn-prompt textarea").fill("cat face")
        page.locator("#cn-num input").fill("1")
        page.locator("#control").click()
        _wait_for(page, "#cn-gallery img >> nth=0")
        png = _fetch_png(page, "#cn-gallery img >> nth=0")
        shown_map = _fetch_png(page, "#cn-map img")
        _shot(page, "web-control.png")
    settings = json.loads(png.text["parameters"])
    assert (settings["controlnet"], settings["controlnet_scale"], settings["control_type"]) == ("cn", 1.0, "canny")
    condition = control_input(Image.open(tmp_path / "in.png"), "canny", 64, 64)  # resized, then Canny
    assert np.array_equal(np.asarray(shown_map.convert("RGB")), np.asarray(condition))
    assert set(np.unique(np.asarray(condition))) == {0, 255}
    expected = Pipeline(controlnet=tmp_path / "cn").generate(
        "cat face", control_image=condition, num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance_scale"], seed=settings["seed"], progress=False, output_type="numpy")[0]
    assert np.abs(np.asarray(png.convert("RGB")).astype(int) - np.round(expected * 255)).max() <= 1
    plain = Pipeline().generate("cat face", num_inference_steps=settings["steps"], progress=False,
                                guidance_scale=settings["guidance_scale"], seed=settings["seed"], output_type="numpy")[0]
    assert np.abs(expected - plain).mean() > 2 / 255  # the ControlNet changed the picture
