"""Short and detailed captions of shapes scenes, and a rule-based prompt expander (DALL-E 3's
lesson, Betker et al. 2023: a model trained on detailed synthetic captions follows prompts
better, and a short prompt is expanded into such a caption before generation).

- ``short_caption``: what alt-text says -- the objects and nothing else ("a red circle and a
  blue star"): no size, place, relation or background.
- ``detailed_caption``: everything in the picture, in one fixed order: how many objects, the
  background, each object with its size, colour, shape and place (read off its centre), and the
  relation or layout between them.
- ``expand_prompt``: a user's prompt ("a red circle left of a blue star") read by the evaluator's
  ``parse_prompt`` into a scene (what is unsaid filled in with the world's defaults: large
  objects, a plain white background, the first of two objects on the left, three in a row) and
  written as its detailed caption.
"""

from __future__ import annotations

from danqing.synthetic.scenes import Obj, Scene, Spec, colour_info, shape_zh, vocab

STYLES = ("varied", "short", "detailed")  # training-caption styles (data.captions); "varied": captions.caption
_COUNT = {"en": {1: "one object", 2: "two objects", 3: "three objects"}, "zh": {1: "一个物体", 2: "两个物体", 3: "三个物体"}}
_WHERE_EN = {("top", "left"): "at the top left", ("top", "centre"): "at the top", ("top", "right"): "at the top right",
             ("middle", "left"): "on the left", ("middle", "centre"): "in the centre", ("middle", "right"): "on the right",
             ("bottom", "left"): "at the bottom left", ("bottom", "centre"): "at the bottom",
             ("bottom", "right"): "at the bottom right"}
_WHERE_ZH = {("top", "left"): "左上方", ("top", "centre"): "上方", ("top", "right"): "右上方",
             ("middle", "left"): "左边", ("middle", "centre"): "中间", ("middle", "right"): "右边",
             ("bottom", "left"): "左下方", ("bottom", "centre"): "下方", ("bottom", "right"): "右下方"}
_REL_EN = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_REL_ZH = {"left": "左边", "right": "右边", "above": "上方", "below": "下方"}


def where(o: Obj) -> tuple[str, str]:
    """(row, column) of an object's centre in thirds of the picture, as the evaluator's
    positions read it (left < 0.4 < centre < 0.6 < right)."""
    row = "top" if o.y < 0.4 else "bottom" if o.y > 0.6 else "middle"
    col = "left" if o.x < 0.4 else "right" if o.x > 0.6 else "centre"
    return row, col


def _name_en(o: Obj) -> str:
    return f"{o.colour} {o.shape}"


def _name_zh(o: Obj) -> str:
    return f"{colour_info(o.colour)['zh']}{shape_zh(o.shape)}"


def _join(items: list[str], lang: str) -> str:
    if len(items) == 1:
        return items[0]
    if lang == "en":
        return ", ".join(items[:-1]) + " and " + items[-1]
    return "、".join(items[:-1]) + "和" + items[-1]


def short_caption(scene: Scene, lang: str = "en") -> str:
    """The objects only: "a red circle and a blue star" / "红色圆形和蓝色星形"."""
    if lang == "en":
        return _join([f"{'an' if o.colour[0] in 'aeiou' else 'a'} {_name_en(o)}" for o in scene.objects], lang)
    return _join([_name_zh(o) for o in scene.objects], lang)


def detailed_caption(scene: Scene, lang: str = "en") -> str:
    """Every object with size, colour, shape and place, the background, and the relation or
    layout, e.g. "two objects on a plain white background: a large red circle on the left and a
    small blue star on the right; the red circle is left of the blue star"."""
    v = vocab()
    objs, n = scene.objects, len(scene.objects)
    if lang == "en":
        style = v["background_styles"][scene.style]["en"]
        parts = [f"a {o.size} {_name_en(o)} {_WHERE_EN[where(o)]}" for o in objs]
        text = f"{_COUNT['en'][n]} on a {style} {scene.background} background: {_join(parts, 'en')}"
        if scene.relation is not None:
            i, rel, j = scene.relation
            text += f"; the {_name_en(objs[i])} is {_REL_EN[rel]} the {_name_en(objs[j])}"
        elif scene.layout is not None:
            text += "; in a row from left to right" if scene.layout == "row" else "; in a column from top to bottom"
        return text
    style = v["background_styles"][scene.style]["zh"]
    bg = v["backgrounds"][scene.background]["zh"]
    parts = [f"{_WHERE_ZH[where(o)]}是一个{v['sizes'][o.size]['zh']}的{_name_zh(o)}" for o in objs]
    text = f"{bg}{style}背景上有{_COUNT['zh'][n]}：{'，'.join(parts)}"
    if scene.relation is not None:
        i, rel, j = scene.relation
        text += f"；{_name_zh(objs[i])}在{_name_zh(objs[j])}的{_REL_ZH[rel]}"
    elif scene.layout is not None:
        text += "；从左到右排成一行" if scene.layout == "row" else "；从上到下排成一列"
    return text


def scene_of_spec(spec: Spec) -> Scene:
    """The scene a prompt's ``Spec`` describes, with the world's defaults for what it leaves
    unsaid: one or two objects large, three small; a lone object where its position says (else
    the centre); two side by side as the relation says (else the first on the left); three in a
    row unless a column is asked; a plain white background."""
    v = vocab()
    objs = spec.objects[:3]
    n = len(objs)
    relation, position, layout = spec.relation, spec.position, spec.layout
    if n == 1:
        position = position or "centre"
        xy = [tuple(v["positions"][position]["xy"])]
    elif n == 2:
        relation = relation or (0, "left", 1)
        _, rel, _ = relation
        near, far = 0.27, 0.73
        a, b = (near, far) if rel in ("left", "above") else (far, near)
        xy = [(a, 0.5), (b, 0.5)] if rel in ("left", "right") else [(0.5, a), (0.5, b)]
    else:
        layout = layout or "row"
        xy = [((t, 0.5) if layout == "row" else (0.5, t)) for t in (0.2, 0.5, 0.8)]
    size = "small" if n == 3 else "large"
    objects = tuple(Obj(shape, colour, size, x, y) for (shape, colour), (x, y) in zip(objs, xy))
    return Scene(objects, "white", "light grey", "plain", relation if n == 2 else None,
                 position if n == 1 else None, layout if n == 3 else None)


def expand_prompt(prompt: str, lang: str | None = None) -> str:
    """A prompt of the shapes world as a detailed caption (``lang``: the prompt's own language
    when None). Raises ValueError when the prompt names no "<colour> <shape>" object."""
    from danqing.synthetic.captions import parse_prompt

    if lang is None:
        lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in prompt) else "en"
    return detailed_caption(scene_of_spec(parse_prompt(prompt)), lang)


def styled_caption(scene: Scene, lang: str, style: str, rng=None) -> str:
    """A training caption of ``scene`` in one of ``STYLES``."""
    if style == "short":
        return short_caption(scene, lang)
    if style == "detailed":
        return detailed_caption(scene, lang)
    from danqing.synthetic.captions import caption

    return caption(scene, lang, rng)
