"""The portrait world: procedural cartoon head-and-shoulders portraits of *people*, as data and
as pictures.

A :class:`Person` is a fixed combination of the identity attributes (head shape, skin tone, hair
colour, hair style, eye colour, glasses); a :class:`Portrait` is a person with the attributes of
one picture (expression, clothing colour, head pose, background, rendering style) and a seed.
Every value, its English and Chinese words, its colour and its geometry (face sizes, pose shifts)
live in ``data/portraits.json``; the layout every portrait shares (where eyes, mouth, neck sit) is
the constants below, which the reader (``portrait_reader.py``) measures at.

Splits hold out *people*: a fixed share of the identity combinations (``heldout_share``, drawn
once by a seeded generator) never appears in training, in any style, while every pair of
identity values they hold is still seen in training on other people (a test checks it). A new
person is then a new combination of known features, as a new face is to a face model.
``held_out_people()`` names a few of them: the ones a person LoRA, the portrait studio and the
comic learn from a few pictures. (The world's first split held out attribute *pairs*, e.g. dark
skin with glasses for everyone; docs/models.md has what a model trained on it could not draw.)

Rendering styles: ``flat`` (colour fills), ``ink`` (colour fills with thick black outlines) and
``pencil`` (grey shading and grey outlines on white paper). Pencil shows no colour, so in a
pencil picture the colour attributes (skin, hair colour, eyes, clothing, background) are neither
captioned nor read back; head shape, hair style, glasses, expression and pose are.

Pictures are drawn with Pillow at 4x, as a label map and a colour image, and downsampled
(box filter) for anti-aliasing; ink and pencil outlines are where the label map changes.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from dataclasses import asdict, dataclass, field
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SPLITS = ("train", "heldout")
SUPERSAMPLE = 4
CENTRE = (0.5, 0.42)          # head centre, fractions of the picture
EYE_Y, EYE_DX = 0.45, 0.085   # eye row and half distance between the eyes
SCLERA = (0.058, 0.048)       # eye white half-axes
IRIS, PUPIL = 0.035, 0.012    # radii
GLASSES_R, GLASSES_W = 0.085, 0.026
MOUTH_Y = 0.585
CAP_CY, FOREHEAD = 0.40, 0.34  # hair cap: an ellipse around the head, cut at the forehead line
NECK = (0.075, 0.55, 0.84)     # half width, top, bottom
PAPER, PENCIL_LINE, PENCIL_DARK = 248, 45, 20   # pencil: paper, line and dark-feature greys
INK = (18, 18, 18)
DARK = (15, 15, 15)            # glasses frames and pupils in every style
MOUTH_RGB = (125, 5, 45)

# labels of the label map (outlines are drawn where the label changes)
BG, CLOTHES, HAIR_BACK, NECK_L, FACE, HAIR, SCLERA_L, IRIS_L, PUPIL_L, GLASSES_L, MOUTH_L = range(11)
# small features that carry no outline of their own (their label counts as the one named here)
OUTLINE_AS = {IRIS_L: SCLERA_L, PUPIL_L: SCLERA_L, GLASSES_L: FACE, MOUTH_L: FACE, HAIR_BACK: HAIR}


@functools.lru_cache(maxsize=1)
def vocab() -> dict:
    """The portrait vocabulary: every attribute's values with words, colours and geometry."""
    text = resources.files("danqing").joinpath("data/portraits.json").read_text(encoding="utf-8")
    return json.loads(text)


ATTRIBUTES = ("head", "skin", "hair_colour", "hair_style", "eyes", "glasses", "mouth", "clothing", "pose",
              "background", "style")
IDENTITY = ("head", "skin", "hair_colour", "hair_style", "eyes", "glasses")
COLOUR_ATTRIBUTES = ("skin", "hair_colour", "eyes", "clothing", "background")


def values(attribute: str) -> list[str]:
    """The values of an attribute, in table order."""
    return list(vocab()[attribute])


