"""Talking mouths of the portrait world: a portrait whose mouth is an ellipse as open and as wide
as a viseme track asks (``talking_frame``), the mouth-shape map a ControlNet reads
(``mouth_map``: the same ellipse, white on black), and training triples of both
(``talking_examples``) for ``danqing train controlnet`` with ``condition = "mouth"``.

The talking portrait (``danqing.apps.talk_world``) draws its frames with these: the renderer as
the measuring chain's check, and the mouth ControlNet (danqing-tiny-portraits-mouth) on the
portrait model, given ``mouth_map`` of each frame's openness.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
from PIL import Image, ImageDraw

from danqing.synthetic.portraits import CENTRE, MOUTH_RGB, MOUTH_Y, SUPERSAMPLE, Portrait, draw_layers, split_people, values, vocab
from danqing.synthetic.portraits_captions import portrait_caption

# the mouth ellipse: half width at rest, half height closed .. fully open (fractions of the picture)
MOUTH_RX, MOUTH_RY = (0.06, (0.012, 0.05))
# the mouth box: outside it a talking frame equals the still portrait (x0, y0, x1, y1, fractions)
MOUTH_BOX = (0.38, 0.52, 0.62, 0.66)
# the width a viseme asks for spans 0.78-1.1 (data/visemes.json); training draws a little wider
WIDTH_RANGE = (0.75, 1.15)


def still(p: Portrait) -> Portrait:
    """The portrait as a talking frame starts from: flat style, neutral mouth."""
    return dataclasses.replace(p, style="flat", mouth="neutral")


def _ellipse(opening: float, width: float, dx: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the speaking mouth, fractions of the picture."""
    ox, my = CENTRE[0] + dx, MOUTH_Y + 0.005
    rx = MOUTH_RX * width
    ry = MOUTH_RY[0] + (MOUTH_RY[1] - MOUTH_RY[0]) * float(np.clip(opening, 0, 1))
    return ox - rx, my - ry, ox + rx, my + ry


def talking_frame(p: Portrait, opening: float, width: float = 1.0, size: int = 64) -> Image.Image:
    """One frame of a talking portrait-world person, drawn by the renderer.

    Args:
        p: the portrait (its style is drawn flat, its expression replaced by the speaking mouth).
        opening: 0 (closed) .. 1 (widest).
        width: mouth width relative to rest.
        size: picture side (64 is danqing-tiny's size).
    """
    p = still(p)
    s = size * SUPERSAMPLE
    img, _ = draw_layers(p, s)
    d = ImageDraw.Draw(img)
    dx = vocab()["pose"][p.pose]["dx"]
    ox, my = CENTRE[0] + dx, MOUTH_Y + 0.005
    skin = img.getpixel((round(ox * s), round((my + 0.045) * s)))  # the chin's colour, below the mouth
    d.rectangle([ox * s - 0.075 * s, (my - 0.03) * s, ox * s + 0.075 * s, (my + 0.03) * s], fill=skin)  # the neutral line away
    d.ellipse([v * s for v in _ellipse(opening, width, dx)], fill=MOUTH_RGB)
    return img.resize((size, size), Image.BOX)


def mouth_map(opening: float, width: float = 1.0, size: int = 64, pose: str = "front") -> Image.Image:
    """The mouth-shape control map: the speaking mouth's ellipse, white on black (RGB), where
    ``talking_frame`` draws it."""
    s = size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), (0, 0, 0))
    ImageDraw.Draw(img).ellipse([v * s for v in _ellipse(opening, width, vocab()["pose"][pose]["dx"])],
                                fill=(255, 255, 255))
    return img.resize((size, size), Image.BOX)


def mouth_height(frame: Image.Image) -> float:
    """The mouth's height as the portrait reader measures it (fraction of the picture)."""
    from danqing.synthetic import portrait_reader

    return portrait_reader.features(frame)["mouth"][1] / 10


def mouth_box_mask(size: int = 64) -> Image.Image:
    """``MOUTH_BOX`` as a mask (white inside)."""
    m = Image.new("L", (size, size), 0)
    x0, y0, x1, y1 = (round(v * size) for v in MOUTH_BOX)
    ImageDraw.Draw(m).rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    return m


def talking_examples(n: int, size: int = 64, seed: int = 0, captions_per_image: int = 2,
                     split: str = "train", closed_share: float = 0.2) -> tuple[list[Image.Image], list[Image.Image], list[list[str]]]:
    """``n`` (talking frame, mouth map, captions) of ``split``'s people: front-facing, flat,
    random clothing and background; the openness 0 in ``closed_share`` of them, else uniform in
    (0, 1]; the width uniform in ``WIDTH_RANGE``. The captions are the still portrait's
    (neutral expression), alternating English and Chinese phrasings. Deterministic from ``seed``.
    """
    rng = random.Random(f"talking:{split}:{seed}")
    who = split_people(split)
    frames, maps, caps = [], [], []
    for _ in range(n):
        p = Portrait(rng.choice(who), "neutral", rng.choice(values("clothing")), "front",
                     rng.choice(values("background")), "flat", rng.randrange(2**31))
        opening = 0.0 if rng.random() < closed_share else rng.uniform(0.0, 1.0)
        width = rng.uniform(*WIDTH_RANGE)
        frames.append(talking_frame(p, opening, width, size))
        maps.append(mouth_map(opening, width, size))
        caps.append([portrait_caption(still(p), ("en", "zh")[k % 2], rng) for k in range(captions_per_image)])
    return frames, maps, caps
