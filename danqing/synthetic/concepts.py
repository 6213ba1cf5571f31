"""New concepts for the customisation experiments: scenes of a shape or a colour no bundled
model has seen.

The experiments teach the bundled model something it has never seen and measure it with the
evaluator. A concept is a novel shape ("heart") or a novel colour ("magenta") from
``synthetic.json``: ~20 rendered training scenes, held-out evaluation scenes with other seeds,
and, for DreamBooth's prior preservation, "class" scenes: the same layouts with an ordinary
trained shape (or colour) in its place.
"""

from __future__ import annotations

import random

from danqing.synthetic.scenes import Obj, Scene, colours, concepts, novel_colours, novel_shapes, shapes, vocab


def concept_scenes(n: int = 20, *, concept: str = "heart", seed: int = 0, split: str = "train",
                   pair_share: float = 1 / 3, relations: tuple[str, ...] = ("left", "right")) -> list[Scene]:
    """``n`` scenes showing ``concept``: one object, or (a ``pair_share`` of the training
    scenes, every ``1 / pair_share``-th) the concept beside an ordinary object in one of
    ``relations``; every position, size and background style. A shape concept comes in every
    trained colour, a colour concept on every trained shape.

    Args:
        concept: a novel shape or a novel colour (``danqing.synthetic.scenes.concepts()``).
        split: "train" or "eval"; the two never share a seed stream. Held-out scenes are single
            objects.
        pair_share: 0 to 1. A character taught for stories of two objects (the comic) needs
            more pairs than the default third.
        relations: the pairs' relations ("left", "right", "above", "below").
    """
    if not 0 <= pair_share <= 1:
        raise ValueError(f"pair_share {pair_share}: allowed 0 to 1")
    if not relations or set(relations) - {"left", "right", "above", "below"}:
        raise ValueError(f"relations {relations}: allowed left, right, above, below")
    if concept not in concepts():
        raise ValueError(f"unknown concept {concept!r}; concepts: {', '.join(concepts())}")
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; allowed: train, eval")
    v = vocab()
    is_colour = concept in novel_colours()
    rng = random.Random(f"concept:{concept}:{split}:{seed}")
    out = []
    bgs = list(v["backgrounds"])

    def pick(i: int, pool: list[str]) -> str:  # training cycles through the pool; eval samples
        return pool[i % len(pool)] if split == "train" else rng.choice(pool)

    for i in range(n):
        shape, colour = (pick(i, shapes()), concept) if is_colour else (concept, pick(i, colours()))
        bg = rng.choice(bgs)
        bg2 = rng.choice([b for b in bgs if b != bg])
        style = rng.choices(list(v["background_styles"]), weights=[0.4, 0.15, 0.15, 0.15, 0.15])[0]
        j = lambda a: rng.uniform(-a, a)  # noqa: E731  position jitter
        pair = int((i + 1) * pair_share + 1e-9) > int(i * pair_share + 1e-9)
        if split == "eval" or not pair:
            position = rng.choice(list(v["positions"]))
            x0, y0 = v["positions"][position]["xy"]
            obj = Obj(shape, colour, rng.choice(["small", "large"]), round(x0 + j(0.05), 4), round(y0 + j(0.05), 4))
            out.append(Scene((obj,), bg, bg2, style, position=position, seed=rng.randrange(2**31)))
        else:
            other = Obj(rng.choice([s for s in shapes() if s != shape]), rng.choice([c for c in colours() if c != colour]))
            rel = rng.choice(list(relations))
            a, b = (0.27, 0.73) if rel in ("left", "above") else (0.73, 0.27)
            c = 0.5 + j(0.08)
            (ax, ay), (bx, by) = ((a + j(0.03), c + j(0.1)), (b + j(0.03), c + j(0.1)))
            if rel in ("above", "below"):  # the same layout turned on its side
                (ax, ay), (bx, by) = (ay, ax), (by, bx)
            objs = (Obj(shape, colour, "large", round(ax, 4), round(ay, 4)),
                    Obj(other.shape, other.colour, "large", round(bx, 4), round(by, 4)))
            out.append(Scene(objs, bg, bg2, style, relation=(0, rel, 1), seed=rng.randrange(2**31)))
    return out


def class_scenes(scenes: list[Scene], *, seed: int = 0) -> list[Scene]:
    """The same scenes with every novel shape (or colour) replaced by a random trained one: the
    "class" of DreamBooth's prior preservation (what the model already draws in those layouts)."""
    rng = random.Random(f"class:{seed}")
    novel_s, novel_c = set(novel_shapes()), set(novel_colours())
    out = []
    for s in scenes:
        objs = tuple(Obj(rng.choice(shapes()) if o.shape in novel_s else o.shape,
                         rng.choice(colours()) if o.colour in novel_c else o.colour, o.size, o.x, o.y)
                     for o in s.objects)
        out.append(Scene(objs, s.background, s.background_2, s.style, s.relation, s.position, s.layout, s.seed))
    return out
