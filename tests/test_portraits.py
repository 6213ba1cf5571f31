"""The portrait world: deterministic people and pictures, held-out people, captions in two
languages, and a reader that must be right on ground truth before it may judge a model."""

from __future__ import annotations

import io
import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image

from danqing.synthetic.portrait_reader import identity_match, read, score_portrait, style_score, summarise_portraits
from danqing.synthetic.portraits import (
    ATTRIBUTES, COLOUR_ATTRIBUTES, IDENTITY, Person, eval_portraits, held_out_people, people, pictures_of, portraits,
    render_portrait, split_people, values, vocab,
)
from danqing.synthetic.portraits_captions import parse_portrait_prompt, portrait_caption
from danqing.synthetic.render import degrade


def test_vocabulary_is_as_large_as_promised():
    sizes = {a: len(values(a)) for a in ATTRIBUTES}
    assert sizes == {"head": 3, "skin": 4, "hair_colour": 6, "hair_style": 4, "eyes": 4, "glasses": 2, "mouth": 4,
                     "clothing": 6, "pose": 3, "background": 5, "style": 3}
    assert len(people()) == 3 * 4 * 6 * 4 * 4 * 2
    for a in ATTRIBUTES:
        for v in values(a):
            assert vocab()[a][v]["zh"] or v == "no", (a, v)   # every value has its Chinese word


def test_portraits_and_renders_are_deterministic_from_the_seed():
    a, b, c = portraits(3, 12), portraits(3, 12), portraits(4, 12)
    assert a == b and a != c
    for p, q in zip(a, b):
        assert np.array_equal(np.asarray(render_portrait(p)), np.asarray(render_portrait(q)))
    assert render_portrait(a[0]).size == (64, 64) and render_portrait(a[0], 128).size == (128, 128)
    # the same person in another picture is another picture
    x, y = pictures_of(a[0].person, 2)
    assert x.person == y.person and not np.array_equal(np.asarray(render_portrait(x)), np.asarray(render_portrait(y)))


def test_held_out_people_never_appear_in_training():
    train = portraits(0, 3000, "train")
    held = held_out_people()
    assert len(held) == len(vocab()["held_out_names"]) and all(p.name for p in held)
    assert all(p.held_out for p in held) and len({p.key for p in held}) == len(held)
    assert {p.skin for p in held} == set(values("skin"))      # the named people are of every skin tone
    keys = {p.key for p in split_people("heldout")}
    assert len(keys) == round(vocab()["heldout_share"] * len(people()))
    assert not any(p.person.key in keys or p.person.held_out for p in train)
    assert not set(split_people("train")) & set(split_people("heldout"))
    assert len(split_people("train")) + len(split_people("heldout")) == len(people())
    # every pair of identity values a held-out person holds is shown in training on other people
    seen = {((a, getattr(p, a)), (b, getattr(p, b))) for p in split_people("train")
            for a, b in itertools.combinations(IDENTITY, 2)}
    for p in split_people("heldout"):
        assert all(((a, getattr(p, a)), (b, getattr(p, b))) in seen for a, b in itertools.combinations(IDENTITY, 2)), p
    ev = eval_portraits(200)
    assert len(ev) == 200 and {p.style for p in ev} == set(values("style"))
    assert all(p.person.held_out for p in ev)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_captions_name_the_attributes_and_read_back(lang):
    from danqing.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    rng = random.Random(5)
    for p in portraits(1, 150) + eval_portraits(60):
        want = p.visible_attributes()
        canonical = portrait_caption(p, lang)
        got = parse_portrait_prompt(canonical)
        named = set(want) - ({"pose", "background"} if lang == "zh" else set())
        assert got == {a: want[a] for a in named}, canonical
        for _ in range(2):
            text = portrait_caption(p, lang, rng)
            got = parse_portrait_prompt(text)
            assert all(want[a] == v for a, v in got.items()), text
            assert set(IDENTITY) & set(want) <= set(got), text          # the identity is always named
            assert len(tok(text).input_ids) <= tok.model_max_length, text
        assert len(tok(canonical).input_ids) <= tok.model_max_length, canonical
        if p.style == "pencil":   # a pencil picture shows no colour, and its caption names none
            assert not set(COLOUR_ATTRIBUTES) & set(got)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_attribute_dropout_leaves_identity_words_out_and_never_misnames_one(lang):
    from collections import Counter

    ps = [p for p in portraits(2, 400) if p.style != "pencil"]
    plain = [portrait_caption(p, lang, random.Random(i)) for i, p in enumerate(ps)]
    assert plain == [portrait_caption(p, lang, random.Random(i), 0.0) for i, p in enumerate(ps)]  # drop 0: as before
    named, rng = Counter(), random.Random(3)
    for p in ps:
        text = portrait_caption(p, lang, rng, 0.25)
        got = parse_portrait_prompt(text)
        want = p.visible_attributes()
        assert all(want[a] == v for a, v in got.items()), text
        named.update(a for a in IDENTITY if a in got and a != "glasses")
    for a in ("head", "skin", "hair_colour", "hair_style", "eyes"):   # each left out about a quarter of the time
        assert 0.6 < named[a] / len(ps) < 0.9, (a, named[a] / len(ps))


