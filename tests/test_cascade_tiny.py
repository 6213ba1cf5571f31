"""danqing-tiny-if: the pixel cascade trainer (training/cascade.py) -- its objective
(training/vlb.py) against diffusers' scheduler, its tokenizer, and short runs of both stages whose IF folders danqing's
loader, sampler and CLI and diffusers' IF pipelines all run the same way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from parity import assert_close_scaled
from PIL import Image

from danqing import GenerationRequest
from danqing.errors import InvalidRequest

BASE = 16  # the tiny runs: 16 -> 64


def _config(stage: str, out, **unet):
    from danqing.training.config import CascadeTrainConfig

    return CascadeTrainConfig.model_validate({
        "data": {"n_images": 24, "size": 4 * BASE, "captions_per_image": 2},
        "cascade": {"stage": stage, "base_size": BASE, "prediction": "v_prediction" if stage == "upscaler" else "epsilon", "block_out_channels": [16, 32], "attention_head_dim": 8,
                    "text_width": 16, "text_heads": 2, "crop_size": 32, "eval_steps": 2},
        "unet": {"steps": 3, "batch_size": 4, "warmup_steps": 1, **unet},
        "run": {"output_dir": str(out), "sample_every": 3, "eval_every": 3, "eval_prompts": 2, "eval_steps": 2,
                "log_every": 1},
    })


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    from danqing.training.cascade import train_cascade

    root = tmp_path_factory.mktemp("cascade")
    summaries = [train_cascade(_config(stage, root / stage), log=lambda _: None) for stage in ("base", "upscaler")]
    return root / "base" / "model", root / "upscaler" / "model", summaries


def _scheduler():
    from diffusers import DDPMScheduler

    from danqing.training.cascade import SCHEDULER

    return DDPMScheduler.from_config(SCHEDULER)


def test_learned_variance_is_read_as_the_scheduler_reads_it():
    from danqing.training.vlb import model_log_variance

    sched = _scheduler()
    sched.set_timesteps(1000)
    g = torch.Generator().manual_seed(0)
    for t in (1, 10, 500, 999):
        v = torch.rand(1, 3, 2, 2, generator=g) * 2 - 1
        ours = model_log_variance(sched, torch.tensor([t]), v)
        theirs = sched._get_variance(t, predicted_variance=v)  # learned_range: a log variance
        # the scheduler's float32 1 - a_t / a_prev against our float64: equal to 1e-4 relative
        assert torch.allclose(ours.float(), theirs.float(), rtol=1e-4, atol=1e-6), t


def test_vlb_vanishes_for_the_true_posterior_only():
    from danqing.training.vlb import vlb_bits

    sched = _scheduler()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 50, 400, 900])
    x_t = sched.add_noise(x0, noise, t)
    low = -torch.ones_like(x0)  # v = -1: the posterior's own variance
    exact = vlb_bits(sched, x0, x_t, t, noise, low)
    assert float(exact.abs().max()) < 1e-6
    wrong_eps = vlb_bits(sched, x0, x_t, t, noise + 0.3 * torch.randn(x0.shape, generator=g), low)
    wrong_var = vlb_bits(sched, x0, x_t, t, noise, torch.ones_like(x0))
    assert bool((wrong_eps > 1e-4).all())
    # a wrong variance costs where beta_t and the posterior's variance differ: the first steps
    # (late in the chain they nearly agree, Improved DDPM's figure 1)
    assert float(wrong_var[0]) > 1e-4 and float(wrong_var[1]) > 1e-6
    decoder = vlb_bits(sched, x0, sched.add_noise(x0, noise, torch.zeros(4, dtype=torch.long)),
                       torch.zeros(4, dtype=torch.long), noise, low)
    assert bool(torch.isfinite(decoder).all()) and bool((decoder >= 0).all())  # -log of a probability, in bits


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_hybrid_loss_is_zero_only_for_the_exact_prediction(prediction):
    from danqing.training.vlb import hybrid_loss

    sched = _scheduler()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([5, 300, 800])
    x_t = sched.add_noise(x0, noise, t)
    exact = noise if prediction == "epsilon" else sched.get_velocity(x0, noise, t)
    out = torch.cat([exact, -torch.ones_like(x0)], dim=1)  # variance: the posterior's own
    assert float(hybrid_loss(out, sched, x0, x_t, t, noise, 1.0, prediction)) < 1e-5
    off = torch.cat([exact + 0.1, -torch.ones_like(x0)], dim=1)
    assert float(hybrid_loss(off, sched, x0, x_t, t, noise, 1.0, prediction)) > 1e-3


def test_word_tokenizer_reads_the_world_word_by_word(tmp_path):
    from transformers import AutoTokenizer

    from danqing.training.cascade import word_tokenizer

    tok = word_tokenizer(["a red circle left of a blue square", "一个橙色的圆形"])
    ids = tok("a red circle").input_ids
    assert len(ids) == 4 and ids[-1] == tok.eos_token_id  # three words, one piece each, then </s>
    assert tok.unk_token_id not in tok("一个橙色的圆形").input_ids
    assert tok.unk_token_id not in tok("a teal hexagon").input_ids  # unseen words: spelt in letters
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in ("a blue square left of a red circle", "一个橙色的圆形", "zebra"):
        assert again(text).input_ids == tok(text).input_ids


def test_the_cascade_refuses_pictures_not_four_times_its_base(tmp_path):
    from danqing.training.cascade import train_cascade
    from danqing.training.config import CascadeTrainConfig

    cfg = CascadeTrainConfig.model_validate({"data": {"size": 96}, "cascade": {"base_size": 32},
                                             "run": {"output_dir": str(tmp_path / "x")}})
    with pytest.raises(InvalidRequest, match=r"data.size.*4x cascade.base_size \(128\)"):
        train_cascade(cfg)


def test_trained_stages_are_if_folders_diffusers_runs_the_same_way(stages):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    from danqing.conditioning.if_text import if_embeddings
    from danqing.models.cascade_models import load_if_folder
    from danqing.sampling.cascade import run_if

    base_dir, up_dir, summaries = stages
    assert [s["stage"] for s in summaries] == ["base", "upscaler"] and all(s["steps"] == 3 for s in summaries)
    first, second = load_if_folder(base_dir), load_if_folder(up_dir)
    assert (first.kind, second.kind) == ("if-i", "if-ii") and second.text_encoder is None
    assert first.scheduler_config["variance_type"] == "learned_range" and first.scheduler_config["thresholding"]
    prompt = "a red circle left of a blue square"
    req = GenerationRequest(prompt=prompt, steps=3, cfg_scale=5.0, seed=3, batch_size=2)
    ours = run_if(first, req, stage_2=second, upscale_steps=3, upscale_cfg_scale=1.0, noise_level=100,
                  size=(BASE, BASE))
    assert ours.low.shape == (2, 3, BASE, BASE) and ours.high.shape == (2, 3, 4 * BASE, 4 * BASE)

    gens = [torch.Generator("cpu").manual_seed(3 + i) for i in range(2)]
    pipe_1 = IFPipeline.from_pretrained(base_dir, local_files_only=True)
    pipe_2 = IFSuperResolutionPipeline.from_pretrained(up_dir, local_files_only=True)
    for pipe in (pipe_1, pipe_2):
        pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        low = pipe_1(prompt=[prompt] * 2, num_inference_steps=3, guidance_scale=5.0, height=BASE, width=BASE,
                     generator=gens, output_type="pt", clean_caption=False).images
        text = if_embeddings(first.text_encoder, first.tokenizer, prompt).expand(2, -1, -1)
        high = pipe_2(image=low, prompt_embeds=text, guidance_scale=1.0, num_inference_steps=3, noise_level=100,
                      height=4 * BASE, width=4 * BASE, generator=gens, output_type="pt").images
    assert_close_scaled(ours.low, low, what="danqing-tiny-if stage I")
    assert_close_scaled(ours.high, high, what="danqing-tiny-if stage II")


def test_judging_a_cascade_from_the_cli(stages, tmp_path, capsys):
    from typer.testing import CliRunner

    from danqing.cli import app, main

    base_dir, up_dir, _ = stages
    common = ["--home", str(tmp_path), "eval", "cascade", "--model", str(base_dir), "--n", "2", "--steps", "2"]
    res = CliRunner().invoke(app, common + ["--stage-2", str(up_dir), "--upscale-steps", "2", "--out",
                                            str(tmp_path / "rows"), "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "c.json").read_text())["summary"]
    assert summary["n"] == 2 and summary["base"]["n"] == 2 and summary["cascade"]["n"] == 2
    rows = sorted((tmp_path / "rows").glob("*.png"))
    assert len(rows) == 2 and Image.open(rows[0]).size == (2 * 4 * BASE, 4 * BASE)  # low (enlarged), high
    res = CliRunner().invoke(app, common + ["--thresholding", "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "t.json").read_text())["summary"]["thresholding"]
    assert [(r["cfg_scale"], r["x0"]) for r in table] == [
        (7.0, "dynamic thresholding"), (7.0, "static clipping"), (20.0, "dynamic thresholding"),
        (20.0, "static clipping")]
    capsys.readouterr()
    for args, said in ((["--home", str(tmp_path), "eval", "cascade", "--model", str(up_dir)],
                        "not a DeepFloyd IF stage-I folder (IFPipeline)"),
                       (common + ["--noise-level", "1000"], "noise_level: must be 0-999, got 1000")):
        with pytest.raises(SystemExit) as stop:
            main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and said in err and len(err.strip().splitlines()) == 1, err


def test_clipped_pixels_measure_over_saturation():
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import eval_scenes
    from danqing.training.cascade import clipped_share

    assert clipped_share(render(eval_scenes(1)[0], 128)) == 0.0  # the world has no colour at the range's ends
    a = np.full((10, 10, 3), 128, np.uint8)
    a[:5, :, 0] = 255
    assert clipped_share(Image.fromarray(a)) == 0.5


def test_the_unconditional_recipe_is_a_ddpm_pipeline_our_loop_runs(tmp_path):
    from diffusers import DDPMPipeline

    from danqing.sampling.cascade import run_ddpm
    from danqing.training.cascade import PLAIN_SCHEDULER, train_cascade

    summary = train_cascade(_config("unconditional", tmp_path / "ddpm"), log=lambda _: None)
    assert summary["stage"] == "unconditional" and (tmp_path / "ddpm" / "samples" / "step-000003.png").is_file()
    pipe = DDPMPipeline.from_pretrained(tmp_path / "ddpm" / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.beta_schedule == PLAIN_SCHEDULER["beta_schedule"] == "linear"
    ours = run_ddpm(pipe.unet, dict(pipe.scheduler.config), [5, 6], steps=4)
    theirs = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], num_inference_steps=4,
                  output_type="np").images
    assert [im.size for im in ours] == [(BASE, BASE)] * 2
    diff = np.abs(np.stack([np.asarray(im, np.float32) / 255 for im in ours]) - theirs)
    assert float(diff.max()) <= 1 / 255 + 1e-6  # the same pictures, to 8-bit rounding
