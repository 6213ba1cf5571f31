"""The shapes evaluator: finds the objects in a picture and scores it against the prompt's Spec,
in the spirit of GenEval (Ghosh et al., 2023) -- object presence, shape, colour, count and
relation -- with classical vision (OpenCV) instead of a detector, because the world is simple.

How a picture is read:
1. Objects are saturated, backgrounds are not: foreground = HSV saturation > 0.4 and value > 0.3,
   after a 3x3 median filter (noise), at a 64-pixel working size.
2. Connected components of the foreground larger than a fraction of the smallest object are the
   detections; each takes the palette colour nearest (CIELAB) to its median colour.
3. Shape: the component's mask, cropped to its bounding box and resized to 24x24, is compared
   with a template of each shape by IoU; the best one wins (the ring keeps its hole).
How it is scored, per expected object, after a one-to-one assignment (Hungarian) that prefers
detections of the right colour and shape: presence (matched at all), colour, shape, and
*object* = colour and shape both right -- the headline score, "presence + shape + colour".
``count`` is 1 when the number of detections equals the number asked for; ``relation`` is 1
when both related objects are right and their centroids are in the stated order.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from danqing.errors import ImageError, InvalidRequest
from danqing.outputs.infotext import parse_infotext
from danqing.outputs.store import read_infotext, save_png
from danqing.request import GenerationRequest
from danqing.synthetic.captions import caption, parse_prompt
from danqing.synthetic.render import shape_mask
from danqing.synthetic.scenes import Spec, colour_info, colours, novel_colours, shapes, vocab

WORK = 64          # working size in pixels
UP = 4            # masks are made at WORK * UP
TEMPLATE = 32      # template side
MIN_AREA = 0.35    # fraction of a small circle's area a component needs to count
REL_MARGIN = 0.05  # centroids must differ by 5% of the image to be "left of" etc.


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    x: float       # centroid, 0..1
    y: float
    area: float    # fraction of the image
    shape_iou: float


@dataclass(frozen=True)
class Score:
    """Scores of one image; each 0..1 (``relation``/``position`` None when the spec has none)."""

    object: float
    presence: float
    colour: float
    shape: float
    count: float
    relation: float | None
    position: float | None
    detections: tuple[Detection, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["detections"] = [asdict(x) for x in self.detections]
        return d


@functools.lru_cache(maxsize=4)
def _templates(names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    out = {}
    for s in names or shapes():
        m = shape_mask(s, 96)
        ys, xs = np.nonzero(m)
        out[s] = _normalise(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    return out


def _normalise(mask: np.ndarray) -> np.ndarray:
    import cv2

    m = cv2.resize(mask.astype(np.float32), (TEMPLATE, TEMPLATE), interpolation=cv2.INTER_AREA)
    return m >= 0.5


@functools.lru_cache(maxsize=4)
def _palette_lab(names: tuple[str, ...] | None = None) -> tuple[list[str], np.ndarray]:
    import cv2

    names = list(names or colours())
    rgb = np.array([[colour_info(c)["rgb"] for c in names]], np.uint8)
    return names, cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[0].astype(np.float32)


def classify_shape(mask: np.ndarray, names: tuple[str, ...] | None = None) -> tuple[str, float]:
    """(shape, IoU) of a component mask (bool, any size) against the shape templates (the
    trained shapes, or ``names``)."""
    ys, xs = np.nonzero(mask)
    crop = _normalise(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    best, best_iou = "unknown", 0.0
    for name, t in _templates(names).items():
        iou = float((crop & t).sum() / max((crop | t).sum(), 1))
        if iou > best_iou:
            best, best_iou = name, iou
    return best, best_iou


def detect(image: Image.Image, shape_names: tuple[str, ...] | None = None,
           colour_names: tuple[str, ...] | None = None) -> list[Detection]:
    """The objects in an image, largest first; shapes classified among the trained shapes (or
    ``shape_names``), colours among the trained colours (or ``colour_names``). ``score`` adds a
    novel shape or colour only when the prompt asks for one, so ordinary scores never change."""
    import cv2

    rgb = np.asarray(image.convert("RGB").resize((WORK, WORK), Image.BOX))
    # masks at 4x the working size: thresholding a smooth upsampling keeps sub-pixel outlines;
    # a light Gaussian (not a median, which eats a small star's points) calms pixel noise
    rgb = cv2.resize(rgb, (WORK * UP, WORK * UP), interpolation=cv2.INTER_CUBIC)
    rgb = cv2.GaussianBlur(rgb, (0, 0), 0.3 * UP)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1].astype(np.float32) / 255
    fg = ((sat > 0.3) & (hsv[..., 2] > 0.3 * 255)).astype(np.uint8)
    n, labels, stats, cents = cv2.connectedComponentsWithStats(fg, connectivity=8)
    r_small = vocab()["sizes"]["small"]["radius"] * WORK * UP
    min_area = MIN_AREA * np.pi * r_small**2
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    names, pal = _palette_lab(colour_names)
    out = []
    for k in range(1, n):
        area = stats[k, cv2.CC_STAT_AREA]
        if area < min_area:
            continue
        mask = labels == k
        # the outline at half the object's own saturation: the 50%-coverage contour, whatever
        # the colour's saturation and however blurred the picture
        mask &= sat > 0.5 * np.percentile(sat[mask], 90)
        area = int(mask.sum())
        if area < min_area:
            continue
        # a ring's hole is background: fill nothing, the template keeps the hole
        colour = names[int(np.argmin(((pal - np.median(lab[mask], axis=0)) ** 2).sum(1)))]
        shape, iou = classify_shape(mask, shape_names)
        out.append(Detection(shape, colour, float(cents[k][0] / (WORK * UP)), float(cents[k][1] / (WORK * UP)),
                             float(area / (WORK * UP) ** 2), iou))
    return sorted(out, key=lambda d: -d.area)


def _relation_holds(a: Detection, rel: str, b: Detection) -> bool:
    if rel == "left":
        return a.x < b.x - REL_MARGIN
    if rel == "right":
        return a.x > b.x + REL_MARGIN
    if rel == "above":
        return a.y < b.y - REL_MARGIN
    return a.y > b.y + REL_MARGIN


def _position_holds(d: Detection, position: str) -> bool:
    third = {"left": d.x < 0.4, "right": d.x > 0.6, "top": d.y < 0.4, "bottom": d.y > 0.6,
             "centre": 0.35 < d.x < 0.65 and 0.35 < d.y < 0.65}
    return third[position]


def score(image: Image.Image, spec: Spec, *, also: tuple[str, ...] = ()) -> Score:
    """Score one image against what its prompt asked for (see the module docstring).

    Args:
        also: novel shapes or colours to recognise even when the prompt does not name them
            (strict scoring: a taught concept drawn where an ordinary one was asked for counts
            as wrong, instead of passing as the nearest trained shape or colour).
    """
    from scipy.optimize import linear_sum_assignment

    want = spec.objects
    asked_s = [s for s, _ in want] + [a for a in also if a not in novel_colours()]
    asked_c = [c for _, c in want] + [a for a in also if a in novel_colours()]
    extra = tuple(dict.fromkeys(s for s in asked_s if s not in shapes()))
    extra_c = tuple(dict.fromkeys(c for c in asked_c if c not in colours()))
    dets = detect(image, (*shapes(), *extra) if extra else None, (*colours(), *extra_c) if extra_c else None)
    match: dict[int, Detection] = {}
    if dets:
        cost = np.zeros((len(want), len(dets)))
        for i, (shape, colour) in enumerate(want):
            for j, d in enumerate(dets):
                cost[i, j] = (d.shape != shape) * 1.0 + (d.colour != colour) * 1.2 - 0.01 * d.area
        rows, cols = linear_sum_assignment(cost)
        match = {int(i): dets[int(j)] for i, j in zip(rows, cols)}
    n = len(want)
    present = [i in match for i in range(n)]
    colour_ok = [i in match and match[i].colour == want[i][1] for i in range(n)]
    shape_ok = [i in match and match[i].shape == want[i][0] for i in range(n)]
    obj_ok = [c and s for c, s in zip(colour_ok, shape_ok)]
    relation = position = None
    if spec.relation is not None:
        i, rel, j = spec.relation
        relation = float(obj_ok[i] and obj_ok[j] and _relation_holds(match[i], rel, match[j]))
    if spec.layout is not None and n == 3:
        key = (lambda d: d.x) if spec.layout == "row" else (lambda d: d.y)
        relation = float(all(obj_ok) and key(match[0]) < key(match[1]) < key(match[2]))
    if spec.position is not None and n == 1:
        position = float(obj_ok[0] and _position_holds(match[0], spec.position))
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    return Score(mean(obj_ok), mean(present), mean(colour_ok), mean(shape_ok), float(len(dets) == n),
                 relation, position, tuple(dets))


def summarise(scores: list[Score]) -> dict[str, float | int | None]:
    """Averages over images (relation/position over the images that have one)."""
    out: dict[str, float | int | None] = {"n": len(scores)}
    for key in ("object", "presence", "colour", "shape", "count", "relation", "position"):
        vals = [getattr(s, key) for s in scores if getattr(s, key) is not None]
        out[key] = round(float(np.mean(vals)), 4) if vals else None
    return out


def picture_and_prompt(path, prompt: str | None = None) -> tuple[Image.Image, str]:
    """(the RGB picture, ``prompt`` or the prompt in its metadata) of an image file.

    Raises:
        ImageError: a file that is not a readable picture, or carries no prompt when ``prompt`` is None.
    """
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except Exception as exc:  # Pillow raises many kinds on damaged files
        raise ImageError(f"cannot read image {path}: {exc or type(exc).__name__}") from None
    return img, prompt if prompt is not None else parse_infotext(read_infotext(path))[0]


def score_files(paths, prompt: str | None = None, on_score=None, *, read=parse_prompt, judge=None) -> list:
    """Score pictures on disk against ``prompt``, or each against the prompt in its own metadata.

    Args:
        on_score: called with (path, score) after each picture.
        read: the world's prompt reader (text -> what is asked; ValueError when it asks nothing);
            ``judge`` (picture, asked) -> score. The shapes world's by default; the portrait
            world passes its own (portrait_reader.py).

    Raises:
        ImageError: a file that is not a readable picture, or carries no prompt when ``prompt`` is None.
        InvalidRequest: a prompt that names nothing of the world.
    """
    judge = judge or score
    scores = []
    for path in paths:
        img, text = picture_and_prompt(path, prompt)
        try:
            asked = read(text)
        except ValueError as exc:
            raise InvalidRequest("prompt", str(exc)) from None
        s = judge(img, asked)
        scores.append(s)
        if on_score:
            on_score(path, s)
    return scores


def check_held_out(n: int, lang: str) -> None:
    """The held-out set has 1-1000 prompts, in English or Chinese."""
    if not 1 <= n <= 1000:
        raise InvalidRequest("n", f"must be 1-1000, got {n}")
    if lang not in ("en", "zh"):
        raise InvalidRequest("lang", f"must be en or zh, got {lang!r}")


def evaluate_studio(studio, scenes, *, lang: str = "en", model: str | None = None, steps: int = 20,
                    cfg_scale: float = 7.0, seed: int = 1000, size: int = 64, sampler: str = "DPM++ 2M",
                    schedule: str = "Automatic", out_dir=None, out_files=None, on_image=None, write=caption, judge=None,
                    summary=summarise, suffix: str = "", vae: str | None = None) -> tuple[dict, list]:
    """Generate one image per scene (its canonical caption in ``lang``, seed + i) through
    ``Studio.generate`` and score them. Returns (summary, per-image scores).

    Args:
        out_dir: also save the images there (with their infotext).
        out_files: or save image i as ``out_files[i]`` (with its infotext).
        on_image: called with (i, image, score) after each image.
        write, judge, summary: the world's captioner (scene, lang) -> text, scorer (picture,
            scene) -> score and summariser; the shapes world's by default.
        suffix: added to every prompt (LoRA tags: ``" <lora:danqing-tiny-lcm:1>"``).
        vae: a VAE name overriding the model's (``GenerationRequest.vae``).
    """
    judge = judge or (lambda img, sc: score(img, sc.spec))
    scores = []
    for i, sc in enumerate(scenes):
        req = GenerationRequest.create(prompt=write(sc, lang) + suffix, model=model, steps=steps, cfg_scale=cfg_scale,
                                seed=seed + i, subseed=0, width=size, height=size, sampler=sampler,
                                schedule=schedule, vae=vae)
        res = studio.generate(req, save=out_dir is not None, out_dir=out_dir)
        if out_files is not None:
            save_png(res.images[0], out_files[i], res.infotexts[0])
        s = judge(res.images[0], sc)
        scores.append(s)
        if on_image:
            on_image(i, res.images[0], s)
    return summary(scores), scores


def layout_kept(source: Image.Image, edited: Image.Image, expected: list[tuple[str, str]],
                tolerance: float = 3.0) -> tuple[bool, float | None]:
    """Did an edit keep the source's layout and give each object the asked-for colour?

    Args:
        expected: (shape, colour) of every object the edited picture should show; each shape is
            found in both pictures (the largest of that shape).
        tolerance: the largest centroid shift allowed, in pixels of a 64x64 picture.

    Returns:
        (ok, the largest centroid shift in 64x64 pixels, None when an object is missing).
    """
    src, out = detect(source), detect(edited)
    shifts = []
    ok = True
    for shape, colour in expected:
        a = next((d for d in src if d.shape == shape), None)
        b = next((d for d in out if d.shape == shape), None)
        if a is None or b is None:
            return False, None
        shift = 64 * float(np.hypot(a.x - b.x, a.y - b.y))
        shifts.append(shift)
        ok = ok and shift < tolerance and b.colour == colour
    return ok, max(shifts)


def same_objects(source: Image.Image, variation: Image.Image) -> tuple[bool, float | None]:
    """Does ``variation`` show the same coloured shapes as ``source`` (as the detector reads
    both: the same (colour, shape) pairs, as many of each), and how far did they move?

    Returns:
        (same set, the mean centroid shift over the objects in 64x64 pixels: each of the source's
        objects paired with the nearest unpaired one of the same colour and shape in the
        variation; None when the sets differ).
    """
    src, out = detect(source), detect(variation)
    if sorted((d.colour, d.shape) for d in src) != sorted((d.colour, d.shape) for d in out):
        return False, None
    left = list(out)
    shifts = []
    for a in src:
        same = [b for b in left if (b.colour, b.shape) == (a.colour, a.shape)]
        b = min(same, key=lambda d: np.hypot(a.x - d.x, a.y - d.y))
        left.remove(b)
        shifts.append(64 * float(np.hypot(a.x - b.x, a.y - b.y)))
    return True, float(np.mean(shifts)) if shifts else 0.0
