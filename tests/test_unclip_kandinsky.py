"""danqing-tiny-unclip in Kandinsky 2.2's format (danqing.training.unclip, ``unclip.format =
"kandinsky"``): danqing-tiny's VAE as a MoVQ computes what the VAE computes, the decoder UNet
keeps danqing-tiny's weights beside its new image-embedding layers, and a short run writes a
``KandinskyV22Pipeline`` folder that diffusers runs to the same latents as danqing, judged by
``danqing eval unclip``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from danqing.synthetic.render import render
from danqing.synthetic.scenes import Obj, Scene
from danqing.training.config import UnclipTrainConfig, load_config

CONFIG = Path(__file__).parent.parent / "configs" / "train" / "danqing-tiny-unclip-kandinsky.toml"


def _picture():
    scene = Scene((Obj("circle", "red", "large", 0.3, 0.5), Obj("star", "blue", "large", 0.7, 0.5)),
                  background="white", style="plain", seed=0)
    return render(scene, 64)


@pytest.fixture(scope="module")
def base():
    from danqing.training.runs import load_float32

    return load_float32("danqing-tiny")[0]


def test_the_movq_computes_what_the_vae_computes(base):
    """Encoding gives the KL posterior's mean times the scaling factor; decoding without
    quantising is the VAE's decode of the unscaled latents; the codebook sits among the latents."""
    from danqing.models.unclip_models import movq_from_vae

    vae, sf = base.vae, base.vae.config.scaling_factor
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        movq = movq_from_vae(vae, mean * sf, codes=16)
        z = movq.encode(x).latents
        assert torch.allclose(z, mean * sf, atol=1e-4)
        assert torch.allclose(movq.decode(z, force_not_quantize=True).sample, vae.decode(mean).sample, atol=1e-4)
        codes = movq.quantize.embedding.weight
        assert codes.shape == (16, 4)
        # k-means centres of the latents: inside their range, and the quantised decode is near the true one
        lo, hi = z.amin(dim=(0, 2, 3)), z.amax(dim=(0, 2, 3))
        assert bool(((codes >= lo - 1e-5) & (codes <= hi + 1e-5)).all())
        quantised = movq.decode(z).sample
        assert 0 < float((quantised - vae.decode(mean).sample).abs().mean()) < 0.25


def test_the_decoder_unet_keeps_the_base_weights_and_adds_nothing_to_time_at_first(base):
    """Kandinsky's layout (image tokens, image added to time, noise + variance out) around
    danqing-tiny's weights: the noise half of the output layer is the base's, the variance half 0."""
    from danqing.training.unclip import kandinsky_unet

    unet = kandinsky_unet(base.unet, 64).eval()
    assert unet.config.encoder_hid_dim_type == "image_proj" and unet.config.addition_embed_type == "image"
    assert unet.config.out_channels == 8
    theirs = base.unet.state_dict()
    for k, v in unet.state_dict().items():
        if k.startswith(("encoder_hid_proj.", "add_embedding.")):
            continue
        if k.startswith("conv_out."):
            assert torch.equal(v[:4], theirs[k]) and float(v[4:].abs().max()) == 0.0, k
            continue
        assert torch.equal(v, theirs[k]), k
    embeds = torch.randn(3, 64)
    with torch.no_grad():
        assert float(unet.add_embedding(embeds).abs().max()) == 0.0
        tokens = unet.encoder_hid_proj(embeds)
    assert tokens.shape == (3, 32, 32)  # Kandinsky's 32 tokens, danqing-tiny's cross-attention width


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from danqing.training.unclip import train_unclip

    out = tmp_path_factory.mktemp("kandinsky-unclip") / "run"
    cfg = load_config(CONFIG, {"data.n_images": 48, "unet.steps": 6, "unet.batch_size": 8,
                               "run.output_dir": str(out), "run.checkpoint_every": 3, "run.eval_every": 6,
                               "run.eval_steps": 4, "unclip.eval_pictures": 2, "run.num_threads": 0},
                      model=UnclipTrainConfig)
    return out, train_unclip(cfg, log=lambda line: None)


