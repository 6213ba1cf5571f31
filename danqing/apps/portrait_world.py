"""The portrait studio on the portrait world (``synthetic.portraits``): a held-out person as
``portrait add`` writes one, and the measurement of their LoRA (docs/apps.md, "A person LoRA in
the portrait world").

A person's pictures are rendered, not photographed, so no face model finds their faces: they are
written straight into ``people/NAME/`` (the crops ``portrait add`` would make, captioned as it
captions them). Where ``portrait add`` asks a captioner what is in a photo, the rendered
picture's own expression, clothes, pose, background and style are the answer; and what the person
looks like (``describe_look``, person.json's ``description``) is what the portrait reader reads
in most of their pictures: the words a person LoRA's new trigger vectors start from.
"""

from __future__ import annotations

import json
from pathlib import Path

from danqing.apps.portrait_people import caption_for, default_trigger
from danqing.synthetic.portrait_reader import score_portrait, summarise_portraits
from danqing.synthetic.portraits import (IDENTITY, Person, Portrait, pictures_of, render_with_mask, shows_colour,
                                         vocab)


def scene_words(p: Portrait) -> str:
    """What a captioner says of a portrait besides the person: expression, clothes, pose,
    background, style (no colour words in a style that shows none)."""
    v = vocab()
    first = lambda w: w[0] if isinstance(w, list) else w  # noqa: E731
    words = [first(v["mouth"][p.mouth]["en"])]
    if shows_colour(p.style):
        words.append(f"in {'an' if p.clothing[0] in 'aeiou' else 'a'} {p.clothing} shirt")
    words.append(first(v["pose"][p.pose]["en"]))
    if shows_colour(p.style):
        words.append(f"on a {v['background'][p.background]['en']} background")
    words.append(first(v["style"][p.style]["en"]))
    return ", ".join(words)


def describe_look(pictures) -> str:
    """The person's look in words, as a tagger would give it: each identity attribute as the
    portrait reader reads it in most of ``pictures`` (an attribute no picture shows is left
    out), e.g. "a round face, brown skin, spiky black hair, amber eyes, without glasses"."""
    from collections import Counter

    from danqing.synthetic.portrait_reader import read

    reads = [read(p) for p in pictures]
    vote = {a: Counter(r[a] for r in reads if r[a] is not None).most_common(1) for a in IDENTITY}
    look = {a: v[0][0] for a, v in vote.items() if v}
    words = lambda a: (lambda w: w[0] if isinstance(w, list) else w)(vocab()[a][look[a]]["en"])  # noqa: E731
    parts = []
    if "head" in look:
        parts.append(f"a {words('head')} face")
    if "skin" in look:
        parts.append(f"{words('skin')} skin")
    if "hair_style" in look:
        parts.append(words("hair_style").format(colour=f"{words('hair_colour')} " if "hair_colour" in look else ""))
    if "eyes" in look:
        parts.append(f"{words('eyes')} eyes")
    if "glasses" in look:
        parts.append(words("glasses"))
    return ", ".join(parts)


def person_caption(p: Portrait, trigger: str) -> str:
    """A "head" crop's caption: the template with the trigger word, then the scene words."""
    return caption_for("head", trigger, scene_words(p))


