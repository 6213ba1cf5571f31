"""Scenes of danqing's procedural shapes world: what is in a picture, as data.

A :class:`Scene` is 1-3 coloured shapes with positions, a background and (for two objects) a
relation. Scenes are sampled deterministically from a seed; the *held-out* split holds every
scene that contains one of the held-out (colour, shape) pairs (``heldout_pairs`` in
``data/synthetic.json``), which the training split never shows -- so a model scored on it is
tested on composition, not memory.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import asdict, dataclass
from importlib import resources

SPLITS = ("train", "heldout")


@functools.lru_cache(maxsize=1)
def vocab() -> dict:
    """The vocabulary (colours, shapes, sizes, backgrounds, positions, relations, held-out pairs)."""
    text = resources.files("danqing").joinpath("data/synthetic.json").read_text(encoding="utf-8")
    return json.loads(text)


def colours() -> list[str]:
    return list(vocab()["colours"])


def shapes() -> list[str]:
    return list(vocab()["shapes"])


def novel_shapes() -> list[str]:
    """Shapes no bundled model was trained on (concepts for LoRA / DreamBooth / textual inversion)."""
    return [k for k in vocab()["novel_shapes"] if not k.startswith("_")]


def novel_colours() -> list[str]:
    """Colours no bundled model was trained on (concepts, as novel shapes are)."""
    return [k for k in vocab()["novel_colours"] if not k.startswith("_")]


def concepts() -> list[str]:
    """Every concept that can be taught: the novel shapes and the novel colours."""
    return novel_shapes() + novel_colours()


def colour_info(colour: str) -> dict:
    """``{"rgb": [r, g, b], "zh": ...}`` of a trained or novel colour."""
    v = vocab()
    return v["colours"].get(colour) or v["novel_colours"][colour]


def shape_zh(shape: str) -> str:
    """The Chinese word of a trained or novel shape."""
    v = vocab()
    return (v["shapes"].get(shape) or v["novel_shapes"][shape])["zh"]


def heldout_pairs() -> set[tuple[str, str]]:
    return {tuple(p) for p in vocab()["heldout_pairs"]}


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, size ("small"/"large") and centre (x, y) in 0..1 of the image;
    ``scale`` multiplies the size's radius (1 everywhere but in growing and shrinking clips)."""

    shape: str
    colour: str
    size: str = "large"
    x: float = 0.5
    y: float = 0.5
    scale: float = 1.0  # of the size's radius (a growing or shrinking object of the moving world)


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for -- the part of a scene the evaluator checks.

    Attributes:
        objects: ((shape, colour), ...) in prompt order.
        relation: (i, "left"|"right"|"above"|"below", j): object i is <relation> of object j.
        position: for one object, "left"/"right"/"top"/"bottom"/"centre" when stated.
        layout: for three objects, "row" (left to right) or "column" (top to bottom).
    """

    objects: tuple[tuple[str, str], ...]
    relation: tuple[int, str, int] | None = None
    position: str | None = None
    layout: str | None = None

    def to_dict(self) -> dict:
        return {"objects": [list(o) for o in self.objects], "relation": list(self.relation) if self.relation else None,
                "position": self.position, "layout": self.layout}

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        rel = d.get("relation")
        return cls(tuple(tuple(o) for o in d["objects"]), tuple(rel) if rel else None, d.get("position"), d.get("layout"))


@dataclass(frozen=True)
class Scene:
    """A full scene: objects with positions, background and the seed of its texture."""

    objects: tuple[Obj, ...]
    background: str = "white"
    background_2: str = "light grey"
    style: str = "plain"
    relation: tuple[int, str, int] | None = None
    position: str | None = None
    layout: str | None = None
    seed: int = 0

    @property
    def spec(self) -> Spec:
        return Spec(tuple((o.shape, o.colour) for o in self.objects), self.relation, self.position, self.layout)

    def to_dict(self) -> dict:
        d = asdict(self)
        # scale only where it is not 1: the still world's scenes serialise as they always have
        d["objects"] = [{k: v for k, v in asdict(o).items() if k != "scale" or v != 1.0} for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        d = dict(d)
        d["objects"] = tuple(Obj(**o) for o in d["objects"])
        if d.get("relation"):
            d["relation"] = tuple(d["relation"])
        return cls(**d)

    def is_heldout(self) -> bool:
        held = heldout_pairs()
        return any((o.colour, o.shape) in held for o in self.objects)


def _pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(every pair the training split may use, the held-out pairs)."""
    held = heldout_pairs()
    every = [(c, s) for c in colours() for s in shapes()]
    return [p for p in every if p not in held], sorted(held)


