"""Regenerate docs/img2img-example.png: held-out images redrawn by the embedded default under another prompt at
rising strength (image-to-image, `Img2ImgPipeline`); strength 1 keeps almost nothing of the image.

    python docs/make_img2img_example.py
"""

from pathlib import Path

from PIL import Image

from core.data.dataset import load_image_caption_dataset
from core.images import captioned_grid
from pipelines import Img2ImgPipeline

ROWS = ((3, "cat face"), (120, "red apple"), (250, "snowman"), (400, "fire"))  # held-out image, prompt
STRENGTHS = (0.4, 0.6, 0.8, 1.0)
STEPS, GUIDANCE = 20, 4.0


def main() -> None:
    data = load_image_caption_dataset("data/emoji", "validation")
    pipe = Img2ImgPipeline()
    cells, captions = [], []
    for row, prompt in ROWS:
        image = Image.open(data[row]["image"]["path"]).convert("RGB").resize((64, 64))
        cells.append(image)
        captions.append(data[row]["caption"][:18])
        for strength in STRENGTHS:
            cells += pipe.generate(prompt, image=image, strength=strength, num_inference_steps=STEPS,
                                   guidance_scale=GUIDANCE, seed=0, progress=False, step_schedule=None,
                                   guidance_interval=None)
            captions.append(f"'{prompt}' {strength:g}")
    captioned_grid(cells, captions, columns=1 + len(STRENGTHS)).save(Path(__file__).parent / "img2img-example.png")


if __name__ == "__main__":
    main()
