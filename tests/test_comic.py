"""The comic workflow on the bundled model: a six-panel storyboard with one LoRA character, the draft
pass and its contact sheet, a re-rolled panel, the final pass and the page (PNG, PDF, CBZ), a
re-run that reproduces every file, and bad storyboards as one line each."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile

import pytest
from conftest import need
from PIL import Image
from server_helpers import shared_studio

from danqing.apps.comic import ComicProject, panel_prompt, read_storyboard
from danqing.errors import InvalidRequest
from danqing.synthetic.evaluate import detect
from danqing.synthetic.scenes import shapes

# the character is the red heart of the bundled heart-character LoRA (danqing-tiny never learnt the shape:
# without the LoRA it draws no heart at all); each scene line adds one other object. Over the
# storyboard seeds 100, 200, ..., 800 the heart is in 5.5 of 6 panels on average and never in
# fewer than 5 (docs/apps.md); seed 200 is one with 6, so that the last bit of floating-point
# difference between machines cannot move the count across the bound.
# hires_scale = 1: danqing-tiny paints at 64x64 only (a real model's storyboard sets 2).
STORY = '''
title = "The red heart's day"
sampler = "DPM++ 2M"
schedule = "Karras"
steps = 20
seed = 200
negative_prompt = "blurry"
hires_scale = 1

[characters.heart]
trigger = "a red heart"
tags = "<lora:heart-character:1>"

[layout]
columns = 3

[[panels]]
scene = "{heart} left of a blue circle"
caption = "Morning"
bubbles = [{ text = "Hello!", x = 0.7, y = 0.2 }]

[[panels]]
scene = "{heart} right of a green square"
caption = "中午"
bubbles = [{ text = "你好", x = 0.3, y = 0.2 }]

[[panels]]
scene = "{heart} above a yellow triangle"
caption = "Afternoon"

[[panels]]
scene = "{heart} below a purple ring"
caption = "Evening"

[[panels]]
scene = "{heart} left of an orange cross"
caption = "Night"

[[panels]]
scene = "{heart} right of a blue square"
caption = "The end"
'''
OTHERS = [("blue", "circle"), ("green", "square"), ("yellow", "triangle"), ("purple", "ring"), ("orange", "cross"),
          ("blue", "square")]
SHAPES = (*shapes(), "heart")  # the evaluator's shapes and the character's


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("comic")
    (root / "story.toml").write_text(STORY, encoding="utf-8")
    comic = ComicProject(root / "story.toml")
    studio = shared_studio()
    sheet = comic.draft(studio)
    files = comic.render(studio)
    return comic, sheet, files


def test_six_panels_keep_the_character_and_make_a_page(rendered):
    comic, sheet, files = rendered
    finals = [Image.open(comic.folder / "final" / f"panel-{i:02d}.png") for i in range(1, 7)]
    found = [{(d.colour, d.shape) for d in detect(im, shape_names=SHAPES)} for im in finals]
    heart = sum(("red", "heart") in f for f in found)
    others = sum(o in f for o, f in zip(OTHERS, found))
    print(f"character in {heart}/6 panels, the scene's other object in {others}/6")
    assert heart >= 5 and others >= 4
    # infotext: re-creatable, the LoRA named with its hash
    assert finals[0].text["parameters"].startswith("a red heart left of a blue circle, <lora:heart-character:1>")
    assert "Lora hashes: \"heart-character: " in finals[0].text["parameters"]
    assert Image.open(sheet).size[0] > 6 * 64  # six drafts side by side
    page = Image.open(comic.folder / "page-1.png")
    assert page.size[0] > 3 * 64 and page.size[1] > 2 * 64  # three columns, two rows
    assert [p.name for p in files] == ["page-1.png", "comic.pdf", "comic.cbz"]
    with zipfile.ZipFile(comic.folder / "comic.cbz") as z:
        assert z.namelist() == ["page-001.png"] and z.read("page-001.png") == (comic.folder / "page-1.png").read_bytes()
    state = json.loads(comic.state_path.read_text())
    assert state["seeds"] == list(range(200, 206)) and state["prompts"][1] == "a red heart right of a green square, <lora:heart-character:1>"


def test_the_pdf_renders(rendered, tmp_path):
    need(shutil.which("pdftoppm") is not None, "pdftoppm", "apt-get install poppler-utils")
    comic, _, _ = rendered
    subprocess.run(["pdftoppm", "-png", "-r", "72", str(comic.folder / "comic.pdf"), str(tmp_path / "p")], check=True)
    out = Image.open(next(tmp_path.glob("p*.png"))).convert("RGB")
    page = Image.open(comic.folder / "page-1.png").convert("RGB")
    assert abs(out.size[0] - page.size[0]) <= 1 and abs(out.size[1] - page.size[1]) <= 1


def test_running_the_project_again_gives_the_same_files(rendered, tmp_path):
    comic, _, _ = rendered
    again = ComicProject(comic.source, tmp_path / "again")
    again.render(shared_studio())
    for name in ["final/panel-01.png", "final/panel-06.png", "page-1.png", "comic.pdf", "comic.cbz"]:
        assert (again.folder / name).read_bytes() == (comic.folder / name).read_bytes(), name


def test_a_rerolled_panel_keeps_its_new_seed(rendered, tmp_path):
    comic, _, _ = rendered
    copy = ComicProject(comic.source, tmp_path / "reroll")
    shutil.copytree(comic.folder / "draft", copy.folder / "draft")
    before = {i: (copy.folder / "draft" / f"panel-{i:02d}.png").read_bytes() for i in (2, 3)}
    copy.reroll(shared_studio(), 3)
    assert copy.seeds() == [200, 201, 1202, 203, 204, 205]  # kept in project.json
    assert (copy.folder / "draft" / "panel-02.png").read_bytes() == before[2]
    assert (copy.folder / "draft" / "panel-03.png").read_bytes() != before[3]
    with pytest.raises(InvalidRequest, match="panels 1-6"):
        copy.reroll(shared_studio(), 7)


def test_storyboards_from_text_and_bad_ones(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("一个红色的圆形\n\na blue square\n", encoding="utf-8")
    story = read_storyboard(text)
    assert [panel_prompt(story, p) for p in story.panels] == ["一个红色的圆形", "a blue square"]
    bad = tmp_path / "bad.toml"
    bad.write_text('title = "x"\n[[panels]]\nscene = \n', encoding="utf-8")
    with pytest.raises(InvalidRequest, match=r"bad.toml: not valid TOML: .*line 3"):
        read_storyboard(bad)
    bad.write_text('[characters.ann]\ntrigger = "a girl"\n[[panels]]\nscene = "{bob} waves"\n', encoding="utf-8")
    with pytest.raises(InvalidRequest, match="unknown character 'bob'; characters: ann"):
        read_storyboard(bad)
    bad.write_text('[[panels]]\nscene = "x"\nsteps = 3\n', encoding="utf-8")
    with pytest.raises(InvalidRequest, match="panels.0.steps: Extra inputs are not permitted"):
        read_storyboard(bad)
    with pytest.raises(InvalidRequest, match="no such file"):
        read_storyboard(tmp_path / "missing.toml")
