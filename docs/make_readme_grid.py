"""Regenerate docs/samples.png: the shipped default model with its own sampling settings (its sampling.json: 10
DPM-Solver++ steps placed by Align Your Steps, guidance 4), fixed prompts and seed, each prompt under its image.

    python docs/make_readme_grid.py
"""

from pathlib import Path

from core.images import captioned_grid
from pipelines import Pipeline

PROMPTS = ["a cat", "cat face", "grinning face", "red apple", "rocket", "pizza", "snowman", "sun with face",
           "dog face, fluent-3d style", "red heart", "fire", "dolphin", "banana", "smiling face with sunglasses",
           "christmas tree", "ghost"]

if __name__ == "__main__":
    images = Pipeline().generate(PROMPTS, seed=0, output_type="torch") * 2 - 1
    captioned_grid(images, PROMPTS, columns=8).save(Path(__file__).parent / "samples.png")