def sample_scene(rng: random.Random, split: str = "train", n_objects: int | None = None) -> Scene:
    """A random scene. ``split="train"`` never uses a held-out (colour, shape) pair;
    ``"heldout"`` always contains at least one.

    Args:
        rng: the source of randomness (``random.Random(seed)``): same seed, same scene.
        split: "train" or "heldout".
        n_objects: 1, 2 or 3; default: 1 (35%), 2 (45%), 3 (20%).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    v = vocab()
    n = n_objects or rng.choices([1, 2, 3], weights=[0.35, 0.45, 0.2])[0]
    if n not in (1, 2, 3):
        raise ValueError(f"n_objects must be 1, 2 or 3, not {n}")
    train_pairs, held = _pairs()
    pairs: list[tuple[str, str]] = []
    if split == "heldout":
        pairs.append(rng.choice(held))
    while len(pairs) < n:
        p = rng.choice(train_pairs)
        if p not in pairs:
            pairs.append(p)
    rng.shuffle(pairs)
    j = lambda a: rng.uniform(-a, a)  # noqa: E731  position jitter
    relation = position = layout = None
    if n == 1:
        position = rng.choice(list(v["positions"]))
        x0, y0 = v["positions"][position]["xy"]
        xy = [(x0 + j(0.05), y0 + j(0.05))]
        sizes = [rng.choice(["small", "large"])]
    elif n == 2:
        rel = rng.choice(list(v["relations"]))
        relation = (0, rel, 1)
        c = 0.5 + j(0.08)
        near, far = 0.27 + j(0.03), 0.73 + j(0.03)
        a, b = (near, far) if rel in ("left", "above") else (far, near)
        if rel in ("left", "right"):
            xy = [(a, c + j(0.1)), (b, c + j(0.1))]
        else:
            xy = [(c + j(0.1), a), (c + j(0.1), b)]
        sizes = [rng.choice(["small", "large"]) for _ in range(2)]
    else:
        layout = rng.choice(["row", "column"])
        c = 0.5 + j(0.1)
        xy = [((t, c + j(0.04)) if layout == "row" else (c + j(0.04), t)) for t in (0.2, 0.5, 0.8)]
        sizes = ["small"] * 3
    bgs = list(v["backgrounds"])
    bg = rng.choice(bgs)
    bg2 = rng.choice([b for b in bgs if b != bg])
    style = rng.choices(list(v["background_styles"]), weights=[0.4, 0.15, 0.15, 0.15, 0.15])[0]
    objects = tuple(Obj(s, c, size, round(x, 4), round(y, 4)) for (c, s), size, (x, y) in zip(pairs, sizes, xy))
    return Scene(objects, bg, bg2, style, relation, position, layout, seed=rng.randrange(2**31))


def scenes(seed: int, n: int, split: str = "train", n_objects: int | None = None) -> list[Scene]:
    """``n`` scenes of a split, deterministic from ``seed``."""
    rng = random.Random(f"{split}:{seed}")
    return [sample_scene(rng, split, n_objects) for _ in range(n)]


def eval_scenes(n: int = 200, seed: int = 0) -> list[Scene]:
    """The held-out evaluation set: ``n`` scenes of one or two objects (alternating), each with a
    held-out (colour, shape) pair. Three-object scenes are left out of the evaluation set: their
    objects are small and the set measures attribute binding, not crowding."""
    rng = random.Random(f"eval:{seed}")
    return [sample_scene(rng, "heldout", 1 + i % 2) for i in range(n)]


def red_circle_left_of_blue_square(n: int, seed: int = 0) -> list[Scene]:
    """``n`` "a red circle left of a blue square" scenes at random places (circle in the left
    band, square in the right one): real pictures for the Prompt-to-Prompt checks and figure."""
    rng = random.Random(seed)
    return [Scene((Obj("circle", "red", "large", rng.uniform(0.2, 0.4), rng.uniform(0.3, 0.7)),
                   Obj("square", "blue", "large", rng.uniform(0.6, 0.8), rng.uniform(0.3, 0.7))),
                  relation=(0, "left", 1), seed=k) for k in range(n)]


def one_attribute_changes(scene: Scene) -> list[Scene]:
    """Every scene whose caption differs from ``scene``'s in one attribute: the colour or the
    shape of one object (among the trained colours and shapes), the position of a lone object,
    the relation of two, the layout of three. The objects keep their places: these are the hard
    negatives of a contrastive model and the distractors of its retrieval test."""
    from dataclasses import replace

    v = vocab()
    out = []
    for i, o in enumerate(scene.objects):
        others = {(p.colour, p.shape) for k, p in enumerate(scene.objects) if k != i}
        for c in colours():
            if c != o.colour and (c, o.shape) not in others:
                out.append(replace(scene, objects=scene.objects[:i] + (replace(o, colour=c),) + scene.objects[i + 1:]))
        for s in shapes():
            if s != o.shape and (o.colour, s) not in others:
                out.append(replace(scene, objects=scene.objects[:i] + (replace(o, shape=s),) + scene.objects[i + 1:]))
    if scene.position:
        out += [replace(scene, position=p) for p in v["positions"] if p != scene.position]
    if scene.relation:
        i, rel, j = scene.relation
        out += [replace(scene, relation=(i, r, j)) for r in v["relations"] if r != rel]
    if scene.layout:
        out += [replace(scene, layout=lay) for lay in ("row", "column") if lay != scene.layout]
    return out


def place_twin(scene: Scene, rng: random.Random) -> Scene:
    """The scene with its objects moved so that its place reads otherwise: a lone object at
    another position (its jitter kept), two objects in another relation (their coordinates
    swapped along an axis, or mirrored across the diagonal), three in the other layout (mirrored
    across the diagonal). Colours, shapes, sizes, background and texture stay: the picture of a
    place change, where ``one_attribute_changes`` changes only the caption."""
    from dataclasses import replace

    v = vocab()
    flip = lambda o: replace(o, x=o.y, y=o.x)  # noqa: E731  across the diagonal: rows become columns
    if scene.position:
        new = rng.choice([p for p in v["positions"] if p != scene.position])
        (x0, y0), (x1, y1) = v["positions"][scene.position]["xy"], v["positions"][new]["xy"]
        o = scene.objects[0]
        return replace(scene, position=new, objects=(replace(o, x=round(o.x - x0 + x1, 4), y=round(o.y - y0 + y1, 4)),))
    if scene.relation:
        i, rel, j = scene.relation
        new = rng.choice([r for r in v["relations"] if r != rel])
        objs = list(scene.objects)
        horizontal = {"left": True, "right": True, "above": False, "below": False}
        if horizontal[rel] != horizontal[new]:
            objs = [flip(o) for o in objs]
            rel = {"left": "above", "right": "below", "above": "left", "below": "right"}[rel]
        if rel != new:  # the other way along the same axis: the two objects trade that coordinate
            a, b = objs[i], objs[j]
            if horizontal[new]:
                objs[i], objs[j] = replace(a, x=b.x), replace(b, x=a.x)
            else:
                objs[i], objs[j] = replace(a, y=b.y), replace(b, y=a.y)
        return replace(scene, relation=(i, new, j), objects=tuple(objs))
    if scene.layout:
        return replace(scene, layout="column" if scene.layout == "row" else "row",
                       objects=tuple(flip(o) for o in scene.objects))
    return scene


def change_kind(scene: Scene, changed: Scene) -> str:
    """What ``one_attribute_changes`` changed: "colour", "shape" or "place" (the position,
    relation or layout)."""
    if [o.colour for o in scene.objects] != [o.colour for o in changed.objects]:
        return "colour"
    if [o.shape for o in scene.objects] != [o.shape for o in changed.objects]:
        return "shape"
    return "place"
