"""`ldm serve`: a Gradio page with Generate, Image to image and Inpaint tabs over the project's pipelines.

Gradio because it is what these users know (diffusers' and Stability's demos use it). Each model runs one request
at a time (a Gradio concurrency group per model); others wait in a bounded queue. A bad setting shows its message on
the page (gr.Error) and the server keeps serving.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from core.errors import UserError
from ldm.control import CONTROL_TYPES, control_input
from pipelines.defaults import FAST_NUM_INFERENCE_STEPS, SCHEDULER_NAMES, STEP_SCHEDULES
from web.requests import (
    INPAINT_METHODS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SIDE,
    MAX_STEPS,
    MODEL_SCHEDULER,
    SAMPLER_SPACING,
    Settings,
    MAX_UPLOAD_MB,
    check_settings,
    editor_image_and_mask,
    open_upload,
    public_message,
    with_settings,
)

logger = logging.getLogger(__name__)
QUEUE_SIZE = 16  # waiting requests per server; the next one is refused with "queue full" instead of piling up
CACHE_SECONDS = 3600  # Gradio's cached uploads and results older than this are deleted, checked this often
LOOPBACK = ("127.0.0.1", "localhost", "::1")
GALLERY_SIZE = 32  # results kept per browser tab
MAX_LORA_SCALE = 2.0
MAX_CONTROL_SCALE = 2.0

# system fonts only: the default theme's web fonts would be fetched from the internet at every page load
FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# 64 px results drawn large and sharp
CSS = """#result img, #used-mask img, #i2i-result img, #cn-map img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}
#gallery img, #cn-gallery img {object-fit: contain !important; image-rendering: pixelated}"""


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    try:
        import gradio as gr
    except ImportError as err:
        raise UserError("`ldm serve` needs Gradio: pip install 'latent-diffusion-lab[serve]'") from err
    return gr


NO_ADAPTER = "none"


def load_adapters(pipe, lora_dir: str | None) -> list[str]:
    """Every LoRA adapter folder directly in `lora_dir` (or a run's final/) that fits the page's model, loaded once
    by folder name; one that does not fit (another base, a damaged file) is left out with a warning."""
    from ldm.lora import WEIGHTS_NAME

    if lora_dir is None:
        return []
    folder = Path(lora_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"--lora-dir {folder} is not a folder")
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not ((sub / WEIGHTS_NAME).is_file() or (sub / "final" / WEIGHTS_NAME).is_file()):
            continue
        try:
            pipe.load_lora(sub, name=sub.name)
        except UserError as err:
            logger.warning("LoRA adapter %s left out: %s", sub, err)
    pipe.activate_lora({})
    if not pipe.adapters:
        logger.warning("no usable LoRA adapter folder in %s", folder)
    return list(pipe.adapters)