def test_canonical_captions_read_as_documented():
    p = eval_portraits(1)[0].__class__(Person("round", "pale", "red", "long", "green", "yes"), "smiling", "blue",
                                       "front", "sky", "ink")
    assert portrait_caption(p, "en") == ("a portrait of a person with a round face, pale skin, long red hair and green "
                                         "eyes, wearing glasses, smiling, in a blue shirt, facing forward, on a light "
                                         "blue background, ink drawing")
    assert portrait_caption(p, "zh") == "圆脸、白肤色、红色长发、绿眼睛、戴眼镜、微笑、蓝衣服、墨线画"
    with pytest.raises(ValueError, match="no portrait attribute"):
        parse_portrait_prompt("a red circle left of a blue star")


def _jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.mark.parametrize("damage", ["clean", "blur-noise", "jpeg"])
def test_reader_is_right_on_ground_truth(damage):
    rng = random.Random(11)
    items = portraits(21, 100) + eval_portraits(40, seed=3)
    right: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for p in items:
        img = render_portrait(p)
        img = {"clean": lambda: img, "blur-noise": lambda: degrade(img, rng), "jpeg": lambda: _jpeg(img)}[damage]()
        got = read(img)
        for a, v in p.visible_attributes().items():
            right[a].append(got[a] == v)
        if p.style == "pencil":
            assert all(got[a] is None for a in COLOUR_ATTRIBUTES)
    per = {a: round(float(np.mean(r)), 3) for a, r in right.items()}
    total = float(np.mean([x for r in right.values() for x in r]))
    print(damage, round(total, 4), per)
    assert total >= 0.97, per
    assert min(per.values()) >= 0.93, per


def test_identity_match_tells_people_apart_and_knows_them_again():
    rng = random.Random(2)
    train = split_people("train")
    same, different, neighbours = [], [], []
    for i in range(24):
        a = rng.choice(train)
        x, y = pictures_of(a, 2, seed=i)     # other clothes, expression, pose, background and style
        same.append(identity_match(render_portrait(x), render_portrait(y)))
        b = rng.choice([p for p in train if p.key != a.key])
        key = list(a.key)                    # a neighbour: one identity attribute changed
        k = rng.randrange(len(IDENTITY))
        key[k] = rng.choice([v for v in values(IDENTITY[k]) if v != key[k]])
        for other, into in ((b, different), (Person(*key), neighbours)):
            (u,), (v,) = pictures_of(a, 1, seed=50 + i, styles=("flat", "ink")), pictures_of(other, 1, seed=80 + i, styles=("flat", "ink"))
            into.append(identity_match(render_portrait(u), render_portrait(v)))
    print("same", np.mean(same), min(same), "different", np.mean(different), max(different),
          "one attribute apart", np.mean(neighbours), max(neighbours))
    assert np.mean(same) >= 0.8 and np.mean(np.array(same) >= 0.8) >= 0.9, same
    assert max(different) < 0.2 and max(neighbours) < 0.2, (different, neighbours)


