"""Short and detailed captions of the shapes world and the rule-based prompt expander
(synthetic.recaption): what each says is what the picture holds, read back by the evaluator."""

from __future__ import annotations

import pytest

from danqing.errors import InvalidRequest
from danqing.synthetic.captions import caption, parse_prompt
from danqing.synthetic.evaluate import score
from danqing.synthetic.recaption import detailed_caption, expand_prompt, scene_of_spec, short_caption, where
from danqing.synthetic.render import render
from danqing.synthetic.scenes import eval_scenes, scenes


def test_short_captions_name_the_objects_and_nothing_else():
    for s in scenes(1, 60):
        for lang in ("en", "zh"):
            spec = parse_prompt(short_caption(s, lang))
            assert spec.objects == s.spec.objects and spec.relation is None and spec.position is None and spec.layout is None


def test_detailed_captions_say_every_attribute_and_the_place_the_evaluator_reads():
    from danqing.synthetic.evaluate import detect

    for s in scenes(2, 40):
        text = detailed_caption(s)
        assert s.background in text and {1: "one", 2: "two", 3: "three"}[len(s.objects)] + " object" in text
        found = detect(render(s, 64))
        for o in s.objects:
            assert f"a {o.size} {o.colour} {o.shape}" in text
            # the place the caption gives is where the evaluator finds the object
            d = next(d for d in found if (d.shape, d.colour) == (o.shape, o.colour))
            row, col = where(o)
            clear = lambda v: min(abs(v - 0.4), abs(v - 0.6)) > 0.02  # noqa: E731  not on a third's border
            if clear(o.x):
                assert (d.x < 0.4) == (col == "left") and (d.x > 0.6) == (col == "right")
            if clear(o.y):
                assert (d.y < 0.4) == (row == "top") and (d.y > 0.6) == (row == "bottom")
        if s.relation:
            i, rel, j = s.relation
            assert f"the {s.objects[i].colour} {s.objects[i].shape} is" in text
        zh = detailed_caption(s, "zh")
        assert "背景上有" in zh and all(o.size in ("small", "large") for o in s.objects)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_expanded_prompt_describes_a_picture_that_satisfies_the_prompt(lang):
    """For the evaluator's 200 held-out prompts: the expander's scene keeps the prompt's objects,
    relation and position, and its rendering scores 1 on the evaluator against the prompt."""
    for s in eval_scenes(200):
        prompt = caption(s, lang)
        scene = scene_of_spec(parse_prompt(prompt))
        assert scene.spec == s.spec
        result = score(render(scene, 64), s.spec)
        assert result.object == 1.0 and result.relation in (None, 1.0) and result.position in (None, 1.0), prompt
        assert expand_prompt(prompt) == detailed_caption(scene, lang)
    assert expand_prompt("a red circle").startswith("one object on a plain white background: a large red circle in the centre")
    with pytest.raises(ValueError, match="no '<colour> <shape>' object"):
        expand_prompt("a cat")


def test_the_dataset_takes_a_caption_style():
    from danqing.training.config import BaseTrainConfig
    from danqing.training.data import synthetic_dataset

    d = synthetic_dataset(3, 64, 0, 1, captions="detailed")
    assert d.captions == [[detailed_caption(s)] for s in d.scenes]
    assert synthetic_dataset(3, 64, 0, 1, captions="short").captions == [[short_caption(s)] for s in d.scenes]
    with pytest.raises(InvalidRequest, match="unknown caption style 'long'"):
        synthetic_dataset(3, 64, 0, 1, captions="long")
    with pytest.raises(Exception, match="captions"):
        BaseTrainConfig.model_validate({"data": {"captions": "long"}})


def test_eval_shapes_expand_generates_from_the_expanded_prompts(tmp_path):
    """``eval shapes --expand``: each held-out prompt goes through the expander before it is
    generated (the saved pictures' infotext holds the detailed caption)."""
    from typer.testing import CliRunner

    from danqing.cli import app
    from danqing.outputs.store import read_infotext

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "--device", "cpu", "eval", "shapes", "--model", "danqing-tiny",
                                      "--n", "2", "--steps", "2", "--expand", "--out", str(out)])
    assert result.exit_code == 0, result.output
    prompts = sorted(read_infotext(p).splitlines()[0] for p in out.glob("*.png"))
    assert prompts == sorted(expand_prompt(caption(s)) for s in eval_scenes(2))
