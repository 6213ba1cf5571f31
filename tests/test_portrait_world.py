"""The portrait studio on the portrait world (danqing/apps/portrait_world.py): a held-out person
written as `portrait add` writes one, the world's style templates, and the judge of a styled
picture, checked on rendered ground truth (docs/apps.md, "A person LoRA in the portrait world")."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from danqing.apps.portrait_people import load_person
from danqing.apps.portrait_styles import get_style
from danqing.apps.portrait_world import (judge_styled, person_caption, scene_words, write_world_person,
                                         write_world_styles)
from danqing.synthetic.portraits import Portrait, person, person_mask, pictures_of, render_portrait
from danqing.synthetic.portraits_captions import parse_portrait_prompt


def test_a_world_person_is_written_as_portrait_add_writes_one(tmp_path):
    who = person("Ada")
    write_world_person(tmp_path, "ada", who, 8)
    p = load_person(tmp_path, "ada")
    assert p.trigger == "dq_ada" and p.info["size"] == 64 and p.info["world"]["eyes"] == who.eyes
    # the look in words, as the reader reads it in most pictures: what the trigger's vectors start from
    assert p.info["description"] == "a oval face, pale skin, brown hair in a bun, brown eyes, without glasses"
    assert {k: v for k, v in parse_portrait_prompt(p.info["description"]).items()
            if k in ("head", "skin", "hair_colour", "hair_style", "eyes", "glasses")} == {
        "head": who.head, "skin": who.skin, "hair_colour": who.hair_colour, "hair_style": who.hair_style,
        "eyes": who.eyes, "glasses": who.glasses}
    crops = sorted((p.folder / "train").glob("*.png"))
    assert len(crops) == 8
    for crop, pic in zip(crops, pictures_of(who, 8, seed=0)):
        caption = crop.with_suffix(".txt").read_text(encoding="utf-8")
        assert caption == person_caption(pic, "dq_ada") and caption.startswith("a photo of dq_ada, head and shoulders, ")
        assert not any(w in caption for w in ("hair", "eyes", "skin", "glasses")), caption  # the trigger is the looks
        asked = parse_portrait_prompt(caption)  # the caption says the picture's own scene
        assert asked["style"] == pic.style
        with Image.open(crop) as im:  # the picture, and where the person is as its alpha (the masked loss)
            assert im.mode == "RGBA" and np.array_equal(np.asarray(im.convert("RGB")), np.asarray(render_portrait(pic)))
            alpha = np.asarray(im.getchannel("A"))
        assert np.array_equal(alpha, np.asarray(person_mask(pic)))
        assert alpha[2, 2] == 0 and alpha[27, 32] == 255 and alpha[62, 32] == 0  # background, face, shirt


def test_the_look_of_pencil_pictures_names_no_colour():
    from danqing.apps.portrait_world import describe_look

    who = person("Dara")
    pencil = [render_portrait(replace(p, style="pencil")) for p in pictures_of(who, 4, seed=0)]
    assert describe_look(pencil) == "a oval face, hair in a bun, wearing glasses"


def test_pencil_captions_name_no_colour():
    pic = Portrait(person("Ada"), mouth="sad", clothing="orange", pose="left", background="lemon", style="pencil")
    assert scene_words(pic) == "sad, turned to the left, pencil sketch"
    assert scene_words(replace(pic, style="flat")) == ("sad, in an orange shirt, turned to the left, "
                                                       "on a pale yellow background, flat colours")


def test_world_styles_and_the_judge_on_rendered_pictures(tmp_path):
    """Each world style loads from the home at 64 px; a rendered picture of the person in the
    style's own scene is judged the person (identity 1) with the style's look (1); another
    person, or another background, is not."""
    names = write_world_styles(tmp_path)
    assert names == ["world-id-photo", "world-ink", "world-lavender", "world-pencil"]
    ada, bai = person("Ada"), person("Bai")
    for name in names:
        style = get_style(name, tmp_path)
        assert (style.width, style.height, style.source) == (64, 64, "user")
        prompt = style.prompt.replace("{trigger}", "dq_ada")
        asked = parse_portrait_prompt(prompt)
        scene = {k: asked.get(k, d) for k, d in (("mouth", "smiling"), ("clothing", "blue"), ("pose", "front"),
                                                  ("background", "sky"), ("style", "flat"))}
        right = judge_styled(render_portrait(Portrait(ada, **scene)), ada, prompt)
        assert right["identity"] == 1.0 and right["look"] == 1.0, (name, right)
        assert judge_styled(render_portrait(Portrait(bai, **scene)), ada, prompt)["identity"] == 0.0, name
        if "background" in asked:
            other = "grey" if asked["background"] != "grey" else "sky"
            wrong = judge_styled(render_portrait(Portrait(ada, **{**scene, "background": other})), ada, prompt)
            assert wrong["identity"] == 1.0 and wrong["look"] == 0.0, (name, wrong)
