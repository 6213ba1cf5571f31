"""Talking portraits of the portrait world: drawn by its procedural renderer (the measuring
chain's check) and by a trained portrait model (docs/apps.md, "Talking portrait").

``talking_frame`` draws a flat-style portrait (``synthetic.portraits.draw_layers``) with its
mouth replaced by an ellipse whose height follows the viseme track's openness and whose width
follows its width; ``measure_lip_sync`` speaks sentences, draws every frame, and reads each
frame back with the portrait reader (``synthetic.portrait_reader``): the mouth height it
measures against the track (Pearson r, and against the track shuffled), the identity against the
still portrait, and the largest change outside the mouth box.

``model_levels`` lets a model draw the mouth instead: the still picture's mouth box is inpainted
with the portrait world's open-mouthed expression ("surprised") in its prompt, once per openness
level, the level setting the denoising strength (level 0 is the still itself), at one seed, so
the levels differ in the mouth alone and a frame is the level nearest its openness.
``measure_model_lip_sync`` measures that chain as ``measure_lip_sync`` measures the renderer's.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
from PIL import Image, ImageDraw

from danqing.apps.speech import speak
from danqing.apps.visemes import Track, pearson, phone_track
from danqing.synthetic import portrait_reader
from danqing.synthetic.portraits import (CENTRE, IDENTITY, MOUTH_RGB, MOUTH_Y, SUPERSAMPLE, Portrait, draw_layers, split_people,
                                         values, vocab)

# the mouth ellipse: half width at rest, half height closed .. fully open (fractions of the picture)
MOUTH_RX, MOUTH_RY = (0.06, (0.012, 0.05))
# the mouth box: outside it a talking frame equals the still portrait (x0, y0, x1, y1, fractions)
MOUTH_BOX = (0.38, 0.52, 0.62, 0.66)
MOUTH_LEVELS = 6       # openness levels a model draws: strengths 0, 0.2, ..., 1
OPEN_MOUTH = "surprised"


def still(p: Portrait) -> Portrait:
    """The portrait as a talking frame starts from: flat style, neutral mouth."""
    return dataclasses.replace(p, style="flat", mouth="neutral")


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
    ox, my = CENTRE[0] + vocab()["pose"][p.pose]["dx"], MOUTH_Y + 0.005
    skin = img.getpixel((round(ox * s), round((my + 0.045) * s)))  # the chin's colour, below the mouth
    d.rectangle([ox * s - 0.075 * s, (my - 0.03) * s, ox * s + 0.075 * s, (my + 0.03) * s], fill=skin)  # the neutral line away
    rx = MOUTH_RX * width
    ry = MOUTH_RY[0] + (MOUTH_RY[1] - MOUTH_RY[0]) * float(np.clip(opening, 0, 1))
    d.ellipse([(ox - rx) * s, (my - ry) * s, (ox + rx) * s, (my + ry) * s], fill=MOUTH_RGB)
    return img.resize((size, size), Image.BOX)


def mouth_height(frame: Image.Image) -> float:
    """The mouth's height as the portrait reader measures it (fraction of the picture)."""
    return portrait_reader.features(frame)["mouth"][1] / 10


def _identity(pa: dict, pb: dict) -> float:
    """``portrait_reader.identity_match`` from two pictures' read probabilities (the still
    portrait's read once, not once per frame)."""
    score = 1.0
    for attr in IDENTITY:
        if pa[attr] is not None and pb[attr] is not None:
            score *= sum(pa[attr][k] * pb[attr][k] for k in pa[attr])
    return float(score)


def _outside_box(size: int) -> np.ndarray:
    return np.asarray(mouth_mask(size)) == 0


def measure_lip_sync(sentences: list[tuple[str, str]], fps: int = 25, size: int = 64, seed: int = 0,
                     split: str = "train") -> dict:
    """Speak each (voice, text), draw a person of ``split`` saying it, read every frame back.

    Returns:
        r (Pearson r of the measured mouth height and the track over all frames), r_shuffled
        (the same, the track shuffled), identity (share of frames whose identity match with the
        still portrait is over 0.5), outside_change (largest change outside ``MOUTH_BOX``, /255),
        frames.
    """
    rng = random.Random(seed)
    who = split_people(split)
    heights, opens, ident, change = [], [], [], 0
    keep = _outside_box(size)
    for voice, text in sentences:
        p = Portrait(rng.choice(who), "neutral", rng.choice(values("clothing")), "front",
                     rng.choice(values("background")), "flat", rng.randrange(2**31))
        s = speak(text, voice)
        track: Track = phone_track(s.phones, s.seconds, fps)
        reference = talking_frame(p, 0.0, size=size)
        ref_px, ref_probs = np.asarray(reference, np.int16), portrait_reader.read_probs(reference)
        for o, w in zip(track.open, track.width):
            f = talking_frame(p, o, w, size)
            heights.append(mouth_height(f))
            opens.append(o)
            ident.append(_identity(portrait_reader.read_probs(f), ref_probs) > 0.5)
            change = max(change, int(np.abs(np.asarray(f, np.int16) - ref_px)[keep].max()))
    opens_arr = np.array(opens)
    shuffled = np.random.default_rng(seed).permutation(opens_arr)
    return {"r": pearson(heights, opens_arr), "r_shuffled": pearson(heights, shuffled),
            "identity": float(np.mean(ident)), "outside_change": change, "frames": len(opens)}