def shows_colour(style: str) -> bool:
    return bool(vocab()["style"][style]["colour"])


def visible(style: str) -> tuple[str, ...]:
    """The attributes a picture in ``style`` shows (pencil: no colour attribute)."""
    return tuple(a for a in ATTRIBUTES if shows_colour(style) or a not in COLOUR_ATTRIBUTES)


@dataclass(frozen=True)
class Person:
    """An identity: the attributes that stay the same from picture to picture."""

    head: str
    skin: str
    hair_colour: str
    hair_style: str
    eyes: str
    glasses: str
    name: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(getattr(self, a) for a in IDENTITY)

    @property
    def held_out(self) -> bool:
        """Whether this identity is one training never shows."""
        return self.key in held_out_keys()


@dataclass(frozen=True)
class Portrait:
    """One picture of a person: expression, clothing colour, pose, background, style, seed."""

    person: Person
    mouth: str = "smiling"
    clothing: str = "blue"
    pose: str = "front"
    background: str = "sky"
    style: str = "flat"
    seed: int = 0

    def attributes(self) -> dict[str, str]:
        """Every attribute's value (identity ones included)."""
        d = {a: getattr(self.person, a) for a in IDENTITY}
        d.update(mouth=self.mouth, clothing=self.clothing, pose=self.pose, background=self.background, style=self.style)
        return d

    def visible_attributes(self) -> dict[str, str]:
        """The attributes this picture shows (see :func:`visible`)."""
        d = self.attributes()
        return {a: d[a] for a in visible(self.style)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Portrait":
        d = dict(d)
        d["person"] = Person(**d["person"])
        return cls(**d)


@functools.lru_cache(maxsize=1)
def people() -> tuple[Person, ...]:
    """Every person of the world, in table order (the product of the identity values)."""
    return tuple(Person(*combo) for combo in itertools.product(*(values(a) for a in IDENTITY)))


@functools.lru_cache(maxsize=1)
def held_out_keys() -> frozenset[tuple[str, ...]]:
    """The identity combinations training never shows: ``heldout_share`` of them, drawn once."""
    keys = [p.key for p in people()]
    return frozenset(random.Random("held-out-identities").sample(keys, round(vocab()["heldout_share"] * len(keys))))


@functools.lru_cache(maxsize=1)
def held_out_people() -> tuple[Person, ...]:
    """Named people never seen in training, in a fixed order (skin tones take turns)."""
    rng = random.Random("held-out-people")
    pools = {}
    for p in rng.sample(list(split_people("heldout")), len(split_people("heldout"))):
        pools.setdefault(p.skin, []).append(p)
    order = [pools[s] for s in values("skin") if s in pools]
    names = vocab()["held_out_names"]
    chosen = [order[i % len(order)][i // len(order)] for i in range(len(names))]
    return tuple(Person(*p.key, name=n) for p, n in zip(chosen, names))


def person(name: str) -> Person:
    """A held-out person by name ("Ada", ...)."""
    for p in held_out_people():
        if p.name.lower() == name.lower():
            return p
    raise ValueError(f"no held-out person {name!r}; known: {', '.join(p.name for p in held_out_people())}")


@functools.lru_cache(maxsize=2)
def split_people(split: str) -> tuple[Person, ...]:
    """The people of a split: "train" (every identity training may show) or "heldout" (the rest)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return tuple(p for p in people() if p.held_out == (split == "heldout"))


def sample_portrait(rng: random.Random, split: str = "train", style: str | None = None,
                    who: Person | None = None) -> Portrait:
    """A random portrait of a person of ``split`` (or of ``who``), in a random style (or ``style``).

    A held-out person in a style that hides colour (pencil) shows only head, hair style and
    glasses, a combination training has shown on other people.
    """
    if style is None:
        style = rng.choices(values("style"), weights=[vocab()["style"][k]["weight"] for k in values("style")])[0]
    if who is None:
        who = rng.choice(split_people(split))
    return Portrait(who, rng.choice(values("mouth")), rng.choice(values("clothing")), rng.choice(values("pose")),
                    rng.choice(values("background")), style, seed=rng.randrange(2**31))


def portraits(seed: int, n: int, split: str = "train") -> list[Portrait]:
    """``n`` portraits of a split, deterministic from ``seed``."""
    rng = random.Random(f"portraits:{split}:{seed}")
    return [sample_portrait(rng, split) for _ in range(n)]


def eval_portraits(n: int = 200, seed: int = 0) -> list[Portrait]:
    """The held-out evaluation set: ``n`` portraits of held-out combinations, styles taking turns."""
    rng = random.Random(f"portraits-eval:{seed}")
    styles = values("style")
    return [sample_portrait(rng, "heldout", styles[i % len(styles)]) for i in range(n)]


def pictures_of(who: Person, n: int, seed: int = 0, styles: tuple[str, ...] | None = None) -> list[Portrait]:
    """``n`` portraits of one person in varied clothes, expressions, poses, backgrounds and styles."""
    rng = random.Random(f"person:{'-'.join(who.key)}:{seed}")
    return [sample_portrait(rng, style=rng.choice(styles or values("style")), who=who) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def head_box(head: str) -> tuple[float, float, float]:
    """(rx, ry, corner radius) of a head shape, fractions of the picture."""
    h = vocab()["head"][head]
    return h["rx"], h["ry"], h["corner"]


def cap_top(head: str, dx: float) -> float:
    """y of the top of the hair cap at horizontal offset ``dx`` from the centre."""
    rx, ry, _ = head_box(head)
    cx, cy = rx + 0.035, ry + 0.03
    return CAP_CY - cy * float(np.sqrt(max(0.0, 1 - (dx / cx) ** 2)))


def _rgb(attribute: str, value: str) -> tuple[int, int, int]:
    return tuple(vocab()[attribute][value]["rgb"])


class _Canvas:
    """A colour image and a label map drawn together at ``s`` pixels (coordinates in 0..1)."""

    def __init__(self, s: int, bg):
        self.s = s
        self.img, self.lab = Image.new("RGB", (s, s), bg), Image.new("L", (s, s), BG)
        self.d, self.dl = ImageDraw.Draw(self.img), ImageDraw.Draw(self.lab)

    def box(self, x0, y0, x1, y1):
        return [x0 * self.s, y0 * self.s, x1 * self.s, y1 * self.s]

    def ellipse(self, cx, cy, rx, ry, fill, label):
        b = self.box(cx - rx, cy - ry, cx + rx, cy + ry)
        self.d.ellipse(b, fill=fill)
        self.dl.ellipse(b, fill=label)

    def rounded(self, cx, cy, rx, ry, corner, fill, label):
        if corner >= min(rx, ry):
            return self.ellipse(cx, cy, rx, ry, fill, label)
        b, r = self.box(cx - rx, cy - ry, cx + rx, cy + ry), corner * self.s
        self.d.rounded_rectangle(b, r, fill=fill)
        self.dl.rounded_rectangle(b, r, fill=label)

    def polygon(self, pts, fill, label):
        pts = [(x * self.s, y * self.s) for x, y in pts]
        self.d.polygon(pts, fill=fill)
        self.dl.polygon(pts, fill=label)

    def arc(self, box, start, end, width, fill, label):
        self.d.arc(self.box(*box), start, end, fill=fill, width=round(width * self.s))
        self.dl.arc(self.box(*box), start, end, fill=label, width=round(width * self.s))

    def line(self, pts, width, fill, label):
        pts = [(x * self.s, y * self.s) for x, y in pts]
        self.d.line(pts, fill=fill, width=round(width * self.s))
        self.dl.line(pts, fill=label, width=round(width * self.s))


def _hair(c: _Canvas, p: Portrait, hair) -> None:
    """The hair cap (cut at the forehead) and the bun or spikes above it."""
    rx, ry, _ = head_box(p.person.head)
    cx = CENTRE[0]
    style = p.person.hair_style
    if style == "bun":
        c.ellipse(cx, cap_top(p.person.head, 0) - 0.005, 0.075, 0.07, hair, HAIR)
    elif style == "spiky":
        for dx in np.linspace(-0.2, 0.2, 7):
            tip = (cx + 1.1 * dx, cap_top(p.person.head, dx) - 0.1)
            lo, hi = dx - 0.06, dx + 0.06
            c.polygon([(cx + lo, cap_top(p.person.head, lo) + 0.03), tip, (cx + hi, cap_top(p.person.head, hi) + 0.03)],
                      hair, HAIR)
    cap = Image.new("L", (c.s, c.s), 0)
    ImageDraw.Draw(cap).ellipse(c.box(cx - rx - 0.035, CAP_CY - ry - 0.03, cx + rx + 0.035, CAP_CY + ry + 0.03), fill=255)
    ImageDraw.Draw(cap).rectangle(c.box(0, FOREHEAD, 1, 1), fill=0)
    c.img.paste(Image.new("RGB", (c.s, c.s), hair), (0, 0), cap)
    c.lab.paste(HAIR, (0, 0, c.s, c.s), cap)


def _face(c: _Canvas, p: Portrait) -> None:
    """Eyes, glasses and mouth, shifted sideways by the pose."""
    ox = CENTRE[0] + vocab()["pose"][p.pose]["dx"]
    iris = _rgb("eyes", p.person.eyes)
    for side in (-1, 1):
        ex = ox + side * EYE_DX
        c.ellipse(ex, EYE_Y, *SCLERA, (252, 252, 252), SCLERA_L)
        c.ellipse(ex, EYE_Y, IRIS, IRIS, iris, IRIS_L)
        c.ellipse(ex, EYE_Y, PUPIL, PUPIL, DARK, PUPIL_L)
        if p.person.glasses == "yes":
            r0, r1 = GLASSES_R - GLASSES_W / 2, GLASSES_R + GLASSES_W / 2
            ring = Image.new("L", (c.s, c.s), 0)
            rd = ImageDraw.Draw(ring)
            rd.ellipse(c.box(ex - r1, EYE_Y - r1, ex + r1, EYE_Y + r1), fill=255)
            rd.ellipse(c.box(ex - r0, EYE_Y - r0, ex + r0, EYE_Y + r0), fill=0)
            c.img.paste(Image.new("RGB", (c.s, c.s), DARK), (0, 0), ring)
            c.lab.paste(GLASSES_L, (0, 0, c.s, c.s), ring)
    my = MOUTH_Y
    w = 0.036
    if p.mouth == "smiling":
        c.arc((ox - 0.07, my - 0.05, ox + 0.07, my + 0.04), 0, 180, w, MOUTH_RGB, MOUTH_L)
    elif p.mouth == "sad":
        c.arc((ox - 0.07, my - 0.005, ox + 0.07, my + 0.095), 180, 360, w, MOUTH_RGB, MOUTH_L)
    elif p.mouth == "neutral":
        c.line([(ox - 0.065, my + 0.005), (ox + 0.065, my + 0.005)], w, MOUTH_RGB, MOUTH_L)
    elif p.mouth == "surprised":
        c.ellipse(ox, my + 0.005, 0.035, 0.045, MOUTH_RGB, MOUTH_L)
    else:
        raise ValueError(f"unknown expression {p.mouth!r}; allowed: {', '.join(values('mouth'))}")


def draw_layers(p: Portrait, s: int) -> tuple[Image.Image, Image.Image]:
    """(flat colour image, label map) of a portrait at ``s`` x ``s`` pixels."""
    v = vocab()
    for a, val in p.attributes().items():
        if val not in v[a]:
            raise ValueError(f"unknown {a} {val!r}; allowed: {', '.join(v[a])}")
    c = _Canvas(s, _rgb("background", p.background))
    cx, cy = CENTRE
    rx, ry, corner = head_box(p.person.head)
    hair, skin = _rgb("hair_colour", p.person.hair_colour), _rgb("skin", p.person.skin)
    if p.person.hair_style == "long":
        c.rounded(cx, 0.52, rx + 0.05, 0.32, 0.1, hair, HAIR_BACK)
    hw, top, bottom = NECK
    c.rounded(cx, (top + bottom) / 2, hw, (bottom - top) / 2, 0.0, skin, NECK_L)
    c.ellipse(cx, 1.14, 0.44, 0.36, _rgb("clothing", p.clothing), CLOTHES)
    c.rounded(cx, cy, rx, ry, corner, skin, FACE)
    _hair(c, p, hair)
    _face(c, p)
    return c.img, c.lab


def _outline(lab: np.ndarray, width: int) -> np.ndarray:
    """Where the (outline) label changes, thickened to ``width`` pixels: (s, s) bool."""
    m = lab.copy()
    for k, to in OUTLINE_AS.items():
        m[m == k] = to
    edge = np.zeros(m.shape, bool)
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    edge[1:, :] |= m[1:, :] != m[:-1, :]
    img = Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(width | 1))
    return np.asarray(img) > 0


def render_portrait(p: Portrait, size: int = 64) -> Image.Image:
    """The portrait as an RGB image of ``size`` x ``size`` (64 is danqing-tiny's size)."""
    return _paint(p, *draw_layers(p, size * SUPERSAMPLE), size)


def render_with_mask(p: Portrait, size: int = 64) -> tuple[Image.Image, Image.Image]:
    """``render_portrait`` and ``person_mask`` of ``p`` from one drawing of its layers."""
    img, lab = draw_layers(p, size * SUPERSAMPLE)
    return _paint(p, img, lab, size), _inside(lab, size)


def _paint(p: Portrait, img: Image.Image, lab: Image.Image, size: int) -> Image.Image:
    """The drawn layers (at ``size * SUPERSAMPLE``) in the portrait's style, at ``size``."""
    s = size * SUPERSAMPLE
    arr = np.asarray(img, np.float32)
    labels = np.asarray(lab)
    if p.style == "ink":
        arr[_outline(labels, round(0.022 * s))] = INK
    elif p.style == "pencil":
        lum = arr @ np.array([0.299, 0.587, 0.114], np.float32)
        grey = 40 + 0.65 * lum                                  # shading: lighter than the colours
        dark = np.isin(labels, (PUPIL_L, GLASSES_L, MOUTH_L))
        grey[dark] = PENCIL_DARK
        grey[labels == BG] = PAPER
        grey[_outline(labels, round(0.014 * s))] = PENCIL_LINE
        rng = np.random.default_rng(p.seed)
        grain = np.asarray(Image.fromarray(rng.normal(0, 1, (s // 4, s // 4)).astype(np.float32)).resize((s, s)))
        arr = np.repeat((grey + 4 * grain)[..., None], 3, axis=2)
    elif p.style != "flat":
        raise ValueError(f"unknown style {p.style!r}; allowed: {', '.join(values('style'))}")
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    return out.resize((size, size), Image.BOX)


def person_mask(p: Portrait, size: int = 64) -> Image.Image:
    """Where the person's looks are ("L", 255 on the head, hair and neck; 0 on the background and
    the clothes): the region a person LoRA's masked loss weighs more."""
    return _inside(draw_layers(p, size * SUPERSAMPLE)[1], size)


def _inside(lab: Image.Image, size: int) -> Image.Image:
    """``person_mask`` from the drawn label map."""
    inside = ~np.isin(np.asarray(lab), (BG, CLOTHES))
    return Image.fromarray((inside * 255).astype(np.uint8), "L").resize((size, size), Image.BOX)
