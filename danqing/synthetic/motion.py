"""The shapes world in motion: one object crossing the picture in a straight line, for a motion
module to learn (``danqing train motion``) and the trajectory scorer to judge
(``synthetic.trajectory``).

A clip is one object of the still world (colour, shape, size) over a still background, moving
right, left, up or down by about half the picture over its frames. Its captions are the still
world's object phrase and a motion phrase: "a red circle moving to the right", "红色圆形向右移动".
For every (colour, shape) pair one direction is held out (a fixed choice per pair), so the
held-out clips are colour-shape-motion combinations the module never saw; the still world's
held-out (colour, shape) pairs stay out of training too.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, replace

from danqing.synthetic.captions import _article, _background, _obj_en, _obj_zh
from danqing.synthetic.scenes import Obj, Scene, _pairs, vocab

DIRECTIONS = ("right", "left", "up", "down")
STEP = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}  # picture axes: y grows downwards
PHRASES = {
    "en": {"right": ("moving to the right", "moves to the right", "sliding right", "moving right"),
           "left": ("moving to the left", "moves to the left", "sliding left", "moving left"),
           "up": ("moving up", "moves upwards", "sliding up", "rising"),
           "down": ("moving down", "moves downwards", "sliding down", "falling")},
    "zh": {"right": ("向右移动", "向右滑动", "往右移动"), "left": ("向左移动", "向左滑动", "往左移动"),
           "up": ("向上移动", "向上滑动", "往上移动"), "down": ("向下移动", "向下滑动", "往下移动")},
}
KINDS = ("line", "arc", "grow", "shrink", "recolour")  # how the object changes over the clip
CHANGES = KINDS[2:]  # the kinds in which the object stays in place
ARC = 0.16      # how far an arc bulges from the straight line, as a share of the picture
FRAMES = 16     # frames of a training clip (the motion module's window)
TRAVEL = 0.48   # mean distance an object travels over a clip, as a share of the picture's side


@dataclass(frozen=True)
class MotionClip:
    """One object moving in a straight line: ``start`` and ``end`` centres in 0..1 of the picture."""

    colour: str
    shape: str
    size: str
    direction: str
    start: tuple[float, float]
    end: tuple[float, float]
    background: str = "white"
    background_2: str = "light grey"
    style: str = "plain"
    seed: int = 0
    frames: int = FRAMES
    kind: str = "line"          # one of KINDS
    colour_2: str | None = None  # "recolour": the colour it turns into (from the middle frame on)

    def scene_at(self, i: int) -> Scene:
        """The still scene of frame ``i``: the object at its place along its path (a line, or an
        arc bulging by ``ARC`` of the picture: up for a sideways move, right for an upward or
        downward one), at its scale (growing 0.6 -> 1.4 of its size, shrinking the other way),
        in its colour (a recolouring object turns at the middle frame); the same background in
        every frame."""
        f = i / max(self.frames - 1, 1)
        x = self.start[0] + f * (self.end[0] - self.start[0])
        y = self.start[1] + f * (self.end[1] - self.start[1])
        if self.kind == "arc":
            bulge = ARC * math.sin(math.pi * f)
            x, y = (x, y - bulge) if self.start[1] == self.end[1] else (x + bulge, y)
        scale = {"grow": 0.6 + 0.8 * f, "shrink": 1.4 - 0.8 * f}.get(self.kind, 1.0)
        colour = self.colour_2 if self.kind == "recolour" and 2 * i >= self.frames else self.colour
        return Scene((Obj(self.shape, colour, self.size, round(x, 4), round(y, 4), round(scale, 4)),),
                     self.background, self.background_2, self.style, seed=self.seed)

    def scenes(self) -> list[Scene]:
        return [self.scene_at(i) for i in range(self.frames)]


def held_out_change(colour: str, shape: str) -> str:
    """The change (arc, grow, shrink, recolour) no training clip of this (colour, shape) makes."""
    return KINDS[1:][zlib.crc32(f"change:{colour}:{shape}".encode()) % (len(KINDS) - 1)]


def kind_clip(rng: random.Random, colour: str, shape: str, kind: str, frames: int = FRAMES,
              direction: str | None = None) -> MotionClip:
    """A clip of ``kind``: an arc along ``direction`` (random when None) as a line clip's path
    bulged; a growing, shrinking or recolouring object standing still near the middle (a
    recolouring one turns into another of the still world's colours)."""
    from danqing.synthetic.scenes import colours

    if kind in ("line", "arc"):
        clip = _clip(rng, colour, shape, direction or rng.choice(DIRECTIONS), frames)
        return replace(clip, kind=kind)
    base = _clip(rng, colour, shape, "right", frames)
    at = (round(rng.uniform(0.35, 0.65), 4), round(rng.uniform(0.35, 0.65), 4))
    other = rng.choice([c for c in colours() if c != colour]) if kind == "recolour" else None
    return replace(base, direction="none", start=at, end=at, kind=kind, colour_2=other, size="large")


def heldout_kind_clips(n: int, kind: str, seed: int = 0, frames: int = FRAMES) -> list[MotionClip]:
    """``n`` clips of ``kind`` (not "line": ``heldout_clips``), each a training (colour, shape)
    pair whose held-out change is ``kind`` (so no training clip makes that combination)."""
    rng = random.Random(f"motion-eval-{kind}:{seed}")
    pairs, _ = _pairs()
    held = [(c, s) for c, s in pairs if held_out_change(c, s) == kind]
    return [kind_clip(rng, *rng.choice(held), kind, frames) for _ in range(n)]


def held_out_direction(colour: str, shape: str) -> str:
    """The direction no training clip of this (colour, shape) moves in: a fixed choice per pair."""
    return DIRECTIONS[zlib.crc32(f"{colour}:{shape}".encode()) % len(DIRECTIONS)]


def _clip(rng: random.Random, colour: str, shape: str, direction: str, frames: int) -> MotionClip:
    v = vocab()
    dx, dy = STEP[direction]
    travel = TRAVEL + rng.uniform(-0.06, 0.06)
    a = 0.5 - travel / 2 + rng.uniform(-0.04, 0.04)   # along the motion, from a to a + travel
    c = rng.uniform(0.35, 0.65)                        # across it
    if dx:
        start, end = ((a, c), (a + travel, c)) if dx > 0 else ((1 - a, c), (1 - a - travel, c))
    else:
        start, end = ((c, a), (c, a + travel)) if dy > 0 else ((c, 1 - a), (c, 1 - a - travel))
    bgs = list(v["backgrounds"])
    bg = rng.choice(bgs)
    bg2 = rng.choice([b for b in bgs if b != bg])
    style = rng.choices(list(v["background_styles"]), weights=[0.4, 0.15, 0.15, 0.15, 0.15])[0]
    size = rng.choice(["small", "large"])
    return MotionClip(colour, shape, size, direction, tuple(round(t, 4) for t in start),
                      tuple(round(t, 4) for t in end), bg, bg2, style, rng.randrange(2**31), frames)


def training_clips(n: int, seed: int = 0, frames: int = FRAMES, directions=DIRECTIONS,
                   kinds=("line",)) -> list[MotionClip]:
    """``n`` training clips: the still world's training (colour, shape) pairs, each in its three
    directions that are not held out (of ``directions``) as straight lines; with more ``kinds``,
    a share of clips of each other kind too, but each pair's held-out change (``held_out_change``)."""
    rng = random.Random(f"motion-train:{seed}")
    pairs, _ = _pairs()
    combos = [(c, s, d) for c, s in pairs for d in directions if d != held_out_direction(c, s)]
    if tuple(kinds) == ("line",):  # the straight-line world as it always was
        return [_clip(rng, *rng.choice(combos), frames) for _ in range(n)]
    out = []
    for _ in range(n):
        kind = rng.choice(list(kinds))
        if kind == "line":
            out.append(_clip(rng, *rng.choice(combos), frames))
        else:
            c, s = rng.choice([p for p in pairs if held_out_change(*p) != kind])
            out.append(kind_clip(rng, c, s, kind, frames))
    return out


OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}


