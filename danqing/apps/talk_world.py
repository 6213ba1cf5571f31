"""Talking portraits of the portrait world: drawn by its procedural renderer (the measuring
chain's check) and by a trained portrait model (docs/apps.md, "Talking portrait").

``talking_frame`` draws a flat-style portrait (``synthetic.portraits.draw_layers``) with its
mouth replaced by an ellipse whose height follows the viseme track's openness and whose width
follows its width; ``measure_lip_sync`` speaks sentences, draws every frame, and reads each
frame back with the portrait reader (``synthetic.portrait_reader``): the mouth height it
measures against the track (Pearson r, and against the track shuffled), the identity against the
still portrait, and the largest change outside the mouth box.

``model_levels`` lets a model draw the mouth instead: the still picture's mouth box is inpainted
once per openness level, at one seed, so the levels differ in the mouth alone and a frame is the
level nearest its openness. The mouth's shape is given to the model by the mouth ControlNet
(``MOUTH_CONTROL``, trained by ``danqing train controlnet`` on the world's talking frames): level
k's ``mouth_map`` at openness k / (levels - 1). (danqing-tiny-portraits' VAE decoder is
fine-tuned on talking frames, ``danqing.training.vae_decoder``: its first decoder drew a closed
and an open mouth nearly alike at 64 pixels.) Without a ControlNet (``control=None``) the
expression word is the only handle: the prompt asks for the open mouth ("surprised") and the
level sets the denoising strength (level 0 is the still itself).
``measure_model_lip_sync`` measures that chain as ``measure_lip_sync`` measures the renderer's.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from danqing.apps.speech import speak
from danqing.apps.visemes import Track, pearson, phone_track
from danqing.synthetic import portrait_reader
from danqing.synthetic.portraits import IDENTITY, Portrait, split_people, values
from danqing.synthetic.portraits_mouth import MOUTH_BOX, mouth_box_mask, mouth_height, mouth_map, talking_frame

__all__ = ["MOUTH_BOX", "MOUTH_CONTROL", "MOUTH_LEVELS", "level_of", "measure_lip_sync", "measure_model_lip_sync",
           "model_levels", "mouth_height", "talking_frame"]

MOUTH_LEVELS = 6       # openness levels a model draws
MOUTH_CONTROL = "danqing-tiny-portraits-mouth"   # the bundled mouth-shape ControlNet
OPEN_MOUTH = "surprised"  # without a ControlNet: the expression the prompt asks for


def _identity(pa: dict, pb: dict) -> float:
    """``portrait_reader.identity_match`` from two pictures' read probabilities (the still
    portrait's read once, not once per frame)."""
    score = 1.0
    for attr in IDENTITY:
        if pa[attr] is not None and pb[attr] is not None:
            score *= sum(pa[attr][k] * pb[attr][k] for k in pa[attr])
    return float(score)


def _outside_box(size: int) -> np.ndarray:
    return np.asarray(mouth_box_mask(size)) == 0


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


def model_levels(studio, request, still_picture: Image.Image, levels: int = MOUTH_LEVELS,
                 control: str | None = MOUTH_CONTROL, weight: float = 1.0) -> list[Image.Image]:
    """The still picture with its mouth drawn by the model at ``levels`` openness levels.

    Args:
        studio: a ``danqing.Studio``.
        request: a ``GenerationRequest`` (model, seed, sampler, steps, CFG as wanted; its size is
            the picture's). With ``control`` its prompt is the still's; without, it asks for the
            open mouth.
        still_picture: the closed-mouthed picture.
        levels: how many levels (>= 2).
        control: the mouth ControlNet: level k inpaints the mouth box at full strength with the
            unit given ``mouth_map(k / (levels - 1))`` at ``weight``. None: level 0 is the still
            and level k inpaints the box at strength k / (levels - 1), the prompt alone asking.
    """
    from danqing.request import ControlUnit

    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    mask = mouth_box_mask(still_picture.width)
    base = request.replace(mask_blur=0, inpainting_fill="original", batch_size=1, batch_count=1)
    if control is None:
        return [still_picture] + [studio.generate(base.replace(denoising_strength=k / (levels - 1)),
                                                  init_image=still_picture, mask_image=mask).images[0]
                                  for k in range(1, levels)]
    out = []
    with tempfile.TemporaryDirectory(prefix="mouth-maps-") as folder:
        for k in range(levels):
            path = Path(folder) / f"level-{k}.png"
            mouth_map(k / (levels - 1), size=still_picture.width).save(path)
            unit = ControlUnit(model=control, image=str(path), weight=weight)
            r = base.replace(denoising_strength=1.0, controlnet=(unit,))
            out.append(studio.generate(r, init_image=still_picture, mask_image=mask).images[0])
    return out


def level_of(opening: float, levels: int = MOUTH_LEVELS) -> int:
    """The level nearest an openness in [0, 1]."""
    return int(round(float(np.clip(opening, 0, 1)) * (levels - 1)))


