"""English and Chinese captions of portraits, and the inverse: a prompt read back into the
attributes it asks for.

``portrait_caption(p, lang)`` without ``rng`` gives the canonical phrasing used for evaluation
("a portrait of a person with a round face, pale skin, long red hair and green eyes, wearing
glasses, smiling, in a blue shirt, facing forward, on a light blue background, ink drawing";
"圆脸、白肤色、红色长发、绿眼睛、戴眼镜、微笑、蓝衣服、墨线画"); with ``rng`` one of several
phrasings for training. A pencil picture shows no colour, so its captions name no colour.
With ``drop`` > 0 a training caption leaves each identity word out with that chance (head, skin,
hair colour, hair style, eyes) and shuffles the face words among the rest: attribute dropout, so
the model learns what each word draws on its own rather than the combinations it was shown.

A Chinese character costs CLIP's tokenizer about three of its 77 tokens, so Chinese captions
use short words joined by "、" and name pose and background only when they fit
(:data:`ZH_BUDGET`).
"""

from __future__ import annotations

import random
import re

from danqing.synthetic.portraits import ATTRIBUTES, Portrait, shows_colour, values, visible, vocab

LANGS = ("en", "zh")
ZH_BUDGET = 75   # tokens, estimated as 3 per Chinese character and 1 per "、"


def _en_words(attribute: str, value: str) -> list[str]:
    w = vocab()[attribute][value]["en"]
    return w if isinstance(w, list) else [w]


def _hair_en(p: Portrait, colour: bool, style: bool = True) -> str:
    c = f"{p.person.hair_colour} " if colour else ""
    return vocab()["hair_style"][p.person.hair_style]["en"].format(colour=c) if style else f"{c}hair"


def _kept(rng: random.Random | None, drop: float) -> dict[str, bool]:
    """Which identity words a caption names (all of them unless ``drop`` leaves some out)."""
    words = ("head", "skin", "hair_colour", "hair_style", "eyes")
    return {w: rng is None or drop <= 0 or rng.random() >= drop for w in words}


def _parts_en(p: Portrait, rng: random.Random | None, drop: float = 0.0) -> tuple[list[str], str]:
    """(attribute phrases after "with", style phrase)."""
    pick = (lambda xs: xs[0]) if rng is None else rng.choice
    colour = shows_colour(p.style)
    who = p.person
    keep = _kept(rng, drop)
    if drop > 0 and rng is not None:
        face = [f"a {who.head} face"] * keep["head"] + [f"{who.skin} skin"] * (colour and keep["skin"])
        if keep["hair_style"] or (colour and keep["hair_colour"]):
            face.append(_hair_en(p, colour and keep["hair_colour"], keep["hair_style"]))
        face += [f"{who.eyes} eyes"] * (colour and keep["eyes"])
    else:
        hair = _hair_en(p, colour)
        face = [f"a {who.head} face"]
        if colour:
            face.append(f"{who.skin} skin")
        face.append(f"{hair} and {who.eyes} eyes" if colour else hair)
    rest = []
    if who.glasses == "yes" or (rng is not None and rng.random() < 0.3):
        rest.append(_en_words("glasses", who.glasses)[0])
    rest.append(pick(_en_words("mouth", p.mouth)))
    if colour:
        rest.append(f"in {'a' if rng is None else rng.choice(['a', 'a', 'a plain'])} "
                    f"{p.clothing} {pick(['shirt', 'top', 'sweater'])}")
    if rng is None or rng.random() < 0.75:
        rest.append(pick(vocab()["pose"][p.pose]["en"]))
    if colour and (rng is None or rng.random() < 0.75):
        rest.append(f"on a {vocab()['background'][p.background]['en']} background")
    if rng is not None and drop > 0:
        face, rest = [], face + rest
    if rng is not None:
        rng.shuffle(rest)
    return face + rest, pick(vocab()["style"][p.style]["en"])


def _join_en(parts: list[str]) -> str:
    return ", ".join(parts)


def _cost_zh(text: str) -> int:
    return sum(1 if ch == "、" else 3 for ch in text)


def _parts_zh(p: Portrait, rng: random.Random | None, drop: float = 0.0) -> list[str]:
    v = vocab()
    colour = shows_colour(p.style)
    who = p.person
    keep = _kept(rng, drop)
    hair_colour = v["hair_colour"][who.hair_colour]["zh"] if colour and keep["hair_colour"] else ""
    hair = hair_colour + v["hair_style"][who.hair_style]["zh"] if keep["hair_style"] else (
        f"{hair_colour}头发" if hair_colour else "")
    parts = [v["head"][who.head]["zh"]] if keep["head"] else []
    if colour and keep["skin"]:
        parts.append(v["skin"][who.skin]["zh"])
    if hair:
        parts.append(hair)
    if colour and keep["eyes"]:
        parts.append(f"{v['eyes'][who.eyes]['zh']}眼睛")
    if who.glasses == "yes":
        parts.append(v["glasses"]["yes"]["zh"])
    parts.append(v["mouth"][p.mouth]["zh"])
    if colour:
        parts.append(f"{v['clothing'][p.clothing]['zh']}衣服")
    style = v["style"][p.style]["zh"]
    if rng is None:
        return parts + [style]
    rng.shuffle(parts)
    extra = [v["pose"][p.pose]["zh"]]
    if colour:
        extra.append(f"{v['background'][p.background]['zh']}背景")
    rng.shuffle(extra)
    for e in extra:
        if rng.random() < 0.6 and _cost_zh("、".join(parts + [e, style])) <= ZH_BUDGET:
            parts.append(e)
    return parts + [style]


