"""The portrait reader: every attribute of a portrait read back from a picture, an identity
match between two pictures, and a style score -- classical vision (OpenCV), because the
portrait world is drawn with known geometry and palettes (``danqing.synthetic.portraits``).

How a picture is read (at a 128-pixel working size, in CIELAB after a light median filter):
1. Colours are medians of regions every portrait has in the same place: skin on the neck, hair
   on the crown, clothing on the chest, background in the top corners, iris in a ring around
   each pupil. Each takes the nearest colour of its palette.
2. The pose is where the mouth is: pixels far from the skin colour and darker, in the mouth box;
   their centroid's offset from the middle (the eyes are found from it).
3. Shapes are measured features: the face's width (skin extent) at cheek and at jaw height for the
   head shape; the mouth's aspect and curvature for the expression; how much of three places
   (beside the neck, above the crown, beside the crown) is hair for the hair style; how dark the
   ring where glasses frames sit is; how grey the picture is and how dark the line at the chin is
   for the style. Each feature vector is compared with the mean of each value's vectors over
   rendered ground-truth portraits (the renderer is the reference; :func:`prototypes`).
Every attribute comes with a probability over its values (a softmax of the distances), which
the identity match multiplies: the chance two pictures show the same value, attribute by
attribute. A pencil picture shows no colour: its colour attributes are not read (None) and an
identity match involving one compares the attributes both pictures show.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from danqing.synthetic.evaluate import evaluate_studio, score_files
from danqing.synthetic.portraits import (
    ATTRIBUTES, COLOUR_ATTRIBUTES, EYE_DX, EYE_Y, GLASSES_R, IDENTITY, INK, MOUTH_RGB, PENCIL_DARK, PENCIL_LINE,
    render_portrait, shows_colour, values, visible, vocab,
)
from danqing.synthetic.portraits_captions import parse_portrait_prompt, portrait_caption

WORK = 128
COLOUR_SIGMA = 8.0       # CIELAB units: a colour this far from a palette entry is exp(-0.5) as likely
CLASS_SIGMA = 1.0        # in units of the features' spread
SHAPES = ("head", "hair_style", "glasses", "mouth", "pose", "style")
REGIONS = {              # x0, x1, y0, y1 (fractions of the picture)
    "skin": [(0.46, 0.54, 0.715, 0.755)],
    "hair": [(0.44, 0.56, 0.17, 0.24)],
    "clothing": [(0.38, 0.62, 0.87, 0.97)],
    "background": [(0.0, 0.1, 0.0, 0.1), (0.9, 1.0, 0.0, 0.1)],
    "long": [(0.30, 0.40, 0.70, 0.78), (0.60, 0.70, 0.70, 0.78)],
    "bun": [(0.46, 0.54, 0.045, 0.07)],
    "spiky": [(0.33, 0.375, 0.10, 0.14), (0.625, 0.67, 0.10, 0.14)],
    "mouth": [(0.38, 0.62, 0.565, 0.645)],
    "chin": [(0.46, 0.54, 0.62, 0.84)],
}


def _lab(image: Image.Image) -> np.ndarray:
    """(WORK, WORK, 3) float32 CIELAB (L 0..100) of the picture, median-filtered (noise)."""
    import cv2

    img = image.convert("RGB")
    img = img.resize((WORK, WORK), Image.BICUBIC if img.width < WORK else Image.BOX)
    rgb = cv2.medianBlur(np.asarray(img), 3)
    return cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)


def _pixels(lab: np.ndarray, name: str, mask: np.ndarray | None = None) -> np.ndarray:
    """Pixels (N, 3) of a named region (or the region's part of a bool mask: (N,) bool)."""
    out = []
    for x0, x1, y0, y1 in REGIONS[name]:
        sl = (slice(round(y0 * WORK), round(y1 * WORK)), slice(round(x0 * WORK), round(x1 * WORK)))
        out.append((lab if mask is None else mask)[sl].reshape(-1, *(lab.shape[2:] if mask is None else ())))
    return np.concatenate(out)


def _ring(cx: float, cy: float, r0: float, r1: float) -> np.ndarray:
    yy, xx = (np.mgrid[0:WORK, 0:WORK] + 0.5) / WORK
    d = np.hypot(xx - cx, yy - cy)
    return (d >= r0) & (d <= r1)


def _dist(lab: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return np.sqrt(((lab - colour) ** 2).sum(-1))


@functools.lru_cache(maxsize=8)
def _palette(attribute: str) -> tuple[list[str], np.ndarray]:
    import cv2

    names = values(attribute)
    rgb = np.array([[vocab()[attribute][k]["rgb"] for k in names]], np.float32) / 255
    return names, cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[0]


def _palette_lab(rgb) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.array([[rgb]], np.float32) / 255, cv2.COLOR_RGB2LAB)[0, 0]


def _colour_probs(attribute: str, lab: np.ndarray) -> dict[str, float]:
    names, pal = _palette(attribute)
    d2 = ((pal - lab) ** 2).sum(1) / (2 * COLOUR_SIGMA**2)
    p = np.exp(-(d2 - d2.min()))
    return dict(zip(names, (p / p.sum()).tolist()))


def _run_width(mask: np.ndarray, y0: float, y1: float, inner: float = 0.12) -> float:
    """Half the width (fraction of the picture) of the skin run through a row band, walked outwards
    from ``inner`` either side of the middle (the mouth sits between), across gaps of two columns."""
    col = mask[round(y0 * WORK):round(y1 * WORK)].mean(0) > 0.5
    ends = []
    for start, step in ((round((0.5 - inner) * WORK), -1), (round((0.5 + inner) * WORK), 1)):
        x = start
        while 0 <= x + 3 * step < WORK and col[x + step: x + 4 * step: step].any():
            x += step
        ends.append(x)
    return float(ends[1] - ends[0] + 1) / WORK / 2


def _dip(profile: np.ndarray) -> float:
    """How far the darkest point of a profile lies below the brighter sides around it (a line, not a step)."""
    i = int(np.argmin(profile))
    if i == 0 or i == len(profile) - 1:
        return 0.0
    return float(min(profile[:i].max(), profile[i + 1:].max()) - profile[i])


def features(image: Image.Image) -> dict:
    """The measured colours (CIELAB) and shape features of a portrait picture."""
    import cv2

    lab = _lab(image)
    med = lambda name: np.median(_pixels(lab, name), axis=0)  # noqa: E731
    skin, hair, bg = med("skin"), med("hair"), med("background")
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    # the mouth: far from the skin colour and darker; its centroid gives the pose
    box = np.zeros((WORK, WORK), bool)
    x0, x1, y0, y1 = REGIONS["mouth"][0]
    box[round(y0 * WORK):round(y1 * WORK), round(x0 * WORK):round(x1 * WORK)] = True
    pencil = float(np.percentile(chroma, 90)) < 8
    # mouth-like: at least halfway from the skin colour towards the mouth's, and near that line
    ref = _palette_lab((PENCIL_DARK,) * 3 if pencil else MOUTH_RGB) - skin
    t = ((lab - skin) @ ref) / max(float(ref @ ref), 1.0)
    off = np.sqrt(np.maximum(((lab - skin) ** 2).sum(-1) - t**2 * float(ref @ ref), 0))
    near_line = off < 0.6 * float(np.sqrt(ref @ ref))
    ink = cv2.dilate(((t > 0.45) & ~near_line).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    if pencil:  # greys only: thin pencil lines are opened away, the thicker mouth stays
        mouth = box & (cv2.morphologyEx((t > 0.5).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0)
    else:       # not an ink line nor its blurred edge
        mouth = box & (t > 0.45) & near_line & ~ink
    n, labels, stats, cents = cv2.connectedComponentsWithStats(mouth.astype(np.uint8), connectivity=8)
    if n > 1:  # the largest piece near the middle (a face outline may reach into the box's corners)
        near = [k for k in range(1, n) if abs(cents[k][0] / WORK - 0.5) < 0.08] or list(range(1, n))
        mouth = labels == max(near, key=lambda k: stats[k, cv2.CC_STAT_AREA])
    ys, xs = np.nonzero(mouth)
    if len(xs) >= 4:
        ox = (xs.mean() + 0.5) / WORK - 0.5
        w, h = (xs.max() - xs.min() + 1) / WORK, (ys.max() - ys.min() + 1) / WORK
        lo, hi = np.percentile(xs, 20), np.percentile(xs, 80)
        ends, mid = ys[(xs <= lo) | (xs >= hi)], ys[(xs > lo) & (xs < hi)]
        curve = (mid.mean() - ends.mean()) / WORK if len(mid) and len(ends) else 0.0
        fill = len(xs) / max(1.0, w * h * WORK * WORK)
    else:
        ox, w, h, curve, fill = 0.0, 0.0, 0.0, 0.0, 0.0
    eyes = [(0.5 + ox + s * EYE_DX, EYE_Y) for s in (-1, 1)]
    iris = np.median(np.concatenate([lab[_ring(x, y, 0.014, 0.029)] for x, y in eyes]), axis=0)
    frame = np.median(np.concatenate([lab[_ring(x, y, GLASSES_R - 0.008, GLASSES_R + 0.006)][:, 0] for x, y in eyes]))
    line = _palette_lab((PENCIL_LINE,) * 3 if pencil else INK)
    skin_mask = _dist(lab, skin) < float(np.clip(0.5 * min(_dist(skin, bg), _dist(skin, line)), 3, 14))
    cheek, jaw = _run_width(skin_mask, 0.565, 0.58), _run_width(skin_mask, 0.625, 0.64, 0.08)
    tol = float(np.clip(0.5 * _dist(hair, bg), 4, 18))
    hair_mask = _dist(lab, hair) < tol
    drawn = _dist(lab, bg) > 10          # hair and its outline: whatever is not background
    chin = _pixels(lab, "chin")[:, 0].reshape(-1, round(0.08 * WORK)).mean(1)
    return {
        "colours": {"skin": skin, "hair_colour": hair, "eyes": iris, "clothing": med("clothing"), "background": bg},
        "head": [10 * cheek, 10 * jaw],
        "hair_style": [_pixels(lab, "long", hair_mask).mean()] + [_pixels(lab, k, drawn).mean() for k in ("bun", "spiky")],
        "glasses": [(skin[0] - frame) / max(skin[0], 10.0)],
        "mouth": [10 * w, 10 * h, 10 * curve, fill],
        "pose": [10 * ox],
        "style": [float(np.percentile(chroma, 90)) / 20, _dip(chin) / 20],
    }


@functools.lru_cache(maxsize=1)
def prototypes() -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """Per shape attribute: (values, mean feature vector of each value, the features' spread),
    measured on rendered ground-truth portraits of the training split (all styles), half of
    them blurred and noisy as :func:`danqing.synthetic.render.degrade` makes them."""
    import random

    from danqing.synthetic.portraits import portraits
    from danqing.synthetic.render import degrade

    rng = random.Random(90_001)
    feats = []
    for i, p in enumerate(portraits(90_001, 240)):
        img = render_portrait(p, 64)
        feats.append((p.attributes(), features(degrade(img, rng) if i % 2 else img)))
    out = {}
    for attr in SHAPES:
        names = values(attr)
        for style in (None, *values("style")) if attr != "style" else (None,):
            x = {k: np.array([f[attr] for a, f in feats if a[attr] == k and style in (None, a["style"])], np.float64)
                 for k in names}
            means = np.stack([x[k].mean(0) for k in names])
            floor = 0.05 + 0.1 * np.concatenate(list(x.values())).std(0)
            spread = np.stack([x[k].std(0) for k in names]) + floor
            out[attr if style is None else f"{attr}:{style}"] = (names, means, spread)
    return out


def _class_probs(attribute: str, feature: list[float], style: str | None = None) -> dict[str, float]:
    """Probabilities of a shape attribute's values (a Gaussian per value, diagonal), compared
    with the prototypes of ``style`` when given (an ink outline narrows a face, for one)."""
    names, means, spread = prototypes()[attribute if style is None else f"{attribute}:{style}"]
    d2 = (((np.asarray(feature) - means) / spread) ** 2).sum(1) / (2 * CLASS_SIGMA**2) + np.log(spread).sum(1)
    p = np.exp(-(d2 - d2.min()))
    return dict(zip(names, (p / p.sum()).tolist()))


def read_probs(image: Image.Image) -> dict[str, dict[str, float] | None]:
    """Per attribute, the probability of each value; None for colour attributes of a pencil picture."""
    f = features(image)
    out: dict[str, dict[str, float] | None] = {"style": _class_probs("style", f["style"])}
    style = max(out["style"], key=out["style"].get)
    out.update({a: _class_probs(a, f[a], style) for a in SHAPES if a != "style"})
    for a in COLOUR_ATTRIBUTES:
        out[a] = _colour_probs(a, f["colours"][a]) if shows_colour(style) else None
    return out


def _argmax(p: dict[str, float] | None) -> str | None:
    return None if p is None else max(p, key=p.get)


def read(image: Image.Image) -> dict[str, str | None]:
    """Every attribute of a portrait picture (None: a colour attribute of a pencil picture)."""
    probs = read_probs(image)
    return {a: _argmax(probs[a]) for a in ATTRIBUTES}


def identity_match(image_a: Image.Image, image_b: Image.Image) -> float:
    """How likely two pictures show the same person, 0..1: the product, over the identity
    attributes both pictures show, of the chance both read the same value."""
    pa, pb = read_probs(image_a), read_probs(image_b)
    score = 1.0
    for attr in IDENTITY:
        if pa[attr] is None or pb[attr] is None:
            continue
        score *= sum(pa[attr][k] * pb[attr][k] for k in pa[attr])
    return float(score)


def style_score(image: Image.Image, style: str) -> float:
    """The probability, 0..1, that a picture is drawn in ``style`` (flat, ink or pencil)."""
    if style not in vocab()["style"]:
        raise ValueError(f"unknown style {style!r}; allowed: {', '.join(values('style'))}")
    return float(_class_probs("style", features(image)["style"])[style])


def score_portrait(image: Image.Image, asked: dict[str, str]) -> dict[str, float | None]:
    """1.0/0.0 per attribute the prompt asks for (None where not asked or not visible in the
    asked style), and ``all``: every asked attribute right."""
    got = read(image)
    seen = visible(asked.get("style") or got["style"] or "flat")
    out: dict[str, float | None] = {a: None for a in got}
    for a, v in asked.items():
        if a in seen:
            out[a] = float(got[a] == v)
    judged = [x for x in out.values() if x is not None]
    out["all"] = float(all(x == 1.0 for x in judged)) if judged else None
    return out


def summarise_portraits(scores: list[dict]) -> dict[str, float | int | None]:
    """Averages over images: each attribute over the images that ask for it, ``all`` (every asked
    attribute right) and ``attributes`` (the mean over the asked attributes)."""
    out: dict[str, float | int | None] = {"n": len(scores)}
    for key in ("all", *ATTRIBUTES):
        vals = [s[key] for s in scores if s.get(key) is not None]
        out[key] = round(float(np.mean(vals)), 4) if vals else None
    per = [out[a] for a in ATTRIBUTES if out[a] is not None and a != "style"]
    out["attributes"] = round(float(np.mean(per)), 4) if per else None
    return out


def score_portrait_files(paths, prompt: str | None = None, on_score=None) -> list[dict]:
    """``evaluate.score_files`` for the portrait world: each picture against what ``prompt`` (or
    the prompt in its metadata) asks."""
    return score_files(paths, prompt, on_score, read=parse_portrait_prompt, judge=score_portrait)


def evaluate_portraits_studio(studio, items, **kw) -> tuple[dict, list[dict]]:
    """``evaluate.evaluate_studio`` for the portrait world: one image per portrait (its canonical
    caption in ``lang``, seed + i), each scored against what its caption asks; same keywords."""
    lang = kw.get("lang", "en")
    return evaluate_studio(studio, items, write=portrait_caption,
                           judge=lambda img, p: score_portrait(img, parse_portrait_prompt(portrait_caption(p, lang))),
                           summary=summarise_portraits, **kw)
