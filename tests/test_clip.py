"""danqing-tiny-clip: the world's hard negatives, the loss against transformers' own, the exact
length trimming, a short training run, the bundled model (formats, size, retrieval) and the
``danqing eval clip`` / ``eval shapes --clip`` commands."""

from __future__ import annotations

import json
import random
from dataclasses import astuple
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from danqing.models.clip_model import BUNDLED_CLIP, clip_folder, load_clip
from danqing.models.tokenizer import clip_tokenizer
from danqing.synthetic.captions import caption
from danqing.synthetic.scenes import eval_scenes, one_attribute_changes, scenes
from danqing.training.clip import _features, build_model, contrastive_loss, negative_order, retrieval_items, soften, trim
from danqing.training.config_companions import ClipTrainConfig

TINY = {"model": {"projection_dim": 16, "vision_hidden": 32, "vision_layers": 2, "vision_heads": 2, "patch_size": 16,
                  "text_hidden": 32, "text_layers": 2, "text_heads": 2}}


def _differences(a, b) -> int:
    """How many attributes a caption states differ between two scenes."""
    n = sum(x != y for o, p in zip(a.objects, b.objects) for x, y in zip((o.colour, o.shape), (p.colour, p.shape)))
    return n + (a.position != b.position) + (a.relation != b.relation) + (a.layout != b.layout)


@pytest.mark.parametrize("n_objects,count", [(1, 7 + 5 + 4), (2, None), (3, None)])
def test_each_change_alters_one_attribute_and_the_caption(n_objects, count):
    for sc in scenes(3, 10, "train", n_objects):
        changes = one_attribute_changes(sc)
        assert count is None or len(changes) == count
        assert all(_differences(sc, c) == 1 for c in changes)
        assert all([astuple(o)[2:] for o in c.objects] == [astuple(o)[2:] for o in sc.objects] for c in changes)  # places kept
        for lang in ("en", "zh"):
            texts = [caption(c, lang) for c in changes]
            assert caption(sc, lang) not in texts and len(set(texts)) == len(texts)


@pytest.mark.parametrize("n_objects", [1, 2, 3])
def test_even_negatives_take_the_kinds_of_change_in_turn(n_objects):
    from collections import Counter

    from danqing.synthetic.scenes import change_kind

    for sc in scenes(4, 6, "train", n_objects):
        changes = one_attribute_changes(sc)
        uniform = negative_order(sc, changes, random.Random(1), "uniform")
        even = negative_order(sc, changes, random.Random(1), "even")
        assert sorted(map(str, uniform)) == sorted(map(str, even)) == sorted(map(str, changes))  # a reordering
        kinds = Counter(change_kind(sc, c) for c in changes)
        fewest = min(kinds.values())
        head = Counter(change_kind(sc, c) for c in even[: fewest * len(kinds)])
        assert head == {k: fewest for k in kinds}, (kinds, head)  # each kind as often, until the rarest runs out


def test_retrieval_items_are_the_held_out_scenes_with_nine_distractors():
    items = retrieval_items(20)
    assert [it.scene for it in items] == eval_scenes(20)
    assert all(len(it.candidates) == 10 and it.candidates[0] == it.scene for it in items)
    assert retrieval_items(20) == items  # deterministic


def test_loss_without_hard_negatives_is_transformers_clip_loss():
    """With no hard negatives and no repeated captions, the loss is CLIPModel's own (return_loss)."""
    cfg = ClipTrainConfig.model_validate(TINY)
    model = build_model(cfg, 0).eval()
    pixels = torch.randn(6, 3, 64, 64)
    ids = torch.tensor(clip_tokenizer()(
        [caption(s) for s in scenes(0, 6)], padding="max_length", max_length=77, truncation=True).input_ids)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        img, txt = _features(model, pixels, ids)
        ours = contrastive_loss(img, txt, txt.new_zeros(6, 0, txt.shape[1]), model.logit_scale.exp(),
                                torch.zeros(6, 6, dtype=torch.bool))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_hard_negatives_and_repeats_change_the_loss_as_they_should():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    none = torch.zeros(4, 4, dtype=torch.bool)
    base = contrastive_loss(img, txt, txt.new_zeros(4, 0, 8), torch.tensor(10.0), none)
    # a negative identical to the positive caption: the picture can no longer prefer it -> higher loss
    harder = contrastive_loss(img, txt, txt[:, None], torch.tensor(10.0), none)
    assert harder > base
    # captions 0 and 1 the same text: their cross logits are not counted as negatives -> lower loss
    same = none.clone()
    same[0, 1] = same[1, 0] = True
    assert contrastive_loss(img, txt, txt.new_zeros(4, 0, 8), torch.tensor(10.0), same) < base