def portrait_caption(p: Portrait, lang: str = "en", rng: random.Random | None = None, drop: float = 0.0) -> str:
    """A caption of ``p`` in ``lang`` ("en" or "zh"); canonical when ``rng`` is None; with ``rng``
    and ``drop`` > 0, each identity word left out with chance ``drop`` (the module's docstring)."""
    if lang not in LANGS:
        raise ValueError(f"unknown caption language {lang!r}; allowed: {', '.join(LANGS)}")
    if lang == "zh":
        return "、".join(_parts_zh(p, rng, drop))
    parts, style = _parts_en(p, rng, drop)
    if rng is None:
        return f"a portrait of a person with {_join_en(parts)}, {style}"
    subject = rng.choice(["a portrait of a person", "a portrait of someone", "a picture of a person",
                          "a cartoon person", "a character"])
    if rng.random() < 0.5:
        return f"{subject} with {_join_en(parts)}, {style}"
    art = "an" if style[0] in "aeiou" else "a"
    return f"{art} {style} of a person with {_join_en(parts)}" if "drawing" in style or "sketch" in style \
        else f"{subject} with {_join_en(parts)}, {style}"


# ---------------------------------------------------------------------------------------------
# Reading a prompt back into the attributes it asks for
# ---------------------------------------------------------------------------------------------
def _alt(words) -> str:
    return "|".join(map(re.escape, sorted(words, key=len, reverse=True)))


def _find_en(text: str) -> dict[str, str]:
    v = vocab()
    out: dict[str, str] = {}
    en = lambda a: {w: k for k in values(a) for w in _en_words(a, k) if w}  # noqa: E731
    simple = {"head": r"\b({})\s+face", "skin": r"\b({})\s+skin", "hair_colour": r"\b({})\s+hair",
              "eyes": r"\b({})\s+eyes", "clothing": r"\b({})\s+(?:shirt|top|sweater|t-shirt|jacket)"}
    for attr, pat in simple.items():
        m = re.search(pat.format(_alt(values(attr))), text)
        if m:
            out[attr] = m.group(1)
    cols = _alt(values("hair_colour"))
    m = re.search(rf"\b(short|long|spiky)\s+(?:(?:{cols})\s+)?hair", text)
    if m:
        out["hair_style"] = m.group(1)
    elif re.search(r"\bbun\b", text):
        out["hair_style"] = "bun"
    out["glasses"] = "no" if re.search(r"\b(without|no)\s+glasses", text) else (
        "yes" if "glasses" in text else "no")
    for attr in ("mouth", "pose", "style"):
        words = en(attr)
        m = re.search(rf"\b({_alt(words)})\b", text)
        if m:
            out[attr] = words[m.group(1)]
    if "style" not in out:
        m = re.search(r"\b(flat|ink|pencil)\b", text)
        if m:
            out["style"] = m.group(1)
    bg = {v["background"][k]["en"]: k for k in values("background")}
    m = re.search(rf"\b({_alt(bg)})\s+background", text)
    if m:
        out["background"] = bg[m.group(1)]
    return out


def _find_zh(text: str) -> dict[str, str]:
    v = vocab()
    zh = lambda a: {v[a][k]["zh"]: k for k in values(a)}  # noqa: E731
    out: dict[str, str] = {}
    for attr in ("head", "skin", "mouth", "pose", "style"):
        m = re.search(_alt(zh(attr)), text)
        if m:
            out[attr] = zh(attr)[m.group(0)]
    m = re.search(f"({_alt(zh('hair_colour'))})?({_alt(zh('hair_style'))})", text)
    if m:
        out["hair_style"] = zh("hair_style")[m.group(2)]
        if m.group(1):
            out["hair_colour"] = zh("hair_colour")[m.group(1)]
    m = re.search(f"({_alt(zh('hair_colour'))})头发", text)
    if m:
        out["hair_colour"] = zh("hair_colour")[m.group(1)]
    for attr, pat in (("eyes", "({})色?的?眼睛"), ("clothing", "穿?({})色?的?衣服"), ("background", "({})色?背景")):
        m = re.search(pat.format(_alt(zh(attr))), text)
        if m:
            out[attr] = zh(attr)[m.group(1)]
    out["glasses"] = "no" if "不戴眼镜" in text else ("yes" if "眼镜" in text else "no")
    return out


def parse_portrait_prompt(prompt: str) -> dict[str, str]:
    """The attributes a portrait prompt asks for (English or Chinese), ``{attribute: value}``.

    Glasses are always asked ("no" unless the prompt names glasses); the style is asked when
    named. A pencil prompt's colour words, if any, are dropped (a pencil picture shows none).

    Raises:
        ValueError: the prompt names no attribute of the portrait world (glasses aside).
    """
    zh = any("\u4e00" <= ch <= "\u9fff" for ch in prompt)
    found = _find_zh(prompt) if zh else _find_en(prompt.lower())
    if len(found) <= 1:
        raise ValueError(f"no portrait attribute in the prompt {prompt!r}; it should name e.g. a face shape "
                         f"({', '.join(values('head'))}), a hair colour and style, eye colour, a style "
                         f"({', '.join(values('style'))})")
    if found.get("style") and not shows_colour(found["style"]):
        seen = visible(found["style"])
        found = {a: val for a, val in found.items() if a in seen}
    return {a: found[a] for a in ATTRIBUTES if a in found}
