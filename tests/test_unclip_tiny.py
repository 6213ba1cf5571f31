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
