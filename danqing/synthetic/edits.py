"""Edit pairs for instruct-pix2pix: a scene, an instruction, and the scene after it.

Three kinds, in English and Chinese:

- recolour: "make the circle blue" / "把圆形变成蓝色"
- add:      "add a yellow star" / "添加一个黄色的星形"
- remove:   "remove the square" / "去掉正方形"

The shapes in a scene are distinct, so "the circle" names one object. Only the training split's
(colour, shape) pairs are used (the held-out pairs of ``danqing.synthetic.scenes`` stay unseen).
Training and evaluation draw from different seeds: the evaluation pairs are new scenes and
instruction instances (``heldout_edits``). ``judge_edit`` checks a result with the evaluator's
detector: the edit was carried out, and every object it should not touch is still there, with
its shape and colour, within ``tolerance`` pixels of its place.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from danqing.synthetic.evaluate import detect
from danqing.synthetic.scenes import Obj, Scene, _pairs, sample_scene, vocab

KINDS = ("recolour", "add", "remove")
TRAIN_SEED_OFFSET = 0
HELDOUT_SEED = 10_000_019


@dataclass(frozen=True)
class EditPair:
    """Attributes:
        before, after: the scenes.
        instruction: the text ("make the circle blue").
        kind: "recolour", "add" or "remove".
        target: the (shape, colour) the edit is about: the new colour of the recoloured shape,
            the added object, or the removed object.
    """

    before: Scene
    after: Scene
    instruction: str
    kind: str
    target: tuple[str, str]


def instruction(kind: str, shape: str, colour: str, lang: str = "en") -> str:
    v = vocab()
    if lang == "en":
        return {"recolour": f"make the {shape} {colour}",
                "add": f"add {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}",
                "remove": f"remove the {shape}"}[kind]
    s, c = v["shapes"][shape]["zh"], v["colours"][colour]["zh"]
    return {"recolour": f"把{s}变成{c}", "add": f"添加一个{c}的{s}", "remove": f"去掉{s}"}[kind]


def _free_spot(rng: random.Random, objects: tuple[Obj, ...], min_dist: float = 0.34) -> tuple[float, float] | None:
    for _ in range(200):
        x, y = rng.uniform(0.22, 0.78), rng.uniform(0.22, 0.78)
        if all(np.hypot(x - o.x, y - o.y) >= min_dist for o in objects):
            return round(x, 4), round(y, 4)
    return None


def sample_edit(rng: random.Random, lang: str = "en") -> EditPair:
    """One edit pair from the training split's (colour, shape) pairs."""
    train_pairs = set(_pairs()[0])
    while True:
        scene = sample_scene(rng, "train", n_objects=rng.choice([1, 2, 2]))
        shapes_in = [o.shape for o in scene.objects]
        if len(set(shapes_in)) != len(shapes_in):
            continue
        kind = rng.choice(KINDS if len(scene.objects) > 1 else ("recolour", "add"))
        objs = scene.objects
        if kind == "recolour":
            i = rng.randrange(len(objs))
            o = objs[i]
            choices = [c for c, s in train_pairs if s == o.shape and c != o.colour]
            colour = rng.choice(sorted(choices))
            after = objs[:i] + (dataclasses.replace(o, colour=colour),) + objs[i + 1:]
            target = (o.shape, colour)
        elif kind == "add":
            choices = sorted((c, s) for c, s in train_pairs if s not in shapes_in)
            colour, shape = rng.choice(choices)
            spot = _free_spot(rng, objs)
            if spot is None:
                continue
            after = objs + (Obj(shape, colour, rng.choice(["small", "large"]), *spot),)
            target = (shape, colour)
        else:
            i = rng.randrange(len(objs))
            after = objs[:i] + objs[i + 1:]
            target = (objs[i].shape, objs[i].colour)
        after_scene = dataclasses.replace(scene, objects=after, relation=None, position=None, layout=None)
        return EditPair(scene, after_scene, instruction(kind, target[0], target[1], lang), kind, target)


def edit_pairs(seed: int, n: int, langs: tuple[str, ...] = ("en",)) -> list[EditPair]:
    """``n`` training pairs, deterministic from ``seed``; languages alternate at random."""
    rng = random.Random(f"edits:{seed}")
    return [sample_edit(rng, rng.choice(langs)) for _ in range(n)]


def heldout_edits(n: int = 100, lang: str = "en") -> list[EditPair]:
    """The evaluation pairs: a seed no training run uses."""
    rng = random.Random(f"edits-heldout:{HELDOUT_SEED}")
    return [sample_edit(rng, lang) for _ in range(n)]


def judge_edit(pair: EditPair, before: Image.Image, result: Image.Image, tolerance: float = 3.0) -> dict:
    """Did ``result`` carry out ``pair``'s instruction on ``before`` and keep the rest?

    Returns:
        {"done": the edit happened, "kept": every untouched object is still there (same shape
        and colour, centroid within ``tolerance`` px of a 64x64 picture), "ok": both}.
    """
    src, out = detect(before), detect(result)
    shape, colour = pair.target

    def find(dets, s, c=None):
        return next((d for d in dets if d.shape == s and (c is None or d.colour == c)), None)

    def near(a, b) -> bool:
        return 64 * float(np.hypot(a.x - b.x, a.y - b.y)) < tolerance

    untouched = [(o.shape, o.colour) for o in pair.before.objects if o.shape != shape or pair.kind == "add"]
    if pair.kind == "recolour":
        old, new = find(src, shape), find(out, shape)
        done = old is not None and new is not None and new.colour == colour and near(old, new)
    elif pair.kind == "add":
        done = find(out, shape, colour) is not None
    else:
        done = find(out, shape, colour) is None
    kept = True
    for s, c in untouched:
        a, b = find(src, s, c), find(out, s, c)
        kept = kept and a is not None and b is not None and near(a, b)
    return {"done": bool(done), "kept": bool(kept), "ok": bool(done and kept)}
