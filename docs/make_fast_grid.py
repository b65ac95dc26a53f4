"""Regenerate docs/fast-samples.png: the embedded default (DPM-Solver++ 20 steps with guidance: 40 U-Net calls)
above a consistency student of it (the lcm sampler at 1, 2 and 4 steps, guidance as an input: 1, 2, 4 calls); same
prompts, seed 0, guidance 4. Each caption: the setting, then the prompt.

    python docs/make_fast_grid.py [STUDENT_DIR]     # default runs/lcm-default/final (docs/distillation.md)
"""

import sys
from pathlib import Path

import torch

from core.images import captioned_grid
from pipelines import Pipeline

PROMPTS = ["a cat", "grinning face", "red heart", "rocket", "pizza", "snowman", "fire", "dog face, fluent-3d style"]

if __name__ == "__main__":
    teacher = Pipeline()
    student = Pipeline(model=sys.argv[1] if len(sys.argv) > 1 else "runs/lcm-default/final")
    rows, captions = [], []
    for label, pipe, steps, scheduler in (("dpm++ 20", teacher, 20, "dpm++"), ("lcm 1", student, 1, "lcm"),
                                          ("lcm 2", student, 2, "lcm"), ("lcm 4", student, 4, "lcm")):
        rows.append(pipe.generate(PROMPTS, num_inference_steps=steps, guidance_scale=4.0, scheduler=scheduler,
                                  seed=0, output_type="torch", progress=False) * 2 - 1)
        captions += [f"{label}: {p}" for p in PROMPTS]
    captioned_grid(torch.cat(rows), captions, columns=len(PROMPTS)).save(Path(__file__).parent / "fast-samples.png")