def mirrored(clip: MotionClip) -> MotionClip:
    """``clip`` going the other way: the same object, background and seed, its path mirrored
    across the picture's middle along the motion's axis (the twin of a contrast pair)."""
    horizontal = STEP[clip.direction][0] != 0

    def flip(p: tuple[float, float]) -> tuple[float, float]:
        return (round(1 - p[0], 4), p[1]) if horizontal else (p[0], round(1 - p[1], 4))

    return replace(clip, direction=OPPOSITE[clip.direction], start=flip(clip.start), end=flip(clip.end))


def training_pairs(n: int, seed: int = 0, frames: int = FRAMES, directions=DIRECTIONS) -> list[MotionClip]:
    """``2 * (n // 2)`` training clips in contrast pairs: clip ``2k + 1`` is clip ``2k``
    mirrored (``mirrored``), so the two differ only in which way the object goes. Only the
    (colour, shape, direction) combinations whose opposite is a training combination too are
    drawn, so no twin is a held-out combination."""
    rng = random.Random(f"motion-pairs:{seed}")
    pairs, _ = _pairs()
    combos = [(c, s, d) for c, s in pairs for d in directions
              if held_out_direction(c, s) not in (d, OPPOSITE[d])]
    out = []
    for _ in range(n // 2):
        clip = _clip(rng, *rng.choice(combos), frames)
        out += [clip, mirrored(clip)]
    return out


def heldout_clips(n: int = 50, seed: int = 0, frames: int = FRAMES, directions=DIRECTIONS) -> list[MotionClip]:
    """``n`` evaluation clips: each a training (colour, shape) pair in its held-out direction, so
    the colour-shape-motion combination is one no training clip has; the directions in turn."""
    rng = random.Random(f"motion-eval:{seed}")
    pairs, _ = _pairs()
    by_direction = {d: [(c, s) for c, s in pairs if held_out_direction(c, s) == d] for d in DIRECTIONS}
    out = []
    for i in range(n):
        d = directions[i % len(directions)]
        c, s = rng.choice(by_direction[d])
        out.append(replace(_clip(rng, c, s, d, frames), style="plain"))
    return out


CHANGE_PHRASES = {
    "en": {"arc": ("moving {d} in an arc", "arcing {d}", "moving {d} along an arc"),
           "grow": ("growing", "getting bigger", "growing larger"),
           "shrink": ("shrinking", "getting smaller", "shrinking away"),
           "recolour": ("turning {c}", "changing colour to {c}", "becoming {c}")},
    "zh": {"arc": ("沿弧线向{d}移动", "划着弧线向{d}移动"), "grow": ("变大", "逐渐变大", "慢慢变大"),
           "shrink": ("变小", "逐渐变小", "慢慢变小"), "recolour": ("变成{c}", "渐渐变成{c}", "变为{c}")},
}
ARC_WORDS = {"en": {"right": "to the right", "left": "to the left", "up": "upwards", "down": "downwards"},
             "zh": {"right": "右", "left": "左", "up": "上", "down": "下"}}


def _phrases(clip: MotionClip, lang: str) -> tuple[str, ...]:
    if clip.kind == "line":
        return PHRASES[lang][clip.direction]
    from danqing.synthetic.scenes import colour_info

    d = ARC_WORDS[lang].get(clip.direction, "")
    c = (clip.colour_2 if lang == "en" else colour_info(clip.colour_2)["zh"]) if clip.colour_2 else ""
    return tuple(p.format(d=d, c=c) for p in CHANGE_PHRASES[lang][clip.kind])


def motion_caption(clip: MotionClip, lang: str = "en", rng: random.Random | None = None) -> str:
    """A caption of ``clip`` in ``lang``; canonical ("a red circle moving to the right",
    "一个红色的圆形向右移动", "a red circle growing", "a red circle turning blue") when ``rng`` is None, else a random phrasing, sometimes with its
    background."""
    obj = Obj(clip.shape, clip.colour, clip.size)
    phrases = _phrases(clip, lang)
    phrase = phrases[0] if rng is None else rng.choice(phrases)
    if lang == "en":
        text = f"{_obj_en(obj, rng)} {phrase}"
    else:
        text = ("一个" if rng is None or rng.random() < 0.6 else "") + _obj_zh(obj, rng, subject=True) + phrase
    if rng is not None and rng.random() < 0.5:
        text += _background(clip.scene_at(0), lang, rng)
    return text


# Where a straight clip's object starts and ends, in the still world's position words (its
# positions sit at 0.25 and 0.75 of the picture; a clip travels about half the picture).
TRAVEL_POSITIONS = {"right": ("left", "right"), "left": ("right", "left"), "up": ("bottom", "top"),
                    "down": ("top", "bottom")}


# The size a travel keyframe names when the prompt names none: the still world's default for a
# lone object, as the prompt expander fills it in (``synthetic.recaption.scene_of_spec``).
TRAVEL_SIZE = "large"


def _sized(subject: str, lang: str, size: str | None) -> str:
    """``subject`` ("a red circle", "一个红色的圆形") with ``size`` named, unless it names a size
    already or ``size`` is None."""
    if size is None:
        return subject
    words = vocab()["sizes"]
    if lang == "zh":
        if any(w["zh"] in subject for w in words.values()):
            return subject
        head = "一个" if subject.startswith("一个") else ""
        return f"{head}{words[size]['zh']}{subject[len(head):]}"
    tokens = subject.split()
    if any(t in w["en"] for w in words.values() for t in tokens):
        return subject
    if tokens and tokens[0].lower() in ("a", "an", "the"):
        tokens = tokens[1:]
    word = words[size]["en"][-1]
    return f"{_article(word)} {word} {' '.join(tokens)}"


def travel_prompt(prompt: str, frames: int = FRAMES, size: str | None = TRAVEL_SIZE) -> str | None:
    """A straight-motion prompt of the moving world rewritten as prompt travel
    (``conditioning.travel``), by rule: the motion phrase out, keyframe 0 the object at its start
    in the still world's position words, the last frame at its end; the frames between
    interpolate. An object whose size the prompt leaves unsaid gets ``size`` (None: left unsaid),
    as the prompt expander fills in what a prompt leaves unsaid. "a red circle moving to the
    right" becomes "0: a large red circle on the left" / "15: a large red circle on the right";
    "一个红色的圆形向右移动" becomes "0: 一个大红色的圆形在左边" / "15: 一个大红色的圆形在右边".
    What follows the phrase (a background) stays in both. None when the prompt names no straight
    motion."""
    v = vocab()
    found = None
    for lang, phrases in PHRASES.items():
        for direction, words in phrases.items():
            for phrase in words:
                at = prompt.find(phrase)
                if at > 0 and (found is None or len(phrase) > len(found[2])):
                    found = (lang, direction, phrase, at)
    if found is None:
        return None
    lang, direction, phrase, at = found
    subject, rest = _sized(prompt[:at].strip(), lang, size), prompt[at + len(phrase):]
    lines = []
    for frame, place in zip((0, frames - 1), TRAVEL_POSITIONS[direction]):
        words = v["positions"][place]
        lines.append(f"{frame}: {subject} {words['en'][0]}{rest}" if lang == "en" else f"{frame}: {subject}{words['zh']}{rest}")
    return "\n".join(lines)


__all__ = ["ARC", "CHANGES", "KINDS", "held_out_change", "heldout_kind_clips", "kind_clip", "DIRECTIONS", "FRAMES", "OPPOSITE", "MotionClip", "heldout_clips", "held_out_direction", "mirrored",
           "motion_caption", "training_clips", "training_pairs", "travel_prompt", "TRAVEL_SIZE"]