def build_app(model: str | None = None, inpaint_model: str | None = None, lora_dir: str | None = None,
              fast_model: str | None = None, controlnet: str | None = None):
    """The page as a `gr.Blocks` (launch it, or mount it in a FastAPI app). Models (and the adapters in `lora_dir`,
    for the Generate tab) load once, here. The Generate tab's "Fast" box samples a consistency student instead:
    `fast_model`, or the embedded one when the main model is the embedded default. `controlnet` (a ControlNet
    trained on `model`) adds the Control tab."""
    gr = _gradio()
    from pipelines import Img2ImgPipeline, InpaintPipeline, Pipeline

    pipe = Pipeline(model=model)
    adapters = load_adapters(pipe, lora_dir)
    # image to image on the Generate tab's model (its networks shared, so one request at a time across both tabs)
    img2img_pipe = None  # a flow-matching model (a research arm) has no image-to-image here
    if not pipe.is_flow:
        img2img_pipe = Img2ImgPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, unet=pipe.unet,
                                       scheduler=pipe.model_scheduler)
        img2img_pipe.sampling_defaults = pipe.sampling_defaults
    inpaint_pipe = InpaintPipeline(model=inpaint_model)
    control_pipe, own_control_type, recorded = None, "canny", None
    if controlnet is not None:  # the Generate tab's networks again, with the ControlNet checked against them
        from pipelines.controlnet import recorded_control_type

        control_pipe = Pipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, unet=pipe.unet,
                                scheduler=pipe.model_scheduler)
        control_pipe.sampling_defaults, control_pipe.model_name = pipe.sampling_defaults, pipe.model_name
        control_pipe.load_controlnet(controlnet)
        recorded = recorded_control_type(controlnet)
        # a kind the page has no detector for (another project's depth ControlNet): ready maps only
        own_control_type = "canny" if recorded is None else recorded if recorded in CONTROL_TYPES else "none"
    from pipelines.loading import DEFAULT_FAST_MODEL_DIR

    offer_fast = fast_model or (model is None and (DEFAULT_FAST_MODEL_DIR / "model_index.json").is_file())
    fast_pipe = Pipeline(model=fast_model, fast=fast_model is None) if offer_fast else None
    if fast_pipe is not None and not fast_pipe.is_consistency_student:
        raise UserError(f"--fast-model {fast_model} is not a consistency-distilled student (train one with "
                        "configs/ldm/emoji-64-lcm.yaml)")
    names = {"generate": model or "embedded default", "inpaint": inpaint_model or "embedded inpainting default",
             "fast": fast_model or "embedded fast default", "controlnet": Path(controlnet or "").name}
    factor, default_size = pipe.vae_scale_factor, pipe.default_size()

    def page_errors(fn):
        """Our clear errors as messages on the page (server paths shortened to file names); anything else is logged
        in full on the server and shown to the visitor without details."""
        @functools.wraps(fn)  # keeps the signature: Gradio finds the gr.Progress argument through it
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                logger.info("request refused: %s", err)
                raise gr.Error(public_message(str(err))) from err
            except Exception as err:
                logger.exception("request failed")
                raise gr.Error("internal error: the request failed on the server (details are in its log)") from err
        return wrapped

    @page_errors
    def generate(prompt, negative_prompt, sampler, steps, guidance, seed, random_seed, num_images, size, history,
                 adapter=NO_ADAPTER, adapter_scale=1.0, fast=False, interval="", step_schedule=SAMPLER_SPACING,
                 progress=gr.Progress(track_tqdm=True)):
        if fast and fast_pipe is None:
            raise UserError("no fast (distilled) model on this server: start it with --fast-model DIR")
        if fast and adapter != NO_ADAPTER:
            raise UserError("LoRA adapters apply to the main model: untick Fast, or pick adapter 'none'")
        if adapter not in (NO_ADAPTER, *adapters):
            raise UserError(f"no adapter named '{adapter}' on this server")
        if adapter_scale is None or not -MAX_LORA_SCALE <= adapter_scale <= MAX_LORA_SCALE:
            raise UserError(f"the adapter scale must be from {-MAX_LORA_SCALE} to {MAX_LORA_SCALE}, got "
                            f"{adapter_scale}")
        settings = check_settings(prompt, negative_prompt, sampler, steps, guidance, seed, random_seed, num_images,
                                  size, factor, names["fast" if fast else "generate"], interval, step_schedule)
        if adapter != NO_ADAPTER:
            settings.lora, settings.lora_scale = adapter, float(adapter_scale)
        if adapters:  # one request at a time per model (the concurrency group), so this cannot race
            pipe.activate_lora({adapter: float(adapter_scale)} if adapter != NO_ADAPTER else {})
        images = (fast_pipe if fast else pipe).generate(settings.prompt, **settings.pipeline_kwargs())
        new = [(with_settings(image, settings, i), _caption(settings, i)) for i, image in enumerate(images)]
        history = (new + (history or []))[:GALLERY_SIZE]
        return history, history, settings.seed

    @page_errors
    def img2img(upload, prompt, negative_prompt, sampler, steps, guidance, seed, random_seed, size, strength,
                interval="", step_schedule=SAMPLER_SPACING, progress=gr.Progress(track_tqdm=True)):
        if img2img_pipe is None:
            raise UserError(f"{names['generate']} is a flow-matching model: image-to-image takes diffusion models")
        if not upload:
            raise UserError("upload an image to start from first")
        image = open_upload(upload, "the uploaded image")
        if strength is None or not 0 < strength <= 1:
            raise UserError(f"strength must be in (0, 1], got {strength}")
        settings = check_settings(prompt, negative_prompt, sampler, steps, guidance, seed, random_seed, 1, size,
                                  factor, names["generate"], interval, step_schedule, strength=float(strength))
        if adapters:  # the base model: adapters are the Generate tab's
            pipe.activate_lora({})
        result = img2img_pipe.generate(settings.prompt, image=image, strength=settings.strength,
                                       **settings.pipeline_kwargs())[0]
        return with_settings(result, settings, 0), settings.seed

    @page_errors
    def inpaint(editor, mask_upload, prompt, negative_prompt, sampler, steps, guidance, seed, random_seed, size,
                strength, method, paste_back, feather, interval="", step_schedule=SAMPLER_SPACING,
                progress=gr.Progress(track_tqdm=True)):
        image, mask = editor_image_and_mask(editor, mask_upload)
        if not 0 < (strength or 0) <= 1:
            raise UserError(f"strength must be in (0, 1], got {strength}")
        settings = check_settings(prompt, negative_prompt, sampler, steps, guidance, seed, random_seed, 1, size,
                                  factor, names["inpaint"], interval, step_schedule, strength=float(strength),
                                  method=method,
                                  paste_back=bool(paste_back), feather=float(feather or 0))
        if method == "repaint":  # RePaint samples with its own scheduler; the PNG records that
            settings.sampler = MODEL_SCHEDULER
        result = inpaint_pipe.generate(settings.prompt, image=image, mask_image=mask, strength=settings.strength,
                                       method=None if method == "auto" else method, paste_back=settings.paste_back,
                                       feather=settings.feather, **settings.pipeline_kwargs())[0]
        # the mask as the pipeline used it: resized to the output and binarised at 0.5
        used = inpaint_pipe.mask_processor.preprocess(mask, height=settings.size, width=settings.size)
        used_mask = Image.fromarray((used[0, 0].numpy() * 255).astype(np.uint8))
        return with_settings(result, settings, 0), used_mask, settings.seed

    @page_errors
    def control(upload, detector, scale, prompt, negative_prompt, sampler, steps, guidance, seed, random_seed,
                num_images, size, interval="", step_schedule=SAMPLER_SPACING, progress=gr.Progress(track_tqdm=True)):
        if control_pipe is None:
            raise UserError("no ControlNet on this server: start it with --controlnet DIR")
        if not upload:
            raise UserError("upload a control image (a photo for the detector, or a ready map) first")
        if detector not in (*CONTROL_TYPES, "none"):
            raise UserError(f"unknown detector '{detector}'; valid: {', '.join(CONTROL_TYPES)}, none")
        if detector != "none" and recorded is not None and detector != recorded:
            raise UserError(f"this ControlNet was trained on {recorded} maps, not {detector}: pick {recorded}, or none "
                            "for a ready map")
        if scale is None or not 0 <= scale <= MAX_CONTROL_SCALE:
            raise UserError(f"the ControlNet scale must be from 0 to {MAX_CONTROL_SCALE}, got {scale}")
        settings = check_settings(prompt, negative_prompt, sampler, steps, guidance, seed, random_seed, num_images,
                                  size, factor, names["generate"], interval, step_schedule)
        # the detector at the sample size, as training made its maps
        condition = control_input(open_upload(upload, "the control image"), detector, settings.size, settings.size)
        settings.controlnet, settings.controlnet_scale, settings.control_type = names["controlnet"], float(scale), \
            detector
        if adapters:  # the base model: adapters are the Generate tab's
            pipe.activate_lora({})
        images = control_pipe.generate(settings.prompt, control_image=condition,
                                       controlnet_conditioning_scale=float(scale), **settings.pipeline_kwargs())
        return [(with_settings(im, settings, i), _caption(settings, i)) for i, im in enumerate(images)], condition, \
            settings.seed

    # uploads and results Gradio caches on disk: files older than an hour removed every hour, and all at exit
    with gr.Blocks(title="latent-diffusion-lab", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as app:
        gr.Markdown(f"## latent-diffusion-lab\nGenerate: **{names['generate']}** · Inpaint: **{names['inpaint']}** "
                    f"(limits: size ≤ {MAX_SIDE}, steps ≤ {MAX_STEPS}, images ≤ {MAX_IMAGES})")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value="a cat", elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                    sampling = _sampling_controls(gr, default_size, "gen", pipe)
                    num_images = gr.Number(label="Number of images", value=4, precision=0, elem_id="gen-num")
                    fast = gr.Checkbox(False, label=f"Fast: the distilled student ({names['fast']}), lcm sampler, "
                                                    f"{FAST_NUM_INFERENCE_STEPS} steps", visible=fast_pipe is not None,
                                       elem_id="fast")
                    with gr.Row(visible=bool(adapters)):
                        adapter = gr.Dropdown([NO_ADAPTER, *adapters], value=NO_ADAPTER, label="LoRA adapter",
                                              elem_id="adapter")
                        adapter_scale = gr.Slider(-MAX_LORA_SCALE, MAX_LORA_SCALE, value=1.0, step=0.05,
                                                  label="Adapter scale", elem_id="adapter-scale")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    gallery = gr.Gallery(label="Results (newest first; PNGs carry their settings)", format="png",
                                         columns=4, object_fit="contain", height=480, elem_id="gallery")
            history = gr.State([])
            button.click(generate, [prompt, negative, sampling.sampler, sampling.steps, sampling.guidance,
                                    sampling.seed, sampling.random_seed, num_images, sampling.size, history,
                                    adapter, adapter_scale, fast, sampling.interval, sampling.step_schedule],
                         [gallery, history, sampling.seed], concurrency_limit=1, concurrency_id="generate")
            # the student's own steps and its own timestep grid when Fast is ticked, the model's own ones when not
            own_schedule = pipe.sampling_defaults.get("step_schedule") or SAMPLER_SPACING
            fast.change(lambda on: (FAST_NUM_INFERENCE_STEPS, SAMPLER_SPACING) if on
                        else (pipe.own_defaults()[0], own_schedule), fast, [sampling.steps, sampling.step_schedule])
            # an LCM-LoRA's own steps and guidance (1: it learnt the guided teacher) while it is picked; leaving it
            # gives the usual ones back, and a switch between other adapters keeps what the visitor set
            adapter.change(lambda name, steps, guidance: adapter_defaults(name, steps, guidance, pipe, gr), [
                adapter, sampling.steps, sampling.guidance], [sampling.steps, sampling.guidance,
                                                              sampling.step_schedule])
        with gr.Tab("Image to image", visible=img2img_pipe is not None, elem_id="i2i-tab"):  # none for flow
            with gr.Row():
                with gr.Column():
                    source = gr.Image(label="Image to start from (resized to Size)", type="filepath",
                                      sources=["upload", "clipboard"], elem_id="i2i-image")
                    i2i_prompt = gr.Textbox(label="Prompt", value="a cat", elem_id="i2i-prompt")
                    i2i_negative = gr.Textbox(label="Negative prompt", elem_id="i2i-negative")
                    i2i_sampling = _sampling_controls(gr, default_size, "i2i", pipe)
                    i2i_strength = gr.Slider(0.05, 1.0, value=0.8, step=0.05, elem_id="i2i-strength",
                                             label="Strength (how far the image is noised: low keeps it)")
                    i2i_button = gr.Button("Redraw", variant="primary", elem_id="img2img")
                with gr.Column():
                    i2i_result = gr.Image(label="Result (PNG carries its settings)", format="png", type="pil",
                                          height=360, elem_id="i2i-result")
            i2i_button.click(img2img, [source, i2i_prompt, i2i_negative, i2i_sampling.sampler, i2i_sampling.steps,
                                       i2i_sampling.guidance, i2i_sampling.seed, i2i_sampling.random_seed,
                                       i2i_sampling.size, i2i_strength, i2i_sampling.interval,
                                       i2i_sampling.step_schedule],
                             [i2i_result, i2i_sampling.seed], concurrency_limit=1, concurrency_id="generate")
        with gr.Tab("Control", visible=control_pipe is not None, elem_id="cn-tab"):
            with gr.Row():
                with gr.Column():
                    control_upload = gr.Image(label="Control image (a photo for the detector, or a ready map)",
                                              type="filepath", sources=["upload", "clipboard"], elem_id="cn-image")
                    detector = gr.Dropdown(["canny", "colour", "none"], elem_id="cn-detector",
                                           value=own_control_type,
                                           label="Detector (none: the upload is the map)")
                    control_scale = gr.Slider(0, MAX_CONTROL_SCALE, value=1.0, step=0.05, elem_id="cn-scale",
                                              label=f"ControlNet scale ({names['controlnet']})")
                    cn_prompt = gr.Textbox(label="Prompt", value="a cat", elem_id="cn-prompt")
                    cn_negative = gr.Textbox(label="Negative prompt", elem_id="cn-negative")
                    cn_sampling = _sampling_controls(gr, default_size, "cn", pipe)
                    cn_num = gr.Number(label="Number of images", value=2, precision=0, elem_id="cn-num")
                    cn_button = gr.Button("Generate with control", variant="primary", elem_id="control")
                with gr.Column():
                    cn_gallery = gr.Gallery(label="Results (PNGs carry their settings)", format="png", columns=2,
                                            object_fit="contain", height=360, elem_id="cn-gallery")
                    cn_map = gr.Image(label="Control map used", format="png", type="pil", height=180,
                                      elem_id="cn-map")
            cn_button.click(control, [control_upload, detector, control_scale, cn_prompt, cn_negative,
                                      cn_sampling.sampler, cn_sampling.steps, cn_sampling.guidance, cn_sampling.seed,
                                      cn_sampling.random_seed, cn_num, cn_sampling.size, cn_sampling.interval,
                                      cn_sampling.step_schedule],
                            [cn_gallery, cn_map, cn_sampling.seed], concurrency_limit=1, concurrency_id="generate")
        with gr.Tab("Inpaint"):
            with gr.Row():
                with gr.Column():
                    editor = gr.ImageEditor(label="Image: paint the region to fill with the brush",
                                            type="filepath", sources=["upload", "clipboard"], layers=False,
                                            brush=gr.Brush(default_size=6, colors=["#ff3399"], color_mode="fixed"),
                                            elem_id="editor")
                    with gr.Accordion("…or upload a mask instead", open=False):
                        mask_upload = gr.Image(label="Mask (white = repaint; resized to the image's size)",
                                               type="filepath", sources=["upload"], elem_id="mask-upload")
                    in_prompt = gr.Textbox(label="Prompt", value="a cat", elem_id="in-prompt")
                    in_negative = gr.Textbox(label="Negative prompt", elem_id="in-negative")
                    in_sampling = _sampling_controls(gr, default_size, "in", inpaint_pipe)
                    strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Strength (1 = from noise)")
                    method = gr.Dropdown(list(INPAINT_METHODS), value="auto", label="Method (auto: the U-Net of an "
                                         "inpainting model, latent blending otherwise)")
                    paste_back = gr.Checkbox(True, label="Paste the original pixels back outside the mask")
                    feather = gr.Slider(0, 8, value=0, step=0.5, label="Paste-back feather (px)")
                    in_button = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
                with gr.Column():
                    result = gr.Image(label="Result (PNG carries its settings)", format="png", type="pil", height=360,
                                      elem_id="result")
                    used_mask = gr.Image(label="Mask used", format="png", type="pil", height=180, elem_id="used-mask")
            in_button.click(inpaint, [editor, mask_upload, in_prompt, in_negative, in_sampling.sampler,
                                      in_sampling.steps, in_sampling.guidance, in_sampling.seed,
                                      in_sampling.random_seed, in_sampling.size, strength, method, paste_back,
                                      feather, in_sampling.interval, in_sampling.step_schedule],
                            [result, used_mask, in_sampling.seed],
                            concurrency_limit=1, concurrency_id="inpaint")
    return app.queue(max_size=QUEUE_SIZE)


def adapter_defaults(name: str, steps, guidance, pipe, gr) -> tuple:
    """The steps, guidance and step-schedule boxes after picking adapter `name`: an LCM-LoRA's own (its sampler's
    own grid), the model's own when leaving an LCM-LoRA's, else unchanged."""
    lcm = (FAST_NUM_INFERENCE_STEPS, 1.0)
    if name in pipe.consistency_adapters:
        return (*lcm, SAMPLER_SPACING)
    if (steps, guidance) == lcm:
        return (*pipe.own_defaults(), pipe.sampling_defaults.get("step_schedule") or SAMPLER_SPACING)
    return gr.update(), gr.update(), gr.update()


class SamplingControls(NamedTuple):
    """The settings both tabs share, wired to the handlers by name."""

    sampler: object
    steps: object
    guidance: object
    seed: object
    random_seed: object
    size: object
    interval: object
    step_schedule: object


def sampler_choices(pipe) -> tuple[list[str], list[str]]:
    """The samplers and step schedules the page offers for `pipe`'s model: a flow-matching model samples with
    flow-euler and a consistency student with lcm, each on its own grid only; a diffusion model every other sampler
    (lcm once an LCM-LoRA is picked on the page; the pipeline refuses a mismatch in one line)."""
    if pipe.is_flow:
        return [MODEL_SCHEDULER, "flow-euler"], [SAMPLER_SPACING]
    if pipe.is_consistency_student:
        return [MODEL_SCHEDULER, "lcm"], [SAMPLER_SPACING]
    return [MODEL_SCHEDULER, *(n for n in SCHEDULER_NAMES if n != "flow-euler")], [SAMPLER_SPACING, *STEP_SCHEDULES]


def _sampling_controls(gr, default_size: int, prefix: str, pipe) -> SamplingControls:
    """The shared settings' components, laid out in rows, starting from `pipe`'s model's own steps, guidance and
    guidance interval (its sampling.json)."""
    defaults = pipe.own_defaults()
    own_interval = pipe.sampling_defaults.get("guidance_interval")
    own_schedule = pipe.sampling_defaults.get("step_schedule") or SAMPLER_SPACING
    samplers, schedules = sampler_choices(pipe)
    with gr.Row():
        sampler = gr.Dropdown(samplers, value=MODEL_SCHEDULER, label="Sampler", elem_id=f"{prefix}-sampler")
        steps = gr.Number(label=f"Steps (≤ {MAX_STEPS})", value=defaults[0], precision=0,
                          elem_id=f"{prefix}-steps")
        guidance = gr.Slider(0, MAX_GUIDANCE, value=defaults[1], step=0.5, label="Guidance")
    with gr.Row():
        seed = gr.Number(label="Seed", value=0, precision=0, elem_id=f"{prefix}-seed")
        random_seed = gr.Checkbox(False, label="Random seed")
        size = gr.Number(label=f"Size (px, ≤ {MAX_SIDE})", value=default_size, precision=0, elem_id=f"{prefix}-size")
    with gr.Row():
        interval = gr.Textbox("" if own_interval is None else "-".join(f"{v:g}" for v in own_interval),
                              label="Guidance interval (noise levels LO-HI, e.g. 0.28-5.42; blank = every step)",
                              elem_id=f"{prefix}-interval", interactive=not pipe.is_flow)  # flow: every step
        step_schedule = gr.Dropdown(schedules, value=own_schedule, label="Step schedule",
                                    elem_id=f"{prefix}-step-schedule")
    return SamplingControls(sampler, steps, guidance, seed, random_seed, size, interval, step_schedule)


def _caption(settings: Settings, index: int) -> str:
    return f"seed {settings.seed} #{index} · {settings.sampler} {settings.steps} steps · guidance " \
           f"{settings.guidance_scale:g}"


def serve(model: str | None = None, inpaint_model: str | None = None, host: str = "127.0.0.1",
          port: int = 7860, auth: str | None = None, lora_dir: str | None = None,
          fast_model: str | None = None, controlnet: str | None = None) -> None:
    """Build the page and serve it until interrupted (loopback only unless `host` says otherwise). `auth`
    ("USER:PASSWORD") asks every visitor for that login (Gradio's basic login page)."""
    gr = _gradio()
    credentials = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth takes USER:PASSWORD (or set LDM_SERVE_AUTH), e.g. --auth alice:long-secret")
        credentials = (user, password)
    if host not in LOOPBACK and credentials is None:
        logger.warning("serving on %s without a login: anyone who can reach port %d can use this machine's models; "
                       "pass --auth USER:PASSWORD (or set LDM_SERVE_AUTH), or keep the default loopback host", host,
                       port)
    app = build_app(model, inpaint_model, lora_dir, fast_model, controlnet)
    try:
        app.launch(server_name=host, server_port=port, theme=gr.themes.Default(**FONTS), css=CSS, show_error=True,
                   share=False, inbrowser=False, auth=credentials, max_file_size=f"{MAX_UPLOAD_MB}mb")
    except OSError as err:  # Gradio's "Cannot find empty port"
        raise UserError(f"cannot listen on {host}:{port} ({err}); is another server using it? pass --port") from err
