"""danqing-tiny-unclip (danqing.training.unclip): the decoder starts as danqing-tiny exactly, the
variation judge reads pictures as the evaluator does, per-row noise levels are the sampler's, and
a short run writes a Stable unCLIP folder that danqing and diffusers' own
``StableUnCLIPImg2ImgPipeline`` run to the same latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from danqing.synthetic.render import render
from danqing.synthetic.scenes import Obj, Scene
from danqing.training.config import UnclipTrainConfig, load_config

CONFIG = Path(__file__).parent.parent / "configs" / "train" / "danqing-tiny-unclip.toml"


def _scene(*objs, background="white"):
    return Scene(tuple(Obj(shape, colour, "large", x, y) for shape, colour, x, y in objs), background=background,
                 style="plain", seed=0)


def test_the_decoder_starts_as_the_base_unet():
    from danqing.training.runs import load_float32
    from danqing.training.unclip import decoder_unet

    base, _, _ = load_float32("danqing-tiny")
    dec = decoder_unet(base.unet, 64).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        want = base.unet(x, t, ctx).sample
        got = dec(x, t, ctx, class_labels=torch.randn(2, 128, generator=g)).sample
    assert dec.config.class_embed_type == "projection" and dec.config.projection_class_embeddings_input_dim == 128
    assert torch.equal(got, want)


def test_same_objects_reads_the_set_and_the_shift():
    from danqing.synthetic.evaluate import same_objects

    a = render(_scene(("circle", "red", 0.3, 0.5), ("star", "blue", 0.7, 0.5)), 64)
    moved = render(_scene(("circle", "red", 0.7, 0.3), ("star", "blue", 0.3, 0.7)), 64)
    recoloured = render(_scene(("circle", "green", 0.3, 0.5), ("star", "blue", 0.7, 0.5)), 64)
    fewer = render(_scene(("circle", "red", 0.3, 0.5)), 64)
    ok, shift = same_objects(a, a)
    assert ok and shift == 0.0
    ok, shift = same_objects(a, moved)
    assert ok and 20 < shift < 40  # each moved by hypot(0.4, 0.2) * 64 = 28.6 pixels
    assert same_objects(a, recoloured) == (False, None)
    assert same_objects(a, fewer) == (False, None)


def test_per_row_noise_levels_are_the_samplers_single_levels():
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    from danqing.models.unclip_models import UnclipModel
    from danqing.sampling.unclip import noised_embedding
    from danqing.training.unclip import NOISING_CONFIG

    norm = StableUnCLIPImageNormalizer(embedding_dim=8)
    model = UnclipModel("unclip", None, None, None, norm, dict(NOISING_CONFIG))
    g = torch.Generator().manual_seed(1)
    emb, noise = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    rows = noised_embedding(model, emb, noise, torch.tensor([0, 250, 999]))
    for i, level in enumerate((0, 250, 999)):
        assert torch.allclose(rows[i], noised_embedding(model, emb[i:i + 1], noise[i:i + 1], level)[0], atol=1e-6)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from danqing.training.unclip import train_unclip

    out = tmp_path_factory.mktemp("unclip") / "run"
    cfg = load_config(CONFIG, {"data.n_images": 64, "unet.steps": 6, "unet.batch_size": 8,
                               "run.output_dir": str(out), "run.checkpoint_every": 3, "run.eval_every": 6,
                               "run.eval_steps": 4, "unclip.eval_pictures": 2, "run.num_threads": 0},
                      model=UnclipTrainConfig)
    summary = train_unclip(cfg, log=lambda line: None)
    return out, summary


def test_a_short_run_writes_a_stable_unclip_folder_diffusers_runs_alike(short_run):
    from diffusers import StableUnCLIPImg2ImgPipeline

    from danqing import GenerationRequest
    from danqing.models.unclip_models import load_unclip_folder
    from danqing.sampling.samplers import make_scheduler
    from danqing.sampling.unclip import run_unclip

    out, summary = short_run
    assert summary["steps"] == 6 and summary["eval"]["n"] == 2
    model = load_unclip_folder(out / "model")
    assert model.components.unet.config.class_embed_type == "projection"
    picture = render(_scene(("circle", "red", 0.3, 0.5), ("star", "blue", 0.7, 0.5)), 64)
    request = GenerationRequest(prompt="", negative_prompt="", sampler="DDIM", steps=4, cfg_scale=6.0, seed=5,
                                width=64, height=64)
    ours = run_unclip(model, picture, request, noise_level=100)
    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(out / "model", local_files_only=True)
    pipe.scheduler = make_scheduler(model.components.scheduler_config, "DDIM", "Automatic", seed=5)
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    with torch.no_grad():
        pipe(image=picture, prompt="", negative_prompt="", num_inference_steps=4, guidance_scale=6.0, height=64,
             width=64, noise_level=100, generator=torch.Generator("cpu").manual_seed(5), output_type="np",
             callback=lambda i, t, x: seen.update(latents=x.clone()))
    assert float((ours.latents - seen["latents"]).abs().max()) < 1e-4


def test_the_variation_judge_scores_a_short_runs_variations(short_run, tmp_path):
    from danqing.models.unclip_models import load_unclip_folder
    from danqing.training.unclip import variation_rates

    out, _ = short_run
    pairs = []
    res = variation_rates(load_unclip_folder(out / "model"), 2, steps=4,
                          on_pair=lambda i, src, img, ok, shift: pairs.append((src.size, img.size, ok)))
    assert res["n"] == 2 and 0 <= res["same_objects"] <= 1
    assert [p[:2] for p in pairs] == [((64, 64), (64, 64))] * 2
    assert np.mean([p[2] for p in pairs]) == res["same_objects"]


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    from danqing.training.config import PriorTrainConfig
    from danqing.training.prior import train_prior

    out = tmp_path_factory.mktemp("prior") / "run"
    cfg = load_config(Path(__file__).parent.parent / "configs" / "train" / "danqing-tiny-prior.toml", {
        "data.n_images": 64, "unet.steps": 30, "unet.batch_size": 32, "unet.lr": 1e-3, "unet.warmup_steps": 2,
        "run.output_dir": str(out), "run.log_every": 5, "run.checkpoint_every": 15, "run.eval_every": 30,
        "prior.eval_prompts": 4, "run.num_threads": 0}, model=PriorTrainConfig)
    return out, train_prior(cfg, log=lambda line: None)


def test_a_short_prior_run_learns_and_diffusers_samples_it_alike(prior_run):
    """The prior folder: the loss falls; diffusers' KandinskyV22PriorPipeline.from_pretrained
    samples the same image embedding as danqing's run_prior."""
    import json

    from diffusers import KandinskyV22PriorPipeline

    from danqing.models.unclip_models import load_kandinsky_prior
    from danqing.sampling.kandinsky import run_prior

    out, summary = prior_run
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if json.loads(line)["stage"] == "prior"]
    assert losses[-1] < losses[0], losses
    assert summary["eval"]["n"] == 4 and -1 <= summary["eval"]["cosine"] <= 1
    prior = load_kandinsky_prior(out / "prior")
    ours, _ = run_prior(prior, "a red circle left of a blue star", "", 1, [torch.Generator().manual_seed(3)],
                        steps=5, cfg_scale=4.0)
    pipe = KandinskyV22PriorPipeline.from_pretrained(out / "prior", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe("a red circle left of a blue star", num_inference_steps=5, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(3), output_type="pt").image_embeds
    assert float((ours - ref).abs().max()) < 1e-4


def test_text_to_image_through_the_prior_on_the_command_line(short_run, prior_run, tmp_path):
    """`danqing generate --model <unCLIP decoder> --prior <prior>`: a picture whose infotext names
    the prior; without --prior the decoder asks for a picture or a prior."""
    from PIL import Image
    from typer.testing import CliRunner

    from danqing.cli import app
    from danqing.errors import InvalidRequest

    decoder, prior = short_run[0] / "model", prior_run[0] / "prior"
    home = tmp_path / "home"
    runner = CliRunner()
    args = ["--home", str(home), "generate", "a red circle", "--model", str(decoder), "--width", "64", "--height", "64",
            "--steps", "3", "--seed", "4"]
    res = runner.invoke(app, args + ["--prior", str(prior), "--out", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    params = Image.open(tmp_path / "a.png").info["parameters"]
    assert "Prior: prior" in params and "Prior steps: 25" in params and "Family: unclip" in params
    res = runner.invoke(app, args + ["--out", str(tmp_path / "b.png")])  # main() prints it as one line, exit 2
    assert isinstance(res.exception, InvalidRequest) and "--prior FOLDER" in str(res.exception)
    assert not (tmp_path / "b.png").exists()


def test_eval_unclip_judges_variations_and_text_through_the_prior(short_run, prior_run, tmp_path):
    import json

    from typer.testing import CliRunner

    from danqing.cli import app

    decoder, prior = short_run[0] / "model", prior_run[0] / "prior"
    base = ["--home", str(tmp_path / "home"), "eval", "unclip", "--model", str(decoder), "--n", "2", "--steps", "3"]
    res = CliRunner().invoke(app, base + ["--out", str(tmp_path / "pairs"), "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "v.json").read_text())["summary"]
    assert summary["n"] == 2 and set(summary) == {"n", "pairs", "same_objects", "same_colours", "same_count",
                                                 "centroid_shift"}
    pairs = sorted(p.name for p in (tmp_path / "pairs").iterdir())
    assert len(pairs) == 2 and pairs[0].startswith("0000-")
    res = CliRunner().invoke(app, base + ["--prior", str(prior), "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "t.json").read_text())["summary"]
    assert summary["n"] == 2 and 0 <= summary["object"] <= 1


def test_judged_scenes_hold_the_pairs_they_say():
    from danqing.synthetic.scenes import heldout_pairs
    from danqing.training.unclip import judged_scenes

    held = heldout_pairs()
    seen, heldout = judged_scenes(40, "seen"), judged_scenes(40, "held-out")
    assert [len(s.objects) for s in seen[:4]] == [1, 2, 1, 2]
    assert all((o.colour, o.shape) not in held for s in seen for o in s.objects)
    assert all(any((o.colour, o.shape) in held for o in s.objects) for s in heldout)


def test_a_run_continues_from_an_earlier_decoder(short_run, tmp_path):
    """unclip.init_decoder: the second stage starts from the first one's folder (its UNet and
    normaliser), not from a new decoder."""
    from danqing.models.unclip_models import load_unclip_folder
    from danqing.training.unclip import train_unclip

    first = load_unclip_folder(short_run[0] / "model")
    cfg = load_config(CONFIG, {"data.n_images": 32, "unet.steps": 1, "unet.batch_size": 4, "unet.lr": 1e-12,
                               "run.output_dir": str(tmp_path / "run"), "unclip.eval_pictures": 0,
                               "unclip.init_decoder": str(short_run[0] / "model"), "run.num_threads": 0},
                      model=UnclipTrainConfig)
    train_unclip(cfg, log=lambda line: None)
    second = load_unclip_folder(tmp_path / "run" / "model")
    w1 = first.components.unet.class_embedding.linear_2.weight
    w2 = second.components.unet.class_embedding.linear_2.weight
    assert torch.allclose(w1, w2, atol=1e-6) and float(w1.abs().max()) > 0
    assert torch.equal(first.image_normalizer.mean, second.image_normalizer.mean)
