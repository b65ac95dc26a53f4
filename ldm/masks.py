"""Random inpainting masks (1 = the region to fill), seeded by a numpy Generator, mixed by weights.

Kinds: LaMa's irregular thick strokes (Suvorov et al. 2022, their training parameters given at 256 px and scaled to
the image size), random boxes, ellipses, outpainting borders (one or more sides), and the whole image, drawn with
`full_probability` so an inpainting model keeps its text-to-image ability (the Stable Diffusion inpainting recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from core.errors import UserError

MASK_KINDS = ("strokes", "boxes", "ellipses", "outpaint")


def _scaled(value_at_256: float, size: int) -> float:
    return value_at_256 * size / 256


def irregular_strokes(rng: np.random.Generator, size: int, max_width: float = 100, max_len: float = 200,
                      max_angle: float = 4.0, min_times: int = 1, max_times: int = 5) -> np.ndarray:
    """LaMa's irregular mask: 1-5 random polylines of thick brush strokes (widths and lengths given at 256 px)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(min_times, max_times + 1)):
        x, y = rng.integers(0, size), rng.integers(0, size)
        for j in range(rng.integers(1, 11)):
            angle = rng.uniform(0, max_angle)
            if j % 2 == 0:
                angle = 2 * math.pi - angle
            length = rng.uniform(_scaled(10, size), _scaled(max_len, size))
            width = max(1, round(rng.uniform(_scaled(5, size), _scaled(max_width, size))))
            end_x = int(np.clip(x + length * math.sin(angle), 0, size - 1))
            end_y = int(np.clip(y + length * math.cos(angle), 0, size - 1))
            draw.line([(x, y), (end_x, end_y)], fill=255, width=width)
            radius = width / 2
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)  # round joints
            x, y = end_x, end_y
    return np.asarray(canvas, dtype=np.float32) / 255


def random_boxes(rng: np.random.Generator, size: int, margin: float = 10, min_size: float = 30,
                 max_size: float = 150, min_times: int = 1, max_times: int = 4) -> np.ndarray:
    """LaMa's box mask: 1-4 axis-aligned rectangles (sizes given at 256 px)."""
    mask = np.zeros((size, size), np.float32)
    margin, low, high = (max(1, round(_scaled(v, size))) for v in (margin, min_size, max_size))
    high = min(high, size - 2 * margin)
    for _ in range(rng.integers(min_times, max_times + 1)):
        height, width = rng.integers(low, high + 1, size=2)
        top = rng.integers(margin, size - margin - height + 1)
        left = rng.integers(margin, size - margin - width + 1)
        mask[top:top + height, left:left + width] = 1
    return mask


def random_ellipses(rng: np.random.Generator, size: int, min_times: int = 1, max_times: int = 3) -> np.ndarray:
    """1-3 filled ellipses with radii from 10% to 35% of the side."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(min_times, max_times + 1)):
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        rx, ry = rng.uniform(0.1, 0.35, size=2) * size
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255


def outpaint_border(rng: np.random.Generator, size: int, min_fraction: float = 0.15,
                    max_fraction: float = 0.45) -> np.ndarray:
    """One or more sides masked to a random depth: the model extends the image outwards."""
    mask = np.zeros((size, size), np.float32)
    sides = rng.random(4) < 0.5
    if not sides.any():
        sides[rng.integers(0, 4)] = True
    for side, depth in zip(np.flatnonzero(sides), rng.uniform(min_fraction, max_fraction, size=4)):
        depth = max(1, round(depth * size))
        if side == 0:
            mask[:depth] = 1
        elif side == 1:
            mask[-depth:] = 1
        elif side == 2:
            mask[:, :depth] = 1
        else:
            mask[:, -depth:] = 1
    return mask


GENERATORS = {"strokes": irregular_strokes, "boxes": random_boxes, "ellipses": random_ellipses,
              "outpaint": outpaint_border}


@dataclass
class MaskGenerator:
    """Draws one mask kind by `weights`, or the whole image with `full_probability`."""

    size: int
    weights: dict[str, float]
    full_probability: float = 0.25

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(GENERATORS)
        if unknown:
            raise UserError(f"unknown mask kind(s) {', '.join(sorted(unknown))}; valid: {', '.join(MASK_KINDS)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise UserError(f"mask weights must be >= 0 with a positive sum, got {self.weights}")
        if not 0 <= self.full_probability <= 1:
            raise UserError(f"full mask probability must be in [0, 1], got {self.full_probability}")

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """A (size, size) float32 mask in {0, 1}."""
        if rng.random() < self.full_probability:
            return np.ones((self.size, self.size), np.float32)
        kinds = list(self.weights)
        probabilities = np.array([self.weights[k] for k in kinds], dtype=np.float64)
        kind = kinds[rng.choice(len(kinds), p=probabilities / probabilities.sum())]
        return GENERATORS[kind](rng, self.size)
