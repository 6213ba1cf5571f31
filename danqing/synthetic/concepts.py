"""New concepts for the customisation experiments: scenes of a shape no bundled model has seen.

Issue 5 asks to teach the bundled model something it has never seen and measure it with the
evaluator. The concept is a novel shape from ``synthetic.json`` ("heart"): ~20 rendered
training scenes, held-out evaluation scenes with other seeds, and, for DreamBooth's prior
preservation, "class" scenes: the same layouts with an ordinary trained shape in its place.
"""

from __future__ import annotations

import random

from danqing.synthetic.scenes import Obj, Scene, colours, novel_shapes, shapes, vocab


def concept_scenes(n: int = 20, *, shape: str = "heart", seed: int = 0, split: str = "train") -> list[Scene]:
    """``n`` scenes showing ``shape``: one object (two thirds) or the concept beside an ordinary
    shape (one third), every colour, position, size and background style.

    Args:
        split: "train" or "eval"; the two never share a seed stream.
    """
    if shape not in novel_shapes():
        raise ValueError(f"unknown novel shape {shape!r}; novel shapes: {', '.join(novel_shapes())}")
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; allowed: train, eval")
    v = vocab()
    rng = random.Random(f"concept:{shape}:{split}:{seed}")
    out = []
    bgs = list(v["backgrounds"])
    for i in range(n):
        colour = colours()[i % len(colours())] if split == "train" else rng.choice(colours())
        bg = rng.choice(bgs)
        bg2 = rng.choice([b for b in bgs if b != bg])
        style = rng.choices(list(v["background_styles"]), weights=[0.4, 0.15, 0.15, 0.15, 0.15])[0]
        j = lambda a: rng.uniform(-a, a)  # noqa: E731  position jitter
        if split == "eval" or i % 3 != 2:
            position = rng.choice(list(v["positions"]))
            x0, y0 = v["positions"][position]["xy"]
            obj = Obj(shape, colour, rng.choice(["small", "large"]), round(x0 + j(0.05), 4), round(y0 + j(0.05), 4))
            out.append(Scene((obj,), bg, bg2, style, position=position, seed=rng.randrange(2**31)))
        else:
            other = Obj(rng.choice(shapes()), rng.choice([c for c in colours() if c != colour]))
            rel = rng.choice(["left", "right"])
            a, b = (0.27, 0.73) if rel == "left" else (0.73, 0.27)
            c = 0.5 + j(0.08)
            objs = (Obj(shape, colour, "large", round(a + j(0.03), 4), round(c + j(0.1), 4)),
                    Obj(other.shape, other.colour, "large", round(b + j(0.03), 4), round(c + j(0.1), 4)))
            out.append(Scene(objs, bg, bg2, style, relation=(0, rel, 1), seed=rng.randrange(2**31)))
    return out


def class_scenes(scenes: list[Scene], *, seed: int = 0) -> list[Scene]:
    """The same scenes with every novel shape replaced by a random trained one: the "class" of
    DreamBooth's prior preservation (what the model already draws in those layouts)."""
    rng = random.Random(f"class:{seed}")
    novel = set(novel_shapes())
    out = []
    for s in scenes:
        objs = tuple(Obj(rng.choice(shapes()), o.colour, o.size, o.x, o.y) if o.shape in novel else o for o in s.objects)
        out.append(Scene(objs, s.background, s.background_2, s.style, s.relation, s.position, s.layout, s.seed))
    return out