def test_style_score_and_per_prompt_scores():
    for p in portraits(8, 30):
        img = render_portrait(p)
        assert style_score(img, p.style) > 0.9, p.style
        assert all(style_score(img, s) < 0.1 for s in values("style") if s != p.style)
        assert score_portrait(img, parse_portrait_prompt(portrait_caption(p)))["all"] == 1.0
    with pytest.raises(ValueError, match="unknown style"):
        style_score(img, "oil")


def test_reader_scores_wrong_prompts_low():
    shown, asked = portraits(31, 60), portraits(32, 60)
    scores = [score_portrait(render_portrait(a), parse_portrait_prompt(portrait_caption(b))) for a, b in zip(shown, asked)]
    summary = summarise_portraits(scores)
    assert summary["all"] < 0.05 and summary["attributes"] < 0.5, summary


# ---------------------------------------------------------------------------------------------
# danqing eval portraits
# ---------------------------------------------------------------------------------------------
def _cli(capsys, *args):
    from danqing.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _write_pngs(folder, items, prompts):
    from danqing.outputs.infotext import format_infotext
    from danqing.outputs.store import save_png

    paths = []
    for i, (p, text) in enumerate(zip(items, prompts)):
        info = format_infotext(text, "", {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7.0, "Seed": 1000 + i,
                                          "Size": "64x64", "Model": "danqing-tiny"})
        paths.append(save_png(render_portrait(p), folder / f"{i:03d}.png", info))
    return paths


def test_eval_portraits_cli_scores_pictures_from_their_metadata(capsys, tmp_path):
    items = eval_portraits(9)
    right = _write_pngs(tmp_path / "right", items, [portrait_caption(p, ("en", "zh")[i % 2]) for i, p in enumerate(items)])
    code, out, err = _cli(capsys, "eval", "portraits", *map(str, right), "--json", str(tmp_path / "right.json"))
    assert code in (0, None), err
    summary = json.loads((tmp_path / "right.json").read_text())["summary"]
    assert summary["n"] == 9 and summary["all"] >= 0.9 and summary["style"] == 1.0, summary
    wrong = _write_pngs(tmp_path / "wrong", items, [portrait_caption(p) for p in portraits(40, 9)])
    code, out, err = _cli(capsys, "eval", "portraits", *map(str, wrong), "--json", str(tmp_path / "wrong.json"))
    assert code in (0, None), err
    summary = json.loads((tmp_path / "wrong.json").read_text())["summary"]
    assert summary["all"] <= 0.1 and summary["attributes"] < 0.5, summary
    # one prompt for all the pictures; a prompt of another world is one line, exit 2
    code, out, _ = _cli(capsys, "eval", "portraits", str(right[0]), "--prompt", portrait_caption(items[0]))
    assert code in (0, None) and "all 1.0" in out
    code, _, err = _cli(capsys, "eval", "portraits", str(right[0]), "--prompt", "a red circle")
    assert code == 2 and "no portrait attribute" in err and len(err.strip().splitlines()) == 1


class _DrawsWhatItIsAsked:
    """A stand-in for the Studio that "generates" the rendered ground truth of each prompt (or,
    ``wrong``, another portrait): the benchmark's plumbing, measured where the answer is known."""

    def __init__(self, items, lang, wrong=False):
        self.by_prompt = {portrait_caption(p, lang): (q if wrong else p) for p, q in zip(items, items[1:] + items[:1])}
        self.requests = []

    def generate(self, req, save=False, out_dir=None):
        from types import SimpleNamespace

        self.requests.append(req)
        return SimpleNamespace(images=[render_portrait(self.by_prompt[req.prompt])], infotexts=[req.prompt])


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_eval_portraits_cli_benchmark_mode(capsys, tmp_path, monkeypatch, lang):
    import danqing.cli.evaluate as cli_eval

    n = 30
    for wrong in (False, True):
        studio = _DrawsWhatItIsAsked(eval_portraits(n), lang, wrong)
        monkeypatch.setattr(cli_eval, "make_studio", lambda obj: studio)
        out = tmp_path / f"{lang}-{wrong}.json"
        code, _, err = _cli(capsys, "--home", str(tmp_path), "eval", "portraits", "--n", str(n), "--lang", lang,
                            "--seed", "7", "--json", str(out))
        assert code in (0, None), err
        summary = json.loads(out.read_text())["summary"]
        assert len(studio.requests) == n and [r.seed for r in studio.requests] == list(range(7, 7 + n))
        if wrong:
            assert summary["all"] <= 0.1, summary
        else:
            assert summary["all"] >= 0.95 and summary["style"] == 1.0 and summary["attributes"] >= 0.97, summary
    code, _, err = _cli(capsys, "--home", str(tmp_path), "eval", "portraits", "--n", "0")
    assert code == 2 and "1-1000" in err