def measure_model_lip_sync(studio, model: str, sentences: list[tuple[str, str]], fps: int = 25, seed: int = 0,
                           levels: int = MOUTH_LEVELS, steps: int = 20, cfg: float = 7.0,
                           split: str = "heldout", control: str | None = MOUTH_CONTROL, weight: float = 1.0,
                           vae: str | None = None) -> dict:
    """``measure_lip_sync`` with ``model`` drawing: for each (voice, text), a person of ``split``
    is drawn by the model from the caption of a neutral-faced flat portrait (seed ``seed + i``),
    the mouth levels are drawn from it (``model_levels``, ``control`` at ``weight``) and every
    frame is read back. ``vae`` decodes every picture (None: the model's own).

    Returns what ``measure_lip_sync`` returns, plus r_sentence (the mean of each sentence's own
    r: one person each, so the people's different mouths do not count), person (share of frames
    whose every identity attribute the reader reads as the person's), still_person (the same for
    the stills alone), still_self (share of stills whose identity match with themselves is over
    0.5: the ceiling of identity), level_heights (the mean mouth height measured at each level)
    and people.
    """
    from danqing.request import GenerationRequest
    from danqing.synthetic.portraits_captions import portrait_caption

    rng = random.Random(seed)
    who = split_people(split)
    heights, opens, ident, person_ok, still_ok, self_ok, r_sentence, change = [], [], [], [], [], [], [], 0
    by_level: list[list[float]] = [[] for _ in range(levels)]
    for i, (voice, text) in enumerate(sentences):
        p = Portrait(rng.choice(who), "neutral", rng.choice(values("clothing")), "front",
                     rng.choice(values("background")), "flat", rng.randrange(2**31))
        base = GenerationRequest.create(prompt=portrait_caption(p, "en"), model=model, seed=seed + i, steps=steps,
                                        cfg_scale=cfg, sampler="DPM++ 2M", width=64, height=64, vae=vae)
        still_picture = studio.generate(base).images[0]
        talking = base if control else base.replace(prompt=portrait_caption(dataclasses.replace(p, mouth=OPEN_MOUTH), "en"))
        pictures = model_levels(studio, talking, still_picture, levels, control, weight)
        level_h = [mouth_height(f) for f in pictures]
        for k, h in enumerate(level_h):
            by_level[k].append(h)
        still_ok.append(_is_person(portrait_reader.read(still_picture), p))
        s = speak(text, voice)
        track: Track = phone_track(s.phones, s.seconds, fps)
        keep = _outside_box(still_picture.width)
        ref_px, ref_probs = np.asarray(still_picture, np.int16), portrait_reader.read_probs(still_picture)
        self_ok.append(_identity(ref_probs, ref_probs) > 0.5)
        reads = [(portrait_reader.read_probs(f), portrait_reader.read(f)) for f in pictures]
        level_change = [int(np.abs(np.asarray(f, np.int16) - ref_px)[keep].max()) for f in pictures]
        for o in track.open:
            k = level_of(o, levels)
            heights.append(level_h[k])
            opens.append(o)
            ident.append(_identity(reads[k][0], ref_probs) > 0.5)
            person_ok.append(_is_person(reads[k][1], p))
            change = max(change, level_change[k])
        r_sentence.append(pearson([level_h[level_of(o, levels)] for o in track.open], track.open))
    opens_arr = np.array(opens)
    shuffled = np.random.default_rng(seed).permutation(opens_arr)
    return {"r": pearson(heights, opens_arr), "r_shuffled": pearson(heights, shuffled),
            "identity": float(np.mean(ident)), "person": float(np.mean(person_ok)),
            "r_sentence": float(np.mean(r_sentence)), "still_person": float(np.mean(still_ok)),
            "still_self": float(np.mean(self_ok)), "outside_change": change, "frames": len(opens),
            "level_heights": [float(np.mean(h)) for h in by_level], "people": len(sentences)}


def world_clip(studio, model: str, p: Portrait, voice: str, text: str, fps: int = 25, seed: int = 0,
               control: str | None = MOUTH_CONTROL, weight: float = 1.0,
               vae: str | None = None) -> tuple[list[Image.Image], list[Image.Image]]:
    """One sentence said by a portrait-world person, as the renderer draws it and as ``model``
    draws it (``measure_model_lip_sync``'s chain): (renderer frames, model frames), 64² each."""
    from danqing.request import GenerationRequest
    from danqing.synthetic.portraits_captions import portrait_caption

    base = GenerationRequest.create(prompt=portrait_caption(p, "en"), model=model, seed=seed, steps=20, cfg_scale=7.0,
                                    sampler="DPM++ 2M", width=64, height=64, vae=vae)
    still_picture = studio.generate(base).images[0]
    talking = base if control else base.replace(prompt=portrait_caption(dataclasses.replace(p, mouth=OPEN_MOUTH), "en"))
    pictures = model_levels(studio, talking, still_picture, MOUTH_LEVELS, control, weight)
    s = speak(text, voice)
    track = phone_track(s.phones, s.seconds, fps)
    return ([talking_frame(p, o, w) for o, w in zip(track.open, track.width)],
            [pictures[level_of(o)] for o in track.open])


def _is_person(read: dict, p: Portrait) -> bool:
    """Whether every identity attribute the reader reads is the person's."""
    return all(read[a] is None or read[a] == getattr(p.person, a) for a in IDENTITY)
