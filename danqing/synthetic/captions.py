"""English and Chinese captions of scenes, and the inverse: a prompt read back into a :class:`Spec`.

``caption(scene, lang)`` without ``rng`` gives the canonical phrasing used for evaluation
("a red circle left of a blue star", "红色的圆形在蓝色星形的左边"); with ``rng`` one of several
phrasings (sizes, positions, inverse relations, backgrounds) for training.
"""

from __future__ import annotations

import random
import re

from danqing.synthetic.scenes import Obj, Scene, Spec, colour_info, novel_colours, shape_zh, vocab

LANGS = ("en", "zh")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _obj_en(o: Obj, rng: random.Random | None) -> str:
    words = [o.colour, o.shape]
    if rng is not None and rng.random() < 0.4:
        words.insert(0, rng.choice(vocab()["sizes"][o.size]["en"]))
    return f"{_article(words[0])} {' '.join(words)}"


def _obj_zh(o: Obj, rng: random.Random | None, subject: bool = False) -> str:
    v = vocab()
    colour, shape = colour_info(o.colour)["zh"], shape_zh(o.shape)
    de = subject if rng is None else rng.random() < 0.5
    text = f"{colour}的{shape}" if de else f"{colour}{shape}"
    if rng is not None and rng.random() < 0.3:
        text = f"{v['sizes'][o.size]['zh']}的{text}" if not de else f"{v['sizes'][o.size]['zh']}{text}"
    return text


def _background(scene: Scene, lang: str, rng: random.Random) -> str:
    v = vocab()
    style = v["background_styles"][scene.style][lang]
    if lang == "en":
        words = scene.background if scene.style == "plain" and rng.random() < 0.5 else f"{scene.background} {style}"
        if scene.style == "plain" and words == scene.background and rng.random() < 0.3:
            words = f"plain {scene.background}"
        return f", on {_article(words)} {words} background"
    colour = v["backgrounds"][scene.background]["zh"]
    return f"，{colour}{'' if scene.style == 'plain' else style}背景"


def caption(scene: Scene, lang: str = "en", rng: random.Random | None = None) -> str:
    """A caption of ``scene`` in ``lang`` ("en" or "zh"); canonical when ``rng`` is None."""
    if lang not in LANGS:
        raise ValueError(f"unknown caption language {lang!r}; allowed: {', '.join(LANGS)}")
    v = vocab()
    objs = scene.objects
    pick = (lambda xs: xs[0]) if rng is None else rng.choice
    if len(objs) == 1:
        o = objs[0]
        if lang == "en":
            text = _obj_en(o, rng)
            if scene.position and (rng is None or rng.random() < 0.7):
                text += " " + pick(v["positions"][scene.position]["en"])
        else:
            text = ("一个" if rng is None or rng.random() < 0.6 else "") + _obj_zh(o, rng, subject=True)
            if scene.position and (rng is None or rng.random() < 0.7):
                text += v["positions"][scene.position]["zh"]
    elif len(objs) == 2:
        i, rel, j = scene.relation
        if rng is not None and rng.random() < 0.4:  # "B right of A" for "A left of B"
            i, rel, j = j, v["relations"][rel]["inverse"], i
        if lang == "en":
            text = pick(v["relations"][rel]["en"]).format(a=_obj_en(objs[i], rng), b=_obj_en(objs[j], rng))
        else:
            text = pick(v["relations"][rel]["zh"]).format(a=_obj_zh(objs[i], rng, True), b=_obj_zh(objs[j], rng))
    else:
        if lang == "en":
            a, b, c = (_obj_en(o, rng) for o in objs)
            order = "from left to right" if scene.layout == "row" else "from top to bottom"
            text = pick([f"{a}, {b} and {c} {order}", f"{order}: {a}, {b} and {c}"])
        else:
            a, b, c = (_obj_zh(o, rng) for o in objs)
            order = "从左到右" if scene.layout == "row" else "从上到下"
            text = f"{order}依次是{a}、{b}和{c}"
    if rng is not None and rng.random() < 0.5:
        text += _background(scene, lang, rng)
    return text


# ---------------------------------------------------------------------------------------------
# Reading a prompt back into a Spec
# ---------------------------------------------------------------------------------------------
def parse_prompt(prompt: str) -> Spec:
    """The :class:`Spec` a prompt of the shapes world asks for, English or Chinese.

    Finds "<colour> <shape>" phrases in order, a relation between the first two ("left of",
    "to the right of", "above", "under", "在...的左边", ...), a position for a single object,
    and "from left to right" / "从左到右" for three. Raises ValueError when no object is named.
    """
    v = vocab()
    names = list(v["shapes"]) + [k for k in v["novel_shapes"] if not k.startswith("_")]
    colour_names = list(v["colours"]) + novel_colours()
    text = prompt.lower()
    zh = any("\u4e00" <= ch <= "\u9fff" for ch in prompt)
    if zh:
        cz = {colour_info(k)["zh"]: k for k in colour_names}
        sz = {shape_zh(k): k for k in names}
        pat = re.compile(f"({'|'.join(map(re.escape, cz))})的?({'|'.join(map(re.escape, sz))})")
        found = [(m.start(), m.end(), (sz[m.group(2)], cz[m.group(1)])) for m in pat.finditer(prompt)]
        rel_words = {"左": "left", "右": "right", "上": "above", "下": "below"}
        pos_words = {"左": "left", "右": "right", "上": "top", "下": "bottom", "中": "centre"}
    else:
        pat = re.compile(rf"\b({'|'.join(colour_names)})\s+({'|'.join(names)})s?\b")
        found = [(m.start(), m.end(), (m.group(2), m.group(1))) for m in pat.finditer(text)]
    if not found:
        raise ValueError(f"no '<colour> <shape>' object in the prompt {prompt!r}; colours: "
                         f"{', '.join(v['colours'])}; shapes: {', '.join(v['shapes'])}")
    objects = tuple(f[2] for f in found)
    relation = position = layout = None
    if len(found) >= 2:
        if zh:
            between = prompt[found[0][1]:found[1][0]]
            after = prompt[found[1][1]:found[1][1] + 6]
            if "在" in between:
                for ch, rel in rel_words.items():
                    if ch in after:
                        relation = (0, rel, 1)
                        break
        else:
            between = text[found[0][1]:found[1][0]]
            for words, rel in ((("left of",), "left"), (("right of",), "right"),
                               (("above", "over"), "above"), (("below", "under", "beneath"), "below")):
                if any(w in between for w in words):
                    relation = (0, rel, 1)
                    break
    if len(found) == 3:
        if ("从左到右" in prompt) or ("left to right" in text):
            layout = "row"
        elif ("从上到下" in prompt) or ("top to bottom" in text):
            layout = "column"
    if len(found) == 1:
        rest = prompt[found[0][1]:] if zh else text[found[0][1]:]
        if zh:
            m = re.search("在(左|右|上|下|中)", rest)
            position = pos_words[m.group(1)] if m else None
        else:
            for name, d in v["positions"].items():
                if any(p in rest for p in d["en"]):
                    position = name
                    break
    return Spec(objects, relation, position, layout)