# ---------------------------------------------------------------------------------------------
# Training on portraits: `danqing train base` with data.world
# ---------------------------------------------------------------------------------------------
def test_the_shapes_world_stays_the_default_training_data():
    from pathlib import Path

    from danqing.training.config import load_config
    from danqing.training.data import synthetic_dataset

    a, b = synthetic_dataset(6, 64, seed=5), synthetic_dataset(6, 64, seed=5, world="shapes")
    assert torch_equal(a.images, b.images) and a.captions == b.captions
    mix = synthetic_dataset(12, 64, seed=5, world="mix", portrait_share=0.5)
    assert torch_equal(mix.images[:6], a.images) and mix.captions[:6] == a.captions   # the same shapes first
    assert all(isinstance(s, type(portraits(0, 1)[0])) for s in mix.scenes[6:])
    assert all(not s.person.held_out for s in mix.scenes[6:])
    for caps, p in zip(mix.captions[6:], mix.scenes[6:]):
        assert parse_portrait_prompt(caps[0]).items() <= p.visible_attributes().items()
        assert any("\u4e00" <= ch <= "\u9fff" for ch in caps[1])
    root = Path(__file__).parent.parent / "configs" / "train"
    for name in ("danqing-tiny-cpu.toml", "danqing-tiny-v2-gpu.toml", "smoke.toml"):
        assert load_config(root / name).data.world == "shapes"
    for name in ("danqing-tiny-v3-cpu.toml", "danqing-tiny-v3-gpu.toml"):
        cfg = load_config(root / name)
        assert cfg.data.world == "mix" and cfg.model.init_from == "danqing/data/models/danqing-tiny.safetensors"
    cfg = load_config(root / "danqing-tiny-portraits-cpu.toml")   # the second model: portraits only, from v2
    assert cfg.data.world == "portraits" and cfg.model.init_from == "danqing/data/models/danqing-tiny.safetensors"


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_a_few_steps_on_the_mix_write_a_model(tmp_path, monkeypatch):
    from pathlib import Path

    import torch

    import danqing.training.base as base
    from danqing.training.base import train_base
    from danqing.training.config import load_config

    # one sample prompt of each world is enough here (the grid is drawn at the last step)
    monkeypatch.setattr(base, "SAMPLE_PROMPTS", base.SAMPLE_PROMPTS[:1])
    monkeypatch.setattr(base, "PORTRAIT_SAMPLE_PROMPTS", base.PORTRAIT_SAMPLE_PROMPTS[:1])

    smoke = Path(__file__).parent.parent / "configs" / "train" / "smoke.toml"
    cfg = load_config(smoke, {"run.output_dir": str(tmp_path / "mix"), "data.world": "mix", "data.n_images": 32,
                              "vae.steps": 2, "vae.crop_steps": 2, "unet.steps": 3, "unet.batch_size": 4,
                              "run.eval_prompts": 1, "run.eval_steps": 1, "run.sample_every": 1000,
                              "run.num_threads": 1})
    threads = torch.get_num_threads()
    try:   # one thread: several on a busy 2-core machine are many times slower
        summary = train_base(cfg, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert summary["images"] == 32 and summary["final_step"] == 3
    assert summary["vae_portrait_reconstruction"]["n"] == 64
    assert summary["final_eval_portraits"]["n"] == 1 and summary["final_eval"]["n"] == 1
    assert (Path(cfg.run.output_dir) / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (Path(cfg.run.output_dir) / "log.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "eval-portraits" for r in rows)
    assert (Path(cfg.run.output_dir) / "samples" / "step-000003.png").is_file()
