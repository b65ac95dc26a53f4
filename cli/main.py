"""The `ldm` command:

  ldm generate PROMPT [--lora DIR] text-to-image with a trained model (default: the embedded one), LoRA adapters
  ldm img2img PROMPT --image [--strength]  redraw an image under a prompt (SDEdit; default: the embedded model)
  ldm inpaint PROMPT --image --mask  fill the white part of a mask (default: the embedded inpainting model)
  ldm serve                        the web page (Gradio) over both
  ldm export --model --out         a slim model folder (fp16, the embedded default's layout)
  ldm ema RUN --sigma-rel ... --out  a post-hoc EMA length of a run (EDM2), the lowest validation loss of several
  ldm data emoji | shards | show-masks
                                   build the offline emoji dataset; write WebDataset shards; draw inpainting masks
  ldm cache --config FILE [k=v]    build a training config's latent/text cache ahead of training (per rank)
  ldm eval autoencoder | generate | inpaint | control | classifier-guidance | vlb
                                   measure a trained stage (evaluation/)

Training runs through Accelerate instead: `accelerate launch train_autoencoder.py|train_ldm.py|train_classifier.py
--config FILE [key=value ...]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cli import commands
from core.errors import exit_on_user_error
from pipelines import defaults as D


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="command", required=True)

    data = subcommands.add_parser("data", help="build datasets").add_subparsers(dest="dataset", required=True)
    emoji = data.add_parser("emoji", help="captioned emoji imagefolder from registry packages (offline)")
    emoji.add_argument("--out", required=True, help="output folder (must be new or empty)")
    emoji.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    emoji.add_argument("--val-fraction", type=float, default=0.05,
                       help="fraction of names held out for validation, all their styles (default 0.05)")
    emoji.add_argument("--npm", choices=("auto", "yes", "no"), default="auto",
                       help="add styles from npm packages when npm is present (default auto)")
    emoji.add_argument("--limit", type=int, default=None, help="only the first N names (quick builds, tests)")
    emoji.set_defaults(func=commands.cmd_data_emoji)
    shards = data.add_parser("shards", help="write an imagefolder or datasets dataset as WebDataset tar shards")
    shards.add_argument("--data", required=True, help="imagefolder (with metadata.jsonl) or saved dataset")
    shards.add_argument("--out", required=True, help="output folder (must be new or empty)")
    shards.add_argument("--split", default="train")
    shards.add_argument("--image-column", default="image")
    shards.add_argument("--caption-column", default="caption")
    shards.add_argument("--rows-per-shard", type=int, default=1000,
                        help="images per tar (default 1000: the cut the cache makes of a folder)")
    shards.set_defaults(func=commands.cmd_data_shards)
    show = data.add_parser("show-masks", help="PNG grid of inpainting training masks over real images")
    show.add_argument("--data", required=True, help="imagefolder (e.g. data/emoji)")
    show.add_argument("--out", required=True, help="PNG to write")
    show.add_argument("--config", default=None, help="inpainting config whose mask_* keys to use (default: defaults)")
    show.add_argument("--split", default="train")
    show.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    show.add_argument("--num-images", "-n", type=int, default=32)
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(func=commands.cmd_show_masks)

    cache = subcommands.add_parser(
        "cache", help="build a training config's latent/text cache (under `accelerate launch`, every rank its part)")
    cache.add_argument("--config", required=True, help="the train_ldm.py config to cache for")
    cache.add_argument("overrides", nargs="*", metavar="key=value", help="the same overrides training will get")
    cache.set_defaults(func=commands.cmd_cache)

    evaluate = subcommands.add_parser("eval", help="evaluate a trained stage").add_subparsers(dest="stage",
                                                                                         required=True)
    autoencoder = evaluate.add_parser("autoencoder", help="PSNR, SSIM, rFID of reconstructions")
    autoencoder.add_argument("--model", required=True, help="autoencoder folder (or a train_autoencoder output_dir)")
    autoencoder.add_argument("--data", required=True, help="imagefolder or dataset")
    autoencoder.add_argument("--split", default="validation")
    autoencoder.add_argument("--num-images", type=int, default=1000, help="N, at most (default 1000)")
    autoencoder.add_argument("--batch-size", type=int, default=32)
    autoencoder.add_argument("--resolution", type=int, default=None, help="default: the model's sample_size")
    autoencoder.add_argument("--out", default=None, help="folder for metrics.json and the grid (default MODEL/eval)")
    autoencoder.add_argument("--no-fid", action="store_true", help="skip rFID (slow on CPU: about 5 img/s)")
    autoencoder.set_defaults(func=commands.cmd_eval_autoencoder)

    gen_eval = evaluate.add_parser("generate", help="FID, prompt alignment, sampler and guidance sweeps of samples")
    gen_eval.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    gen_eval.add_argument("--data", required=True, help="imagefolder with train and held-out splits")
    gen_eval.add_argument("--num-images", type=int, default=D.EVAL_NUM_IMAGES,
                          help="N for the main FIDs (default %(default)s)")
    gen_eval.add_argument("--sweep-images", type=int, default=D.EVAL_SWEEP_IMAGES,
                          help="N for each sweep setting, at most --num-images: the sweeps draw from its prompts "
                               "(default %(default)s)")
    gen_eval.add_argument("--heldout-split", default="validation", help="held-out split, or none (default validation)")
    gen_eval.add_argument("--fast", action="store_true",
                          help="evaluate the embedded distilled default (once one ships; none does in this release)")
    gen_eval.add_argument("--scheduler", default=None,
                          help=f"sampler of the main FIDs (default {D.EVAL_SCHEDULER}; lcm for a consistency student)")
    gen_eval.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=None,
                          help=f"its steps (default {D.EVAL_NUM_INFERENCE_STEPS}; {D.FAST_NUM_INFERENCE_STEPS} for a "
                               "consistency student; --steps: old name)")
    gen_eval.add_argument("--full-rows", default="none",
                          help="more NAME:STEPS,... measured like the main setting (N training and held-out prompts), "
                               "e.g. lcm:1,lcm:2,lcm:8 (default none)")
    gen_eval.add_argument("--compare", action="append", default=None, metavar="EVAL_DIR",
                          help="another model's results folder: quality-vs-time.png draws both models' rows")
    gen_eval.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float,
                          default=D.EVAL_GUIDANCE_SCALE,
                          help="classifier-free guidance scale (default %(default)s; --guidance: old name)")
    gen_eval.add_argument("--samplers", default=None,
                          help="sampler sweep as NAME:STEPS,... or none (default: "
                               f"{','.join(f'{n}:{s}' for n, s in D.SAMPLER_SWEEP)}; for a consistency student "
                               f"{','.join(f'lcm:{s}' for s in D.FAST_SAMPLER_SWEEP)})")
    gen_eval.add_argument("--guidance-scales", default=",".join(f"{g:g}" for g in D.GUIDANCE_SWEEP),
                          help="guidance sweep, or none (default: %(default)s)")
    gen_eval.add_argument("--settings", default="none",
                          help="a sweep of sampling settings at --sweep-images prompts, each "
                               "SAMPLER:STEPS:GUIDANCE[:interval=LO-HI][:schedule=karras|ays][:guide], comma-separated "
                               "(evaluation/settings.py; default none): FID, alignment, U-Net calls and s/image, "
                               "settings.png with the Pareto front")
    gen_eval.add_argument("--settings-heldout", action="store_true",
                          help="measure the --settings sweep on as many held-out prompts too")
    gen_eval.add_argument("--guide-model", default=None, metavar="DIR",
                          help="the autoguidance guide the ':guide' settings use")
    gen_eval.add_argument("--seed", type=int, default=0)
    gen_eval.add_argument("--batch-size", type=int, default=D.EVAL_BATCH_SIZE)
    gen_eval.add_argument("--out", default=None,
                          help="results folder (default MODEL/eval, or eval-default-model for the default)")
    gen_eval.add_argument("--cache-dir", default=None, help="real-image feature cache (default OUT/cache)")
    gen_eval.set_defaults(func=commands.cmd_eval_generate)

    inpaint_eval = evaluate.add_parser("inpaint", help="LaMa-protocol inpainting eval: FID, PSNR / SSIM in and out")
    inpaint_eval.add_argument("--model", action="append", default=None,
                              help="inpainting or text-to-image model folder; repeat for several (default: the "
                                   "embedded inpainting default and the text-to-image default it was tuned from)")
    inpaint_eval.add_argument("--data", required=True, help="imagefolder with a held-out split")
    inpaint_eval.add_argument("--split", default="validation")
    inpaint_eval.add_argument("--baselines", default="blend,repaint",
                              help="methods for text-to-image models, each optionally with its latent mask after a "
                                   "colon, e.g. blend:cover (default blend,repaint)")
    inpaint_eval.add_argument("--masks", default="narrow strokes,wide strokes,boxes,outpaint",
                              help="mask kinds (default: all four)")
    inpaint_eval.add_argument("--num-images", type=int, default=100, help="N held-out images (default 100)")
    inpaint_eval.add_argument("--num-inference-steps", type=int, default=D.EVAL_NUM_INFERENCE_STEPS)
    inpaint_eval.add_argument("--guidance-scale", type=float, default=D.EVAL_GUIDANCE_SCALE)
    inpaint_eval.add_argument("--seed", type=int, default=0)
    inpaint_eval.add_argument("--original-input", action="store_true",
                              help="give the methods the original image rather than the masked one (the older "
                                   "protocol, which lets the 4-channel baselines copy pixels from under the mask)")
    inpaint_eval.add_argument("--out", default=None, help="results folder (default eval-inpaint)")
    inpaint_eval.set_defaults(func=commands.cmd_eval_inpaint)

    control_eval = evaluate.add_parser("control", help="a ControlNet's edge fidelity (F1 of Canny maps) and FID "
                                                       "against the base model on held-out images")
    control_eval.add_argument("--controlnet", required=True, metavar="DIR", help="a ControlNet trained on --model")
    control_eval.add_argument("--model", default=None, help="its base model folder (default: the embedded one)")
    control_eval.add_argument("--data", required=True, help="imagefolder with a held-out split")
    control_eval.add_argument("--split", default="validation")
    control_eval.add_argument("--num-images", type=int, default=200, help="N held-out images (default 200)")
    control_eval.add_argument("--scales", default="1", help="conditioning scales, one row each (default 1)")
    control_eval.add_argument("--num-inference-steps", type=int, default=None, help="default: the model's own")
    control_eval.add_argument("--guidance-scale", type=float, default=None, help="default: the model's own")
    control_eval.add_argument("--seed", type=int, default=0)
    control_eval.add_argument("--out", default=None, help="results folder (default eval-control)")
    control_eval.set_defaults(func=commands.cmd_eval_control)

    cg_eval = evaluate.add_parser("classifier-guidance",
                                  help="FID and label accuracy of classifier-guided samples as the scale grows")
    cg_eval.add_argument("--classifier", required=True, help="train_classifier.py output_dir (or its final/)")
    cg_eval.add_argument("--model", default=None, help="text-to-image model folder (default: the embedded default)")
    cg_eval.add_argument("--data", required=True, help="imagefolder with the classifier's label column")
    cg_eval.add_argument("--scales", default="0,1,2,5,10", help="classifier scales (default %(default)s)")
    cg_eval.add_argument("--num-images", type=int, default=200, help="N per scale (default %(default)s)")
    cg_eval.add_argument("--scheduler", default="ddim", help="ddpm, ddim, dpm++ or unipc (default %(default)s)")
    cg_eval.add_argument("--num-inference-steps", type=int, default=50)
    cg_eval.add_argument("--guidance-scale", type=float, default=1.0,
                         help="classifier-free guidance on the empty prompt (default 1: none, one U-Net call a step)")
    cg_eval.add_argument("--seed", type=int, default=0)
    cg_eval.add_argument("--batch-size", type=int, default=50)
    cg_eval.add_argument("--out", default=None, help="results folder (default eval-classifier-guidance)")
    cg_eval.add_argument("--cache-dir", default=None, help="real-image feature cache (default OUT/cache)")
    cg_eval.set_defaults(func=commands.cmd_eval_classifier_guidance)

    vlb = evaluate.add_parser("vlb", help="variational bound on held-out latents, per term and timestep (bits/dim)")
    vlb.add_argument("--model", default=None, help="text-to-image model folder (default: the embedded default)")
    vlb.add_argument("--data", required=True, help="imagefolder with a held-out split")
    vlb.add_argument("--split", default="validation")
    vlb.add_argument("--num-images", type=int, default=100, help="N held-out images (default 100)")
    vlb.add_argument("--timestep-stride", type=int, default=1,
                     help="compute every S-th KL term and scale their sum by S (default 1: all, exact)")
    vlb.add_argument("--seed", type=int, default=0)
    vlb.add_argument("--out", default=None, help="results folder (default eval-vlb)")
    vlb.set_defaults(func=commands.cmd_eval_vlb)

    export = subcommands.add_parser("export", help="a slim model folder (the embedded default's layout)")
    export.add_argument("--model", required=True, help="model folder (train_ldm.py's final/)")
    export.add_argument("--out", required=True, help="folder to write (e.g. pipelines/default_model)")
    export.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing model folder at --out (any other existing folder is refused)")
    export.add_argument("--text-encoder", default=None, help="installed text encoder name (default: config.yaml's)")
    export.add_argument("--vae", default=None,
                        help="a decoder-only fine-tune of the model's autoencoder to ship instead (checked)")
    export.set_defaults(func=commands.cmd_export)

    ema = subcommands.add_parser("ema", help="post-hoc EMA (EDM2): choose the EMA length after training")
    ema.add_argument("run", help="train_ldm.py output_dir trained with post_hoc_ema=[...] (its final/ and snapshots)")
    ema.add_argument("--sigma-rel", type=float, action="append", required=True,
                     help="relative EMA length in (0, 0.2887), e.g. 0.08; repeat to score several by the run's "
                          "validation loss and keep the lowest")
    ema.add_argument("--out", required=True, help="model folder to write")
    ema.add_argument("--overwrite", action="store_true",
                     help="replace an existing model folder at --out (any other existing folder is refused)")
    ema.set_defaults(func=commands.cmd_ema)

    generate = subcommands.add_parser("generate", help="text-to-image with a trained model")
    _add_sampling_args(generate, "model folder (default: the embedded default model)")
    generate.add_argument("--fast", action="store_true",
                          help=f"the embedded distilled default (lcm sampler, {D.FAST_NUM_INFERENCE_STEPS} steps, one "
                               "U-Net call per step) once one ships; none does in this release")
    generate.add_argument("--classifier", default=None, help="classifier guidance: a train_classifier.py output")
    generate.add_argument("--class-label", default=None, help="the class to guide toward (e.g. 'Animals & Nature')")
    generate.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance scale (default 1)")
    generate.add_argument("--controlnet", action="append", default=None, metavar="DIR",
                          help="a ControlNet folder trained on --model (repeat for several; docs/control.md)")
    generate.add_argument("--control", action="append", default=None, metavar="IMAGE",
                          help="its control image, one per --controlnet: a photo, turned into the map by "
                               "--control-type, or a ready map (--control-type none)")
    generate.add_argument("--control-type", choices=("canny", "colour", "none"), default=None,
                          help="the detector applied to --control images (default: the kind each ControlNet "
                               "records, else canny; none: they are maps already)")
    generate.add_argument("--controlnet-scale", type=float, action="append", default=None,
                          help="conditioning scale, one per --controlnet or one for all (default 1)")
    generate.set_defaults(func=commands.cmd_generate)

    img2img = subcommands.add_parser("img2img", help="redraw an image under a prompt (SDEdit)")
    _add_sampling_args(img2img, "text-to-image model folder (default: the embedded default model)")
    img2img.add_argument("--image", required=True, help="image to start from (transparency is composited on white)")
    img2img.add_argument("--strength", type=float, default=0.8,
                         help="in (0, 1]: how far the image is noised, the share of the steps run (default 0.8, "
                              "diffusers'); low keeps the image, 1 keeps little of it")
    img2img.set_defaults(func=commands.cmd_img2img)

    inpaint = subcommands.add_parser("inpaint", help="fill the white part of a mask from a prompt")
    _add_sampling_args(inpaint, "inpainting or text-to-image model folder (default: the embedded inpainting "
                                "default)")
    inpaint.add_argument("--image", required=True, help="image to edit (transparency is composited on white)")
    inpaint.add_argument("--mask", required=True,
                         help="mask image: white (>= 50%% grey) = repaint; resized to the image's size")
    inpaint.add_argument("--strength", type=float, default=1.0,
                         help="1 = start from noise, < 1 = from the noised image (default 1)")
    inpaint.add_argument("--method", choices=D.INPAINT_METHODS, default=None,
                         help="default: unet for an inpainting model, blend (latent blending) for text-to-image; "
                              "repaint: RePaint resampling (text-to-image models; about jump-n-sample x the cost)")
    inpaint.add_argument("--repaint-jump-length", type=int, default=10, help="RePaint's j (default 10)")
    inpaint.add_argument("--repaint-jump-n-sample", type=int, default=10, help="RePaint's r (default 10)")
    inpaint.add_argument("--latent-mask", choices=D.LATENT_MASKS, default="nearest",
                         help="blend / repaint: a latent cell is repainted if its sampled pixel is masked (nearest, "
                              "diffusers') or if any of its pixels is (cover)")
    inpaint.add_argument("--no-paste-back", action="store_true",
                         help="keep the decoded pixels outside the mask (default: paste the original back)")
    inpaint.add_argument("--feather", type=float, default=0.0, help="paste-back edge blur in pixels (default 0)")
    inpaint.set_defaults(func=commands.cmd_inpaint)

    serve = subcommands.add_parser("serve", help="web page for generating and inpainting (Gradio)")
    serve.add_argument("--model", default=None, help="text-to-image model folder (default: the embedded default)")
    serve.add_argument("--inpaint-model", default=None,
                       help="inpainting or text-to-image model folder (default: the embedded inpainting default)")
    serve.add_argument("--fast-model", default=None,
                       help="a consistency-distilled student for the Generate tab's Fast box (default: the embedded "
                            "one, offered when --model is the embedded default)")
    serve.add_argument("--lora-dir", default=None,
                       help="a folder of LoRA adapter folders the Generate tab offers (those that fit --model)")
    serve.add_argument("--controlnet", default=None, metavar="DIR",
                       help="a ControlNet trained on --model: adds the Control tab (docs/control.md)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--auth", default=os.environ.get("LDM_SERVE_AUTH"),
                       help="USER:PASSWORD every visitor must enter (default: $LDM_SERVE_AUTH; none on loopback)")
    serve.set_defaults(func=commands.cmd_serve)
    return parser


def _add_sampling_args(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("prompt", help="text prompt ('' for unconditional)")
    parser.add_argument("--model", help=model_help)
    parser.add_argument("-o", "--output", help="PNG to write (default: <prompt>.png); a grid when N > 1")
    parser.add_argument("--num-images", "-n", type=int, default=1)
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=None,
                        help=f"sampling steps (default: the model's own, from its sampling.json, else "
                             f"{D.NUM_INFERENCE_STEPS}; {D.FAST_NUM_INFERENCE_STEPS} for a consistency-distilled "
                             "student; --steps: old name)")
    parser.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float, default=None,
                        help=f"classifier-free guidance scale (default: the model's own, from its sampling.json, "
                             f"else {D.GUIDANCE_SCALE}; 1 with an LCM-LoRA; --guidance: old name)")
    parser.add_argument("--guide-model", dest="guide_model", default=None, metavar="DIR",
                        help="autoguidance: guide with this smaller model of the same task instead of the "
                             "unconditional branch (configs/ldm/emoji-64-guide.yaml; docs/generating.md)")
    parser.add_argument("--guidance-interval", dest="guidance_interval", type=float, nargs=2, default=None,
                        metavar=("SIGMA_LO", "SIGMA_HI"),
                        help="classifier-free guidance only at steps with noise level sigma in (LO, HI], one U-Net "
                             "call at the others (default: the model's own, from its sampling.json, else every step; "
                             "docs/generating.md)")
    parser.add_argument("--guide-every-step", action="store_true",
                        help="classifier-free guidance at every step, whatever interval the model's own settings name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-schedule", dest="step_schedule", choices=(*D.STEP_SCHEDULES, "none"), default=None,
                        help="where the sampler's steps fall: karras (Karras sigmas), ays (Align Your Steps) or none "
                             "(the sampler's own spacing); default: the model's own with its own sampler "
                             "(sampling.json), else the sampler's spacing")
    parser.add_argument("--scheduler", default=None,
                        help=f"one of {', '.join(D.SCHEDULER_NAMES)} (default: the model's own, "
                             f"{D.DEFAULT_SCHEDULER} for models trained here)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.bin) weights")
    parser.add_argument("--lora", action="append", default=None, metavar="DIR",
                        help="a LoRA adapter folder (pytorch_lora_weights.safetensors); repeat for several")
    parser.add_argument("--lora-scale", action="append", type=float, default=None, metavar="S",
                        help="the adapter's scale (default 1); one for all, or one per --lora in order")
    parser.add_argument("--force", action="store_true",
                        help="apply adapters (and ControlNets) recorded as trained on another base model")
    parser.add_argument("--fuse", action="store_true", help="merge the adapters into the U-Net before sampling")
    parser.add_argument("--max-images", type=int, default=None,
                        help="raise the limit on images per call (default: Pipeline's, 64)")
    parser.add_argument("--max-megapixels", type=float, default=None,
                        help="raise the limit on megapixels per image (default: Pipeline's, 4)")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