def write_world_person(home: str | Path, name: str, who: Person, n: int = 8, *, size: int = 64,
                       seed: int = 0, styles: tuple[str, ...] | None = None, masks: bool = True) -> Path:
    """``people/NAME/`` with ``n`` rendered pictures of ``who`` (``pictures_of(who, n, seed)``) as
    captioned training crops, the person's identity measured by the world face backend
    (danqing-portrait-faces: the mean embedding, and the most typical picture as the best face);
    returns the person's folder."""
    import numpy as np

    from danqing.faces import load_backend
    from danqing.faces.fusion import mean_embedding

    faces = load_backend("world")
    folder = Path(home) / "people" / name
    (folder / "train").mkdir(parents=True)
    trigger = default_trigger(name)
    images, embeddings = [], []
    for i, p in enumerate(pictures_of(who, n, seed=seed, styles=styles)):
        image, mask = render_with_mask(p, size)
        images.append(image)
        picture = image.copy()
        if masks:  # the alpha channel: where the person is (a masked loss weighs it more)
            picture.putalpha(mask)
        picture.save(folder / "train" / f"{i + 1:03d}-head.png")
        (folder / "train" / f"{i + 1:03d}-head.txt").write_text(person_caption(p, trigger), encoding="utf-8")
        arr = np.asarray(images[-1])
        embeddings.append(faces.embed(arr, faces.detect(arr)[0]))
    identity = mean_embedding(embeddings)
    similarity = [float(e @ identity) for e in embeddings]
    images[int(np.argmax(similarity))].save(folder / "best-face.png")
    rows = [{"photo": f"{i + 1:03d}-head.png", "crops": f"{i + 1:03d}", "similarity": round(s, 4)}
            for i, s in enumerate(similarity)]
    info = {"name": name, "trigger": trigger, "size": size, "face_backend": faces.describe(),
            "description": describe_look(images),
            "identity": [round(float(x), 6) for x in identity], "accepted": rows, "rejected": [],
            "world": {"person": who.name, **{a: getattr(who, a) for a in IDENTITY}}}
    (folder / "person.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return folder


def measure_person_lora(studio, who: Person, name: str, *, model: str, n: int = 50, weight: float = 1.0,
                        cfg_scale: float = 7.0, seed: int = 1000, out_dir: str | Path | None = None) -> dict:
    """``n`` new pictures of ``who`` (other clothes, backgrounds, styles: ``pictures_of`` with
    seed 1000) asked for by caption, without and with ``<lora:NAME:WEIGHT>``, at the same seeds.

    Returns:
        {"without": summary, "with": summary}: ``summarise_portraits`` of each set, judged
        against the person's identity and the asked style; ``all`` is the share of pictures
        that give the person's identity (every identity attribute the style shows read right).
    """
    from danqing.synthetic.evaluate import evaluate_studio

    trigger = default_trigger(name)
    tests = pictures_of(who, n, seed=1000)
    asked = {a: getattr(who, a) for a in IDENTITY}
    out = {}
    for label, suffix in (("without", ""), ("with", f" <lora:{name}:{weight:g}>")):
        summary, _ = evaluate_studio(
            studio, tests, write=lambda p, lang: person_caption(p, trigger),
            judge=lambda img, p: score_portrait(img, {**asked, "style": p.style}), summary=summarise_portraits,
            model=model, suffix=suffix, cfg_scale=cfg_scale, seed=seed,
            out_dir=Path(out_dir) / label if out_dir is not None else None)
        out[label] = summary
    return out


def world_style_files() -> list[Path]:
    """The portrait world's style templates (``data/styles/portrait-world/``: 64 px, one
    rendering and background each), not among danqing's own: they are for danqing-tiny-portraits."""
    from importlib import resources

    folder = resources.files("danqing").joinpath("data/styles/portrait-world")
    return sorted(Path(str(f)) for f in folder.iterdir() if f.name.endswith(".toml"))


def write_world_styles(home: str | Path) -> list[str]:
    """Copy the portrait world's style templates into ``HOME/styles/portrait/`` (the user's
    templates, which ``portrait make`` and the server read); their names."""
    import shutil

    from danqing.apps.portrait_styles import USER_FOLDER

    folder = Path(home) / USER_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    files = world_style_files()
    for f in files:
        shutil.copyfile(f, folder / f.name)
    return [f.stem for f in files]


def judge_styled(image, who: Person, style_prompt: str) -> dict:
    """One picture of a style template: ``identity`` (1.0 when every identity attribute its
    style shows reads as ``who``'s), ``share`` (the share of them that do), ``look`` (the
    template's background and rendering both right, where the style shows them) and each
    attribute's 1.0/0.0 (``score_portrait``)."""
    from danqing.synthetic.portraits_captions import parse_portrait_prompt

    asked = {k: v for k, v in parse_portrait_prompt(style_prompt).items() if k not in IDENTITY}
    scores = score_portrait(image, {**{a: getattr(who, a) for a in IDENTITY}, **asked})
    shown = [scores[a] for a in IDENTITY if scores[a] is not None]
    look = [scores[a] for a in ("background", "style") if a in asked and scores[a] is not None]
    return {**scores, "identity": float(all(x == 1.0 for x in shown)), "share": sum(shown) / max(1, len(shown)),
            "look": float(all(x == 1.0 for x in look))}


__all__ = ["judge_styled", "measure_person_lora", "person_caption", "scene_words", "world_style_files",
           "write_world_person", "write_world_styles"]