def mouth_mask(size: int = 64) -> Image.Image:
    """The inpainting mask of the mouth box (white: repainted)."""
    m = Image.new("L", (size, size), 0)
    x0, y0, x1, y1 = (round(v * size) for v in MOUTH_BOX)
    ImageDraw.Draw(m).rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    return m


def model_levels(studio, request, still_picture: Image.Image, levels: int = MOUTH_LEVELS) -> list[Image.Image]:
    """The still picture with its mouth drawn by the model at ``levels`` openness levels.

    Args:
        studio: a ``danqing.Studio``.
        request: a ``GenerationRequest`` whose prompt asks for the open mouth (model, seed,
            sampler, steps, CFG as wanted); its size is the picture's.
        still_picture: the closed-mouthed picture (level 0).
        levels: how many levels (>= 2); level k inpaints the mouth box at strength k / (levels - 1).
    """
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    mask = mouth_mask(still_picture.width)
    out = [still_picture]
    for k in range(1, levels):
        r = request.replace(denoising_strength=k / (levels - 1), mask_blur=0, inpainting_fill="original",
                            batch_size=1, batch_count=1)
        out.append(studio.generate(r, init_image=still_picture, mask_image=mask).images[0])
    return out


def level_of(opening: float, levels: int = MOUTH_LEVELS) -> int:
    """The level nearest an openness in [0, 1]."""
    return int(round(float(np.clip(opening, 0, 1)) * (levels - 1)))


def measure_model_lip_sync(studio, model: str, sentences: list[tuple[str, str]], fps: int = 25, seed: int = 0,
                           levels: int = MOUTH_LEVELS, steps: int = 20, cfg: float = 7.0,
                           split: str = "heldout") -> dict:
    """``measure_lip_sync`` with ``model`` drawing: for each (voice, text), a person of ``split``
    is drawn by the model from the caption of a neutral-faced flat portrait (seed ``seed + i``),
    the mouth levels are drawn from it (``model_levels``) and every frame is read back.

    Returns what ``measure_lip_sync`` returns, plus person (share of frames whose every
    identity attribute the reader reads as the person's), still_person (the same for the stills
    alone), level_heights (the mean mouth height measured at each level) and people.
    """
    from danqing.request import GenerationRequest
    from danqing.synthetic.portraits_captions import portrait_caption

    rng = random.Random(seed)
    who = split_people(split)
    heights, opens, ident, person_ok, still_ok, change = [], [], [], [], [], 0
    by_level: list[list[float]] = [[] for _ in range(levels)]
    for i, (voice, text) in enumerate(sentences):
        p = Portrait(rng.choice(who), "neutral", rng.choice(values("clothing")), "front",
                     rng.choice(values("background")), "flat", rng.randrange(2**31))
        base = GenerationRequest.create(prompt=portrait_caption(p, "en"), model=model, seed=seed + i, steps=steps,
                                        cfg_scale=cfg, sampler="DPM++ 2M", width=64, height=64)
        still_picture = studio.generate(base).images[0]
        talking = base.replace(prompt=portrait_caption(dataclasses.replace(p, mouth=OPEN_MOUTH), "en"))
        pictures = model_levels(studio, talking, still_picture, levels)
        level_h = [mouth_height(f) for f in pictures]
        for k, h in enumerate(level_h):
            by_level[k].append(h)
        still_ok.append(_is_person(portrait_reader.read(still_picture), p))
        s = speak(text, voice)
        track: Track = phone_track(s.phones, s.seconds, fps)
        keep = _outside_box(still_picture.width)
        ref_px, ref_probs = np.asarray(still_picture, np.int16), portrait_reader.read_probs(still_picture)
        reads = [(portrait_reader.read_probs(f), portrait_reader.read(f)) for f in pictures]
        level_change = [int(np.abs(np.asarray(f, np.int16) - ref_px)[keep].max()) for f in pictures]
        for o in track.open:
            k = level_of(o, levels)
            heights.append(level_h[k])
            opens.append(o)
            ident.append(_identity(reads[k][0], ref_probs) > 0.5)
            person_ok.append(_is_person(reads[k][1], p))
            change = max(change, level_change[k])
    opens_arr = np.array(opens)
    shuffled = np.random.default_rng(seed).permutation(opens_arr)
    return {"r": pearson(heights, opens_arr), "r_shuffled": pearson(heights, shuffled),
            "identity": float(np.mean(ident)), "person": float(np.mean(person_ok)),
            "still_person": float(np.mean(still_ok)), "outside_change": change, "frames": len(opens),
            "level_heights": [float(np.mean(h)) for h in by_level], "people": len(sentences)}


def _is_person(read: dict, p: Portrait) -> bool:
    """Whether every identity attribute the reader reads is the person's."""
    return all(read[a] is None or read[a] == getattr(p.person, a) for a in IDENTITY)