def test_trimmed_length_groups_give_the_full_length_features():
    """The text model is causal and pools at the end token: cutting the padding changes nothing."""
    cfg = ClipTrainConfig.model_validate(TINY)
    model = build_model(cfg, 1).eval()

    rng = random.Random(0)
    texts = [caption(s, ("en", "zh")[i % 2], rng) for i, s in enumerate(scenes(1, 12))]
    ids = clip_tokenizer()(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert trim(ids).shape[1] < 77
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, grouped = _features(model, pixels, ids, chunks=3)
        full = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    torch.testing.assert_close(grouped, full, rtol=1e-5, atol=1e-6)


def test_soften_blurs_only_its_share_and_stays_in_range():
    x = torch.rand(64, 3, 16, 16)
    assert torch.equal(soften(x, torch.Generator().manual_seed(0), 0.0), x)
    y = soften(x, torch.Generator().manual_seed(0), 0.5)
    changed = (y != x).flatten(1).any(1)
    assert 16 < int(changed.sum()) < 48 and y.min() >= 0 and y.max() <= 1
    # blurred pictures lose high-frequency energy
    hf = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert hf(y[changed]) < hf(x[changed])


@pytest.mark.parametrize("recipe", [{}, {"data": {"negative_kinds": "even", "place_twins": True},
                                      "model": {"vision_positions": "sincos"}}], ids=["plain", "even-twins-sincos"])
def test_a_short_run_learns_and_writes_a_clip_model_folder(tmp_path, recipe):
    from transformers import CLIPModel

    from danqing.training.clip import train_clip

    data = {"n_images": 64, "captions_per_image": 2, "hard_negatives": 2, **recipe.get("data", {})}
    cfg = ClipTrainConfig.model_validate({"model": {**TINY["model"], **recipe.get("model", {})}, "data": data,
                                          "train": {"steps": 40, "batch_size": 32, "warmup_steps": 5, "lr": 3e-3},
                                          "output": {"output_dir": str(tmp_path), "log_every": 5, "eval_every": 40,
                                                     "eval_scenes": 10}})
    lines: list[str] = []
    summary = train_clip(cfg, log=lines.append)
    losses = [float(line.split()[3]) for line in lines if line.startswith("step ")]
    assert losses[-1] < losses[0] - 0.3, losses
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and set(rows[-1]) >= {"top1_en", "top1_zh"} and summary["top1_en"] == rows[-1]["top1_en"]
    folder = tmp_path / "model"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    again = CLIPModel.from_pretrained(folder, dtype=torch.float32)
    assert again.config.vision_config.image_size == 64 and again.config.projection_dim == 16


def test_init_from_continues_a_written_model_and_refuses_another_shape(tmp_path):
    from danqing.errors import InvalidRequest
    from danqing.training.clip import continued, save_clip

    cfg = ClipTrainConfig.model_validate(TINY)
    first = build_model(cfg, seed=1)
    save_clip(first, tmp_path / "first")
    again = continued(build_model(cfg, seed=2), str(tmp_path / "first"))
    for name, value in first.state_dict().items():  # written in fp16, read back in float32
        assert again.state_dict()[name].dtype == torch.float32
        assert torch.equal(again.state_dict()[name], value.half().float()), name
    wider = ClipTrainConfig.model_validate({"model": {**TINY["model"], "vision_hidden": 64}})
    with pytest.raises(InvalidRequest, match=r"model\.init_from: .* is not of the config's \[model\] shape"):
        continued(build_model(wider, seed=1), str(tmp_path / "first"))


def test_sincos_positions_start_the_vision_tower_knowing_rows_and_columns():
    from danqing.training.clip import sincos_2d

    table = sincos_2d(4, 16)
    assert table.shape == (16, 16)
    grid = table.view(4, 4, 16)
    assert torch.equal(grid[1, 0, :8], grid[1, 3, :8]) and torch.equal(grid[0, 2, 8:], grid[3, 2, 8:])  # row / column halves
    assert not torch.equal(grid[0, 0, :8], grid[1, 0, :8]) and not torch.equal(grid[0, 0, 8:], grid[0, 1, 8:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 18)
    cfg = ClipTrainConfig.model_validate({"model": {**TINY["model"], "vision_positions": "sincos"}})
    pos = build_model(cfg, 0).vision_model.embeddings.position_embedding.weight
    side = 64 // TINY["model"]["patch_size"]
    assert torch.equal(pos[0], torch.zeros(32)) and torch.equal(pos[1:], sincos_2d(side, 32))
    plain = build_model(ClipTrainConfig.model_validate(TINY), 0).vision_model.embeddings.position_embedding.weight
    assert plain.std() < 0.05 and pos[1:].std() > 0.5  # transformers' start: std 0.02, a patch's content 0.32


# ---------------------------------------------------------------------------------------------
# The bundled model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    return load_clip(BUNDLED_CLIP)


def test_bundled_clip_loads_in_transformers_formats_and_fits_the_size_limit():
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    folder = clip_folder(BUNDLED_CLIP)
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 20 * 2**20, size
    vision = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32)
    text = CLIPTextModelWithProjection.from_pretrained(folder, dtype=torch.float32)
    assert CLIPTextModel.from_pretrained(folder, dtype=torch.float32).config.hidden_size == text.config.hidden_size
    processor = CLIPImageProcessor.from_pretrained(folder)
    assert processor.crop_size == {"height": vision.config.image_size, "width": vision.config.image_size}


def test_bundled_clip_on_the_held_out_retrieval_test(bundled):
    """200 held-out scenes, their caption among 9 that change one attribute (chance 0.1); the
    issue's target is 0.85 top-1. The bundled model: top-1 0.895 English, 0.905 Chinese; colour
    changes caught 99.9%, shape changes 96-96.5%, place changes (position, relation) 99.4-99.7%
    (v1: 0.36 / 0.385, place 60%)."""
    from danqing.training.clip import retrieval_scores
    from danqing.training.data import render_batch

    items = retrieval_items(200)
    pictures = render_batch([it.scene for it in items], bundled.size, workers=1)
    for lang in ("en", "zh"):
        r = retrieval_scores(bundled, items, pictures, lang)
        assert r["top1"] >= 0.87 and r["beats_colour"] >= 0.99 and r["beats_shape"] >= 0.94 and r["beats_place"] >= 0.98, r


def test_processor_path_and_tensor_path_give_the_same_features(bundled):
    """PIL pictures through CLIP's processor steps and uint8 tensors give the same features."""
    import numpy as np
    from transformers import CLIPImageProcessor

    from danqing.synthetic.render import render

    pictures = [render(s, bundled.size) for s in eval_scenes(4)]
    tensor = torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).permute(0, 3, 1, 2)
    a = bundled.image_features(pictures)
    b = bundled.image_features(tensor)
    processor = CLIPImageProcessor.from_pretrained(clip_folder(BUNDLED_CLIP))
    pixels = processor(images=pictures, return_tensors="pt").pixel_values
    with torch.no_grad():
        c = F.normalize(bundled.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-3)


