"""Prompt expansion of the comic's scene lines: the shapes world's rules and a causal language model
from a local folder (a tiny GPT-2 built here from a config, its tokenizer with the `tokenizers`
library; nothing downloaded). The same seed gives the same expansion, the panel's infotext and
project.json hold it, and a missing folder is one clear error."""

from __future__ import annotations

import functools
import json

import pytest
from PIL import Image

from danqing.apps.comic import ComicProject, read_storyboard
from danqing.apps.comic_expand import expand_lm, expand_rules, rules
from danqing.errors import InvalidRequest

WORDS = ["<eos>", "<unk>", "a", "red", "circle", "blue", "square", "bright", "morning", "garden", "sunny", "soft",
         "light", "quiet", "street", "rain", "warm", "glow", "tall", "trees", "river", "stone", "bridge", "night"]


def story(expand: str, scenes=("a red circle", "a blue square")) -> str:
    panels = "".join(f'[[panels]]\nscene = "{s}"\n' for s in scenes)
    return f'steps = 2\nseed = 5\nhires_scale = 1\nsampler = "Euler"\nexpand = "{expand}"\n{panels}'


@functools.lru_cache(maxsize=1)
def cli_studio():
    """A Studio as the CLI makes one: its user may name folders by path. (The server's studio is
    names-only, and the in-process server tests switch the shared test studio to that mode.)"""
    import tempfile

    from danqing import Settings, Studio

    return Studio(Settings(home=tempfile.mkdtemp(prefix="danqing-comic-expand-"), device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A GPT-2 of two layers, width 32, over a 24-word vocabulary: a folder as a user would give."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("lm") / "tiny-gpt2"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                            pad_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=None, eos_token_id=None)  # no stop word: always MAX_NEW_TOKENS words
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_rules_draw_a_phrase_of_the_world_from_the_seed():
    phrases = rules()["shapes"]
    a = expand_rules("a red circle", 3)
    assert a == expand_rules("a red circle", 3) and a.startswith("a red circle, ")
    assert a.removeprefix("a red circle, ") in phrases["en"]
    assert len({expand_rules("a red circle", s) for s in range(20)}) > 3  # seeds pick different phrases
    zh = expand_rules("一个红色的圆形", 3)
    assert zh.startswith("一个红色的圆形") and zh.removeprefix("一个红色的圆形") in phrases["zh"]


def test_rules_expansion_is_in_the_infotext_and_project(tmp_path):
    (tmp_path / "s.toml").write_text(story("rules"), encoding="utf-8")
    comic = ComicProject(tmp_path / "s.toml")
    comic.draft(cli_studio())
    state = json.loads(comic.state_path.read_text())
    assert state["expand"] == "rules"
    assert state["prompts"] == [expand_rules("a red circle", 5), expand_rules("a blue square", 6)]
    params = Image.open(comic.folder / "draft" / "panel-01.png").text["parameters"]
    assert params.startswith(expand_rules("a red circle", 5) + "\n")


def test_a_language_model_continues_the_scene_line(tiny_lm, tmp_path):
    a = expand_lm("a red circle", 5, tiny_lm)
    added = a.removeprefix("a red circle, ")
    assert added != a and added and set(added.split()) <= set(WORDS)
    assert expand_lm("a red circle", 5, tiny_lm) == a  # same seed, same expansion
    (tmp_path / "s.toml").write_text(story(f"lm:{tiny_lm}", scenes=("a red circle",)), encoding="utf-8")
    comic = ComicProject(tmp_path / "s.toml")
    comic.draft(cli_studio())
    assert json.loads(comic.state_path.read_text())["prompts"] == [a]
    assert Image.open(comic.folder / "draft" / "panel-01.png").text["parameters"].startswith(a + "\n")


def test_a_missing_or_unknown_expansion_is_one_line(tmp_path):
    (tmp_path / "s.toml").write_text(story("lm:no-such-model"), encoding="utf-8")
    with pytest.raises(InvalidRequest, match=r"lm:no-such-model: no such folder; .*installed: none"):
        ComicProject(tmp_path / "s.toml").draft(cli_studio())
    assert not (tmp_path / "s").exists()  # nothing written
    (tmp_path / "s.toml").write_text(story("magic"), encoding="utf-8")
    with pytest.raises(InvalidRequest, match=r"expand: expand 'magic': use \"rules\""):
        read_storyboard(tmp_path / "s.toml")


def test_the_portrait_rules_change_expression_and_pose_and_our_reader_reads_them():
    from danqing.synthetic.portraits_captions import parse_portrait_prompt

    table = rules()["portraits"]
    person = "a portrait of a person with a round face, short black hair, flat colours"
    for lang, scene in (("en", person), ("zh", "圆脸、黑色短发、平涂画")):
        asked = [parse_portrait_prompt(scene + (p if lang == "zh" else f", {p}")) for p in table[lang]]
        # every (expression, pose) pair once, and the person asked for is kept
        assert len({(a["mouth"], a["pose"]) for a in asked}) == len(table[lang]) == 12
        assert all(a["head"] == "round" and a["hair_style"] == "short" for a in asked)
    line = expand_rules(person, 5, "portraits")
    assert line == expand_rules(person, 5, "portraits") and line.startswith(person + ", ")