def test_a_short_run_writes_a_kandinsky_decoder_diffusers_runs_alike(short_run):
    """The run's folder is a KandinskyV22Pipeline: diffusers' pipeline, given the picture's
    embedding and the zero picture's, draws the same latents as danqing's variations."""
    from diffusers import KandinskyV22Pipeline

    from danqing import GenerationRequest
    from danqing.models.clip_model import clip_folder
    from danqing.models.ip_adapter import load_image_encoder
    from danqing.models.unclip_models import load_kandinsky_decoder, unclip_kind_of_folder
    from danqing.sampling.kandinsky import picture_embedding, run_kandinsky
    from danqing.training.unclip import KandinskyVariations

    out, summary = short_run
    assert summary["steps"] == 6 and summary["format"] == "kandinsky" and summary["eval"]["n"] == 2
    assert unclip_kind_of_folder(out / "model") == "kandinsky-decoder"
    model = KandinskyVariations(load_kandinsky_decoder(out / "model"),
                                *load_image_encoder(clip_folder("danqing-tiny-clip")))
    request = GenerationRequest(prompt="", steps=4, cfg_scale=4.0, seed=5, width=64, height=64)
    ours = run_kandinsky(model, model.decoder, request, picture=_picture())
    pipe = KandinskyV22Pipeline.from_pretrained(out / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def keep(p, i, t, kw):
        seen["latents"] = kw["latents"].clone()
        return kw

    with torch.no_grad():
        pipe(image_embeds=picture_embedding(model, _picture()), negative_image_embeds=picture_embedding(model, None),
             num_inference_steps=4, guidance_scale=4.0, height=64, width=64, output_type="np",
             generator=torch.Generator("cpu").manual_seed(5), callback_on_step_end=keep)
    assert ours.latents.shape == (1, 4, 16, 16)
    assert float((ours.latents - seen["latents"]).abs().max()) < 1e-4


def test_eval_unclip_judges_a_kandinsky_decoder(short_run, tmp_path):
    """Variations (the pictures embedded by danqing-tiny-clip, the default) and the refusals of
    options that are Stable unCLIP's."""
    import json

    from typer.testing import CliRunner

    from danqing.cli import app
    from danqing.errors import InvalidRequest, ModelNotFound

    base = ["--home", str(tmp_path / "home"), "eval", "unclip", "--model", str(short_run[0] / "model"), "--n", "2",
            "--steps", "3"]
    res = CliRunner().invoke(app, base + ["--json", str(tmp_path / "v.json")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "v.json").read_text())["summary"]
    assert summary["n"] == 2 and 0 <= summary["same_objects"] <= 1
    res = CliRunner().invoke(app, base + ["--noise-level", "100"])
    assert isinstance(res.exception, InvalidRequest) and "--noise-level is Stable unCLIP's" in str(res.exception)
    res = CliRunner().invoke(app, base + ["--image-encoder", "nowhere-clip"])
    assert isinstance(res.exception, ModelNotFound) and "'nowhere-clip' not found" in str(res.exception)


def test_a_kandinsky_run_continues_from_an_earlier_decoder(short_run, tmp_path):
    """unclip.init_decoder with a Kandinsky decoder folder: the run starts from its UNet (the
    image projection included) and keeps its MoVQ."""
    from danqing.models.unclip_models import load_kandinsky_decoder
    from danqing.training.unclip import train_unclip

    first = load_kandinsky_decoder(short_run[0] / "model")
    cfg = load_config(CONFIG, {"data.n_images": 32, "unet.steps": 1, "unet.batch_size": 4, "unet.lr": 1e-12,
                               "run.output_dir": str(tmp_path / "run"), "unclip.eval_pictures": 0,
                               "unclip.init_decoder": str(short_run[0] / "model"), "run.num_threads": 0},
                      model=UnclipTrainConfig)
    train_unclip(cfg, log=lambda line: None)
    second = load_kandinsky_decoder(tmp_path / "run" / "model")
    w1, w2 = first.unet.encoder_hid_proj.image_embeds.weight, second.unet.encoder_hid_proj.image_embeds.weight
    assert torch.allclose(w1, w2, atol=1e-6)
    assert torch.equal(first.movq.quantize.embedding.weight, second.movq.quantize.embedding.weight)
