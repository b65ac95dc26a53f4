"""Regenerate docs/inpaint-example.png: held-out images with one mask of each evaluation kind, filled from their
captions by the shipped inpainting default and by the text-to-image default with latent blending and RePaint.

Every method gets the masked image (hole grey), as in `ldm eval inpaint`, so no fill can copy the original.

    python docs/make_inpaint_example.py
"""

from pathlib import Path

import numpy as np
from PIL import Image

from core.data.dataset import load_image_caption_dataset
from core.images import captioned_grid
from ldm.inpainting import grey_hole_image
from pipelines import InpaintPipeline
from evaluation.inpainting import EVAL_MASKS, eval_masks
from pipelines.loading import DEFAULT_MODEL_DIR

ROWS = (3, 120, 250, 400)  # held-out images (validation split), one per mask kind
STEPS, GUIDANCE = 20, 4.0


def main() -> None:
    data = load_image_caption_dataset("data/emoji", "validation")
    tuned, t2i = InpaintPipeline(), InpaintPipeline(model=DEFAULT_MODEL_DIR)
    cells, captions = [], []
    for row, kind in zip(ROWS, EVAL_MASKS):
        image = Image.open(data[row]["image"]["path"]).convert("RGB").resize((64, 64))
        caption = data[row]["caption"]
        mask = eval_masks(kind, 1, 64, seed=row)[0, 0]
        mask_image = Image.fromarray((mask.numpy() * 255).astype(np.uint8))
        shown = grey_hole_image(image, mask_image)
        outputs = [pipe.generate(caption, image=shown, mask_image=mask_image, method=method,
                                 num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=0, progress=False,
                                 step_schedule=None, guidance_interval=None)[0]
                   for pipe, method in ((tuned, None), (t2i, "blend"), (t2i, "repaint"))]
        cells += [image, shown, *outputs]
        captions += [caption[:18], f"{kind} mask", "fine-tuned", "latent blend", "RePaint"]
    captioned_grid(cells, captions, columns=5).save(Path(__file__).parent / "inpaint-example.png")


if __name__ == "__main__":
    main()
