"""danqing-tiny-flow (danqing.training.flow): the rectified-flow objective, the trainer's text
conditioning against the sampler's, a short run whose SD3 folder danqing and diffusers' own
``StableDiffusion3Pipeline`` both run to the same latents, and the UNet twin's frozen text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from danqing.training.config import BaseTrainConfig, FlowTrainConfig, load_config

CONFIGS = Path(__file__).parent.parent / "configs" / "train"


def test_the_flow_pair_is_the_straight_line_and_its_velocity():
    from danqing.training.flow import flow_pair

    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x_t, v = flow_pair(x0, noise, torch.tensor([0.0, 0.25, 1.0]))
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2])
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(v, noise - x0)
    # an Euler step along the true velocity from any point of the line lands on the data
    assert torch.allclose(x_t[1] - 0.25 * v[1], x0[1], atol=1e-6)


def test_logit_normal_sigmas_sit_in_the_open_interval_around_the_middle():
    from danqing.training.flow import logit_normal_sigmas

    s = logit_normal_sigmas(torch.Generator().manual_seed(0), 20000)
    assert 0 < float(s.min()) and float(s.max()) < 1
    assert abs(float(s.median()) - 0.5) < 0.02
    # logit-normal(0, 1) puts less mass at the ends than uniform: P(sigma < 0.1) = Phi(-2.197) = 0.014
    assert 0.008 < float((s < 0.1).float().mean()) < 0.02
    shifted = logit_normal_sigmas(torch.Generator().manual_seed(0), 20000, mean=1.0)
    assert float(shifted.median()) > 0.7


@pytest.fixture(scope="module")
def built():
    from danqing.training.flow import flow_components
    from danqing.training.runs import load_float32

    cfg = load_config(CONFIGS / "danqing-tiny-flow.toml", model=FlowTrainConfig)
    base, _, _ = load_float32("danqing-tiny")
    return cfg, base, flow_components(cfg, base, seed=0)


def test_the_transformer_has_the_unets_parameter_count(built):
    from danqing.training.flow import parameter_count

    _, base, comps = built
    ours, theirs = parameter_count(comps.unet), parameter_count(base.unet)
    assert type(comps.unet).__name__ == "SD3Transformer2DModel"
    assert abs(ours - theirs) / theirs < 0.03, (ours, theirs)


@pytest.mark.parametrize("text", ["a red circle left of a blue star", "", "一个橙色的圆形在右边"])
def test_the_trainer_conditions_as_the_sampler_does(built, text):
    """The trainer's batch conditioning (token ids) == the sampler's FlowTextEncoder (the text)."""
    from danqing.conditioning.flow_text import FlowTextEncoder
    from danqing.training.data import tokenize_captions
    from danqing.training.flow import text_batch

    _, base, comps = built
    ids, _ = tokenize_captions(comps.tokenizer, [[text]])
    ctx, pooled = text_batch(comps, ids[:, 0].long())
    got = FlowTextEncoder(comps).encode(text)
    assert ctx.shape == (1, 77, 64)  # no T5 tokens: t5_tokens = 0
    assert torch.equal(got.hidden, ctx) and torch.equal(got.pooled, pooled)
    # the pooled embedding is danqing-tiny's own EOS state (identity projection), twice
    out = base.text_encoder(ids[:, 0].long())
    assert torch.allclose(pooled, torch.cat([out.pooler_output] * 2, dim=-1), atol=1e-6)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from danqing.training.flow import train_flow

    out = tmp_path_factory.mktemp("flow") / "run"
    cfg = load_config(CONFIGS / "danqing-tiny-flow.toml", {
        "data.n_images": 64, "unet.steps": 30, "unet.batch_size": 16, "unet.lr": 2e-3, "unet.warmup_steps": 2,
        "run.output_dir": str(out), "run.log_every": 5, "run.checkpoint_every": 15, "run.sample_every": 1000,
        "run.num_threads": 0}, model=FlowTrainConfig)
    summary = train_flow(cfg, log=lambda line: None)
    return out, summary


def test_a_short_run_learns_and_writes_an_sd3_folder(short_run):
    out, summary = short_run
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    # the logged loss is a running mean (0.98), so it falls slowly but every time
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["_max_sequence_length"] == 0
    assert summary["steps"] == 30 and summary["parameters"] == 1_630_576


def test_danqing_and_diffusers_run_the_trained_folder_alike(short_run, tmp_path):
    """Our loader and loop against diffusers' from_pretrained + StableDiffusion3Pipeline given the
    folder's max_sequence_length: the same latents."""
    from diffusers import StableDiffusion3Pipeline

    from danqing import GenerationRequest, Settings, Studio

    out, _ = short_run
    studio = Studio(Settings(home=tmp_path / "home", models_dir=tmp_path / "models", device="cpu", dtype="fp32"))
    request = GenerationRequest(prompt="a red circle left of a blue star", negative_prompt="", sampler="Euler",
                                steps=6, seed=7, width=64, height=64, cfg_scale=5.0, model=str(out / "model"))
    ours = studio.generate(request)
    comps = studio.models.load(str(out / "model")).components
    assert comps.family == "sd3" and comps.t5_tokens == 0
    # without T5, as diffusers' docs load SD3 without it
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "model", text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt=request.prompt, negative_prompt="", num_inference_steps=6, height=64, width=64,
                   guidance_scale=5.0, max_sequence_length=0, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(7)).images
    assert float((ours.latents[0] - ref).abs().max()) < 1e-4


def test_the_single_file_keeps_the_context_length(short_run, tmp_path):
    from danqing.models.flow_files import load_flow_single_file, save_flow_single_file
    from danqing.models.loader import load_diffusers_folder

    out, _ = short_run
    comps = load_diffusers_folder(out / "model")
    path = save_flow_single_file(comps, tmp_path / "flow.safetensors")
    back = load_flow_single_file(path)
    assert back.t5_tokens == 0 and back.family == "sd3"


def test_a_bad_context_length_in_model_index_is_refused(short_run, tmp_path):
    import shutil

    from danqing.errors import CorruptModel
    from danqing.models.loader import load_diffusers_folder

    out, _ = short_run
    folder = shutil.copytree(out / "model", tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_max_sequence_length": "many"}))
    with pytest.raises(CorruptModel, match="_max_sequence_length must be a whole number 0-512"):
        load_diffusers_folder(folder)


def test_the_unet_twin_keeps_its_frozen_text_encoder(tmp_path):
    """model.frozen_text_encoder_from: the base trainer starts from that model's text encoder and
    trains the UNet alone (the flow comparison's other side)."""
    from danqing.training.base import train_base
    from danqing.training.runs import load_float32

    cfg = load_config(CONFIGS / "flow-baseline-unet.toml", {
        "data.n_images": 32, "unet.steps": 3, "unet.batch_size": 8, "run.output_dir": str(tmp_path / "run"),
        "run.sample_every": 1000, "run.num_threads": 0}, model=BaseTrainConfig)
    train_base(cfg, log=lambda line: None)
    from danqing.models.loader import load_diffusers_folder

    trained = load_diffusers_folder(tmp_path / "run" / "model")
    base, _, _ = load_float32("danqing-tiny")
    te_same = all(torch.equal(a, b) for a, b in zip(trained.text_encoder.state_dict().values(),
                                                    base.text_encoder.state_dict().values()))
    unet_same = all(torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(),
                                                      base.unet.state_dict().values()))
    assert te_same and not unet_same