def test_cli_eval_clip_reports_both_languages_and_refuses_bad_input(tmp_path, capsys):
    from typer.testing import CliRunner

    from danqing.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["--home", str(tmp_path), "eval", "clip", "--n", "20", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["n"] == 20 and summary["candidates"] == 10 and 0.2 <= summary["top1_en"] <= 1 and 0.2 <= summary["top1_zh"] <= 1
    assert summary["beats_colour_en"] >= 0.95 and summary["beats_colour_zh"] >= 0.95
    from danqing.cli import main

    for args, message in [(["--n", "0"], "n: must be 1-1000, got 0"), (["--distractors", "40"], "distractors: must be 1-15"),
                          (["--model", "nope"], "CLIP model 'nope' not found")]:
        with pytest.raises(SystemExit) as exc:
            main(["--home", str(tmp_path), "eval", "clip", *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_clip_score_ranks_the_right_prompt_first(bundled):
    """A rendered scene scores higher against its own caption than against a random one-attribute change."""
    from danqing.synthetic.render import render

    wins = 0
    for sc in eval_scenes(40):
        picture = render(sc, bundled.size)
        other = random.Random(sc.seed).choice(one_attribute_changes(sc))
        own, changed = bundled.score([picture, picture], [caption(sc), caption(other)])
        wins += own > changed
    assert wins >= 32, wins  # 39 of 40 measured (the first model: 35); chance 20


def test_eval_shapes_with_clip_adds_scores_and_their_correlation(tmp_path):
    """``eval shapes --clip`` on files: a CLIP score per picture and the Spearman correlation with
    the object score; right pictures score above wrong ones."""
    from typer.testing import CliRunner

    from danqing.cli import app
    from danqing.outputs.store import save_png
    from danqing.synthetic.render import render

    paths = []
    for i, sc in enumerate(eval_scenes(40)):
        shown = sc if i % 2 == 0 else random.Random(i).choice([c for c in one_attribute_changes(sc)
                                                               if c.objects != sc.objects])
        p = tmp_path / f"{i:02d}.png"
        save_png(render(shown), p, f"{caption(sc)}\nSteps: 20, Seed: {i}")
        paths.append(str(p))
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "eval", "shapes", *paths, "--clip", BUNDLED_CLIP,
                                      "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s.json").read_text())
    scores = [row["clip_score"] for row in data["images"]]
    assert len(scores) == 40 and sum(scores[::2]) > sum(scores[1::2])
    assert data["summary"]["clip_spearman_object"] >= 0.6  # measured 0.87 (v1: 0.80; the wrong pictures change colour or shape)


def test_a_name_cannot_leave_the_clip_folder(tmp_path, monkeypatch):
    """Names reach only folders of models/clip/, even where "..", "../x" or "a/b" would find a
    CLIP-looking folder."""
    models = tmp_path / "models"
    for folder in (models, models / "x", models / "clip" / "a" / "b", models / "clip" / "ok"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the names are not paths from here either
    assert clip_folder("ok", models) == models / "clip" / "ok"
    for name in ("../x", "..", "a/b"):
        with pytest.raises(FileNotFoundError):
            clip_folder(name, models)
    assert Path(clip_folder(BUNDLED_CLIP)).name == BUNDLED_CLIP
