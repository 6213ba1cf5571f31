"""Rendering scenes to pictures (Pillow, 4x supersampled, then downsampled for anti-aliasing)."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from danqing.synthetic.scenes import Scene, colour_info, vocab

SUPERSAMPLE = 4


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Outline of a polygonal shape centred at (cx, cy) with half-size r; None for round ones.

    Orientation is fixed (triangle and star point up, the cross is a plus sign), which the
    evaluator's templates rely on.
    """
    if shape == "square":
        h = 0.86 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.05 * r + rad * math.sin(a)))
        return pts
    if shape == "heart":
        # the classic heart curve x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t (point down)
        pts = []
        for k in range(64):
            a = 2 * math.pi * k / 64
            x = 16 * math.sin(a) ** 3
            y = 13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15.5))
        return pts
    if shape == "cross":
        w = 0.36 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, hole=None) -> None:
    """Draw one shape; a ring's hole is filled with ``hole`` (render() draws into a mask too, so
    the background shows through it)."""
    poly = shape_polygon(shape, cx, cy, r)
    if poly is not None:
        draw.polygon(poly, fill=fill)
    elif shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        if shape == "ring":
            h = 0.5 * r
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=hole)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, size: int = 64) -> np.ndarray:
    """A (size, size) bool mask of a shape filling the frame (the evaluator's template)."""
    s = size * SUPERSAMPLE
    img = Image.new("L", (s, s), 0)
    draw_shape(ImageDraw.Draw(img), shape, s / 2, s / 2, s * 0.45, 255, hole=0)
    return np.asarray(img.resize((size, size), Image.BOX)) >= 128


def _background(scene: Scene, s: int) -> Image.Image:
    v = vocab()["backgrounds"]
    c1 = np.array(v[scene.background]["rgb"], np.float32)
    c2 = np.array(v[scene.background_2]["rgb"], np.float32)
    c2 = 0.6 * c1 + 0.4 * c2  # textures are low-contrast
    rng = np.random.default_rng(scene.seed)
    yy, xx = np.mgrid[0:s, 0:s] / s
    vertical = bool(rng.integers(2))
    if scene.style == "plain":
        t = np.zeros((s, s))
    elif scene.style == "gradient":
        t = yy if vertical else xx
        c2 = np.array(v[scene.background_2]["rgb"], np.float32)
    elif scene.style == "striped":
        t = ((yy if vertical else xx) * 8 % 1.0 < 0.5).astype(np.float32)
    elif scene.style == "checked":
        t = (((xx * 8).astype(int) + (yy * 8).astype(int)) % 2).astype(np.float32)
    elif scene.style == "speckled":
        small = (rng.random((16, 16)) < 0.3).astype(np.uint8) * 255
        t = np.asarray(Image.fromarray(small).resize((s, s), Image.NEAREST), np.float32) / 255
    else:
        raise ValueError(f"unknown background style {scene.style!r}")
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` (64 and 128 are the dataset's sizes)."""
    s = size * SUPERSAMPLE
    bg = _background(scene, s)
    layer = Image.new("RGB", (s, s))
    mask = Image.new("L", (s, s), 0)
    d, dm = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for o in scene.objects:
        r = vocab()["sizes"][o.size]["radius"] * o.scale * s
        rgb = tuple(colour_info(o.colour)["rgb"])
        draw_shape(d, o.shape, o.x * s, o.y * s, r, rgb, hole=(0, 0, 0))
        draw_shape(dm, o.shape, o.x * s, o.y * s, r, 255, hole=0)
    bg.paste(layer, (0, 0), mask)
    return bg.resize((size, size), Image.LANCZOS)


def render_mask(scene: Scene, size: int = 64) -> Image.Image:
    """The scene's objects as an "L" mask (255 inside an object, anti-aliased edges; a ring's
    hole is background): what a masked training loss weights."""
    s = size * SUPERSAMPLE
    mask = Image.new("L", (s, s), 0)
    dm = ImageDraw.Draw(mask)
    for o in scene.objects:
        r = vocab()["sizes"][o.size]["radius"] * o.scale * s
        draw_shape(dm, o.shape, o.x * s, o.y * s, r, 255, hole=0)
    return mask.resize((size, size), Image.BOX)


def degrade(image: Image.Image, rng: random.Random, blur: float = 0.8, noise: float = 8.0) -> Image.Image:
    """The image with Gaussian blur (radius up to ``blur`` px) and Gaussian pixel noise (std up to
    ``noise`` levels of 255): the evaluator must still read it."""
    from PIL import ImageFilter

    img = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, blur)))
    arr = np.asarray(img, np.float32)
    nrng = np.random.default_rng(rng.randrange(2**31))
    arr = arr + nrng.normal(0, rng.uniform(0.5 * noise, noise), arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
