"""Fine-tuning: datasets, LoRA / DreamBooth / textual-inversion training, file round trips, resume.

The heavy measurements (the concept taught to danqing-tiny, scores before and after) are in
``scripts/eval_concept.py`` and docs/training.md; here a short LoRA run on danqing-tiny must
already move the concept score, and the tiny random models check the mechanics.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from danqing.errors import InvalidRequest
from danqing.training import config as C
from danqing.training.data import bucket_sizes, caption_folder, fit_bucket, process_caption


def _img(path: Path, size=(40, 24), colour=(200, 30, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_caption_folder_layouts(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):
        _img(plain / f"{i}.png").with_suffix(".txt").write_text(f"caption {i}")
    items = caption_folder(plain, repeats=2)
    assert [it.captions for it in items] == [["caption 0"], ["caption 1"], ["caption 2"]]
    assert {it.repeats for it in items} == {2}

    kohya = tmp_path / "kohya"
    for folder, n in (("10_heart", 2), ("1_class", 1)):
        (kohya / folder).mkdir(parents=True)
        for i in range(n):
            _img(kohya / folder / f"{i}.jpg").with_suffix(".txt").write_text(folder)
    items = caption_folder(kohya)
    assert sorted((it.captions[0], it.repeats) for it in items) == [("10_heart", 10), ("10_heart", 10), ("1_class", 1)]

    meta = tmp_path / "meta"
    meta.mkdir()
    _img(meta / "a.png")
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red heart"}) + "\n")
    assert caption_folder(meta)[0].captions == ["a red heart"]


def test_caption_folder_errors_say_which(tmp_path):
    with pytest.raises(InvalidRequest, match="not a folder"):
        caption_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="no images"):
        caption_folder(tmp_path / "empty")
    d = tmp_path / "some"
    d.mkdir()
    _img(d / "a.png").with_suffix(".txt").write_text("ok")
    _img(d / "b.png")
    _img(d / "c.png")
    with pytest.raises(InvalidRequest, match=r"2 of 3 images have no \.txt caption \(b\.png, c\.png\)"):
        caption_folder(d)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    (bad / "x.txt").write_text("x")
    with pytest.raises(InvalidRequest, match="x.png: unreadable image"):
        caption_folder(bad)


def test_buckets_and_captions():
    b = bucket_sizes(128, 32)
    assert (128, 128) in b and all(w % 32 == 0 and h % 32 == 0 and w * h <= 128 * 128 for w, h in b)
    assert bucket_sizes(64, 32) == [(64, 64)]  # danqing-tiny: too small for other shapes
    wide = fit_bucket(Image.new("RGB", (300, 100)), b, 128)
    assert wide.width > wide.height and wide.size in b
    assert fit_bucket(Image.new("RGB", (300, 100)), None, 64).size == (64, 64)
    rng = random.Random(0)
    outs = {process_caption("sks, red, heart, left", rng, shuffle=True, keep=1) for _ in range(50)}
    assert len(outs) > 1 and all(o.startswith("sks, ") and sorted(o.split(", ")) == sorted("sks, red, heart, left".split(", "))
                                 for o in outs)
    dropped = sum(process_caption("x", rng, dropout=0.3) == "" for _ in range(1000))
    assert 230 < dropped < 370


def test_masked_loss_weights_the_masked_pixels(tmp_path):
    """kohya's masked loss: an alpha channel (or a rendered scene's objects) becomes the mask,
    and the loss is the weighted mean of the per-pixel errors."""
    from diffusers import DDPMScheduler

    from danqing.training.data import concept_items
    from danqing.training.loop import diffusion_loss

    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 4, 8))
    d = tmp_path / "alpha"
    d.mkdir()
    rgba.save(d / "a.png")
    (d / "a.txt").write_text("left half")
    item = caption_folder(d)[0]
    assert item.mask is not None and np.asarray(item.mask)[:, :4].min() == 255 and np.asarray(item.mask)[:, 4:].max() == 0
    heart = concept_items("heart", 1, size=64)[0]
    m = np.asarray(heart.mask) > 127
    rgb = np.asarray(heart.image).astype(int)
    assert 0.01 < m.mean() < 0.2 and rgb[m].std(0).max() < 30  # the mask covers the one coloured object

    class Echo(torch.nn.Module):  # predicts 0, so the error map is the target's square
        def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
            return type("O", (), {"sample": torch.zeros_like(x)})()

    sched = DDPMScheduler(num_train_timesteps=1000)
    z = torch.zeros(2, 4, 4, 4)
    plain = diffusion_loss(Echo(), sched, z, None, None, torch.Generator().manual_seed(0), v_prediction=False)
    ones = diffusion_loss(Echo(), sched, z, None, None, torch.Generator().manual_seed(0), v_prediction=False,
                          weight_map=torch.ones(2, 1, 4, 4))
    assert torch.allclose(plain, ones)
    w = torch.zeros(2, 1, 4, 4)
    w[:, :, :2] = 1
    half = diffusion_loss(Echo(), sched, z, None, None, torch.Generator().manual_seed(0), v_prediction=False, weight_map=w)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(half, (noise[:, :, :2] ** 2).mean(dim=(1, 2, 3)))


# ---------------------------------------------------------------------------------------------
# Training on tiny random models
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def settings(models_dir, tmp_path):
    from danqing import Settings

    return Settings(home=tmp_path / "home", models_dir=models_dir, device="cpu", dtype="fp32")


def _lora_cfg(base: str, out: Path, **sections):
    raw = {"model": {"base": base}, "data": {"source": "concept:heart", "n_images": 6, "resolution": 64},
           "network": {"rank": 4, "alpha": 2, "train_text_encoder": True},
           "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "lr_scheduler": "constant"},
           "output": {"output_dir": str(out), "name": "t", "checkpoint_every": 2, "sample_every": 1000, "log_every": 1,
                      "sample_prompts": ["a red heart"], "sample_steps": 2}}
    for k, v in sections.items():
        raw[k].update(v)
    return C.LoraTrainConfig.model_validate(raw)


def test_lora_kohya_and_diffusers_files_give_the_same_image(settings, tmp_path):
    """The LoRA saved in kohya format and in diffusers format make the same image."""
    from danqing import GenerationRequest, Studio
    from danqing.training.finetune import train_lora

    summary = train_lora(_lora_cfg("tiny-sd1", tmp_path / "run"), resume=False, log=lambda s: None, settings=settings)
    kohya, diffusers = map(Path, summary["files"])
    assert kohya.name == "t.safetensors" and diffusers.name == "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(kohya), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    # kohya / A1111 / ComfyUI name the text encoder's layers lora_te_text_model_encoder_layers_...
    assert all(k.startswith("lora_te_text_model_") for k in keys if k.startswith("lora_te_"))
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_num_train_images"] == "6"
    assert meta["ss_max_train_steps"] == "4" and meta["ss_sd_model_name"] == "tiny-sd1"
    assert meta["ss_new_sd_model_hash"] == Studio(settings).registry.sha256(Studio(settings).registry.find("checkpoint", "tiny-sd1"))

    lora_dir = settings.models_dir / "lora"
    (lora_dir / "t-kohya.safetensors").write_bytes(kohya.read_bytes())
    (lora_dir / "t-diffusers.safetensors").write_bytes(diffusers.read_bytes())
    try:
        studio = Studio(settings)
        imgs = {}
        for name in ("", " <lora:t-kohya:1>", " <lora:t-diffusers:1>"):
            req = GenerationRequest.create(prompt="a red heart" + name, model="tiny-sd1", width=64, height=64, steps=4, seed=5)
            imgs[name] = np.asarray(studio.generate(req).images[0], dtype=np.int16)
        assert np.abs(imgs[" <lora:t-kohya:1>"] - imgs[""]).mean() > 0.5  # the LoRA does something
        assert np.abs(imgs[" <lora:t-kohya:1>"] - imgs[" <lora:t-diffusers:1>"]).max() <= 1
    finally:
        for p in lora_dir.glob("t-*.safetensors"):
            p.unlink()


def test_pivotal_tuning_bundles_the_word_and_merges_like_the_tag(settings, tmp_path):
    """network.train_words: the word's input embedding trains with the LoRA and goes into the
    kohya file as A1111's bundle_emb.<word>.string_to_param.*; using the LoRA uses the word's new
    vector (the picture differs from the same file without it), and merge-lora bakes it into the
    token table, so the merged checkpoint draws what the tag draws."""
    from safetensors.torch import load_file, save_file

    from danqing import GenerationRequest, Studio
    from danqing.customise.merge import merge_loras
    from danqing.models.loader import load_diffusers_folder
    from danqing.training.finetune import train_lora

    cfg = _lora_cfg("tiny-sd1", tmp_path / "run", network={"train_words": ["heart"], "word_lr": 0.05})
    summary = train_lora(cfg, resume=False, log=lambda s: None, settings=settings)
    sd = load_file(summary["files"][0])
    vec = sd["bundle_emb.heart.string_to_param.*"]
    comps = load_diffusers_folder(settings.models_dir / "checkpoints" / "tiny-sd1")
    row = comps.text_encoder.get_input_embeddings().weight[comps.tokenizer("heart", add_special_tokens=False).input_ids]
    assert vec.shape == row.shape == (1, 32) and not torch.allclose(vec, row)
    assert not any(k.startswith("bundle_emb") for k in load_file(summary["files"][1]))  # diffusers: no place for it

    lora_dir = settings.models_dir / "lora"
    (lora_dir / "piv.safetensors").write_bytes(Path(summary["files"][0]).read_bytes())
    save_file({k: v for k, v in sd.items() if not k.startswith("bundle_emb")}, str(lora_dir / "piv-nowords.safetensors"))
    merged = settings.models_dir / "checkpoints" / "tiny-sd1-piv.safetensors"
    try:
        studio = Studio(settings)
        merge_loras(studio.registry, "tiny-sd1", [("piv", 1.0)], merged)

        def draw(prompt: str, model: str = "tiny-sd1"):
            req = GenerationRequest.create(prompt=prompt, model=model, width=64, height=64, steps=4, seed=5)
            return np.asarray(Studio(settings).generate(req).images[0], dtype=np.int16)

        tag, no_words = draw("a red heart <lora:piv:1>"), draw("a red heart <lora:piv-nowords:1>")
        assert np.abs(tag - no_words).mean() > 0.5  # the bundled vector is used
        assert np.abs(tag - draw("a red heart", "tiny-sd1-piv")).max() <= 1
    finally:
        for p in (*lora_dir.glob("piv*.safetensors"), merged):
            p.unlink(missing_ok=True)


def test_text_encoder_only_lora_leaves_the_unet_alone(settings, tmp_path):
    """network.train_unet = false (kohya's network_train_text_encoder_only): the file holds the
    text encoder's adapters and the words only, and a config in which nothing trains is refused
    by name."""
    from safetensors.torch import load_file

    from danqing.training.finetune import train_lora

    cfg = _lora_cfg("tiny-sd1", tmp_path / "run", network={"train_unet": False, "train_words": ["heart"]})
    summary = train_lora(cfg, resume=False, log=lambda s: None, settings=settings)
    keys = list(load_file(summary["files"][0]))
    assert keys and not any(k.startswith("lora_unet") for k in keys)
    assert any(k.startswith("lora_te") for k in keys) and "bundle_emb.heart.string_to_param.*" in keys
    with pytest.raises(InvalidRequest, match="nothing trains"):
        train_lora(_lora_cfg("tiny-sd1", tmp_path / "none", network={"train_unet": False, "train_text_encoder": False}),
                   resume=False, log=lambda s: None, settings=settings)


def test_words_only_lora_is_a_file_of_bundled_vectors_that_loads(settings, tmp_path):
    """Only the trigger's vectors train (textual inversion inside a LoRA file): the file holds
    ``bundle_emb`` tensors and no module, it reads as a network with no modules, and its vectors
    moved away from the word's own rows."""
    from safetensors.torch import load_file

    from danqing.customise.lora import read_bundled, read_network
    from danqing.models.loader import load_components
    from danqing.training.finetune import train_lora

    cfg = _lora_cfg("tiny-sd1", tmp_path / "run", network={"train_unet": False, "train_text_encoder": False,
                                                           "train_words": ["heart"]})
    summary = train_lora(cfg, resume=False, log=lambda s: None, settings=settings)
    path = summary["files"][0]
    assert list(load_file(path)) == ["bundle_emb.heart.string_to_param.*"]
    assert read_network(path)[0] == {}
    vec = read_bundled(path)["heart"]["emb_params"]
    comps = load_components(Studio_registry(settings).find("checkpoint", "tiny-sd1"))
    ids = comps.tokenizer("heart", add_special_tokens=False).input_ids
    row = comps.text_encoder.get_input_embeddings().weight[ids].detach().float()
    assert vec.shape == row.shape and (vec - row).abs().max() > 1e-3


def test_new_words_start_from_their_text_and_are_bundled(settings, tmp_path):
    """``network.word_init``: the word becomes one new vector per token of its text, starting
    from those tokens' rows; the vectors train (and stay near where they started in a short
    run) and are bundled in the kohya file under the word. Both kinds of words at once, and a
    word no caption names, are refused."""
    from danqing.customise.lora import read_bundled
    from danqing.errors import InvalidRequest
    from danqing.models.loader import load_components
    from danqing.training.finetune import train_lora

    text = "a red heart shape"
    cfg = _lora_cfg("tiny-sd1", tmp_path / "run", network={"train_unet": False, "train_text_encoder": True,
                                                           "word_init": {"heart": text}, "word_lr": 1e-2})
    summary = train_lora(cfg, resume=False, log=lambda s: None, settings=settings)
    vec = read_bundled(summary["files"][0])["heart"]["emb_params"]
    comps = load_components(Studio_registry(settings).find("checkpoint", "tiny-sd1"))
    ids = comps.tokenizer(text, add_special_tokens=False).input_ids
    rows = comps.text_encoder.get_input_embeddings().weight[ids].detach().float()
    assert vec.shape == rows.shape == (4, rows.shape[1])
    moved = (vec - rows).abs().max()
    assert 1e-4 < moved < 0.1, moved
    with pytest.raises(ValueError, match="not both"):
        _lora_cfg("tiny-sd1", tmp_path / "x", network={"train_words": ["heart"], "word_init": {"heart": text}})
    with pytest.raises(InvalidRequest, match="in no caption"):
        train_lora(_lora_cfg("tiny-sd1", tmp_path / "y", network={"word_init": {"dq_nobody": text}}), resume=False,
                   log=lambda s: None, settings=settings)


def _xl_pipeline(comps):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=comps.vae, text_encoder=copy.deepcopy(comps.text_encoder),
                                     text_encoder_2=copy.deepcopy(comps.text_encoder_2), tokenizer=comps.tokenizer,
                                     tokenizer_2=comps.tokenizer_2, unet=copy.deepcopy(comps.unet),
                                     scheduler=DDIMScheduler.from_config(comps.scheduler_config))


def _xl_forward(te1, te2, unet, seed=0):
    """(context, UNet output) of tiny SDXL encoders and UNet on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    x, ids = torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 1000, (1, 77), generator=g)
    with torch.no_grad():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        o2 = te2(ids, output_hidden_states=True)
        ctx = torch.cat([h1, o2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": o2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        return ctx, unet(x, torch.tensor([300]), encoder_hidden_states=ctx, added_cond_kwargs=added).sample


def test_trained_sdxl_lora_has_a1111_names_and_the_tag_draws_what_merge_lora_bakes(settings, tmp_path):
    """A LoRA trained on tiny SDXL is written with the names kohya's sd-scripts and A1111 use for
    SDXL (the UNet's original LDM module names, ``lora_te1_`` / ``lora_te2_``); ``<lora:name:1>``
    at generation and the same file baked in by merge-lora give the same image, and diffusers'
    kohya loader reads the file to the same weights as ours."""
    from safetensors.torch import load_file

    from danqing import GenerationRequest, Studio
    from danqing.customise.lora import Activation, patched, read_network, resolve
    from danqing.customise.merge import merge_loras
    from danqing.decode import decode_latents
    from danqing.models.loader import load_components
    from danqing.training.finetune import train_lora

    cfg = _lora_cfg("tiny-sdxl", tmp_path / "run", output={"formats": ["kohya"]})
    (path,) = map(Path, train_lora(cfg, resume=False, log=lambda s: None, settings=settings)["files"])
    keys = set(load_file(path))
    # tiny SDXL: input_blocks.3 is down_blocks.1's first layer, output_blocks.0/1 are up_blocks.0's
    for key in ("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_up.weight",
                "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.alpha",
                "lora_unet_output_blocks_1_1_transformer_blocks_1_attn1_to_out_0.lora_down.weight",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight"):
        assert key in keys, (key, sorted(keys)[:8])
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks")) for k in keys)

    lora_dir, merged = settings.models_dir / "lora", settings.models_dir / "checkpoints" / "tiny-sdxl-xl.safetensors"
    (lora_dir / "xl-trained.safetensors").write_bytes(path.read_bytes())
    try:
        merge_loras(Studio(settings).registry, "tiny-sdxl", [("xl-trained", 1.0)], merged)

        def draw(prompt: str, model: str):
            req = GenerationRequest.create(prompt=prompt, model=model, width=64, height=64, steps=4, seed=5)
            return Studio(settings).generate(req)

        plain, tag = draw("a red heart", "tiny-sdxl"), draw("a red heart <lora:xl-trained:1>", "tiny-sdxl")
        baked = draw("a red heart", "tiny-sdxl-xl")
    finally:
        for p in (*lora_dir.glob("xl-trained.safetensors"), merged):
            p.unlink(missing_ok=True)
    comps = load_components(Studio_registry(settings).find("checkpoint", "tiny-sdxl"))
    # the images in [0, 1] before 8-bit rounding: one VAE decodes the three runs' latents
    px = {k: decode_latents(comps.vae, r.latents[0]) for k, r in (("plain", plain), ("tag", tag), ("baked", baked))}
    assert (px["tag"] - px["plain"]).abs().max() > 1e-2  # the LoRA does something
    assert (px["tag"] - px["baked"]).abs().max() < 1e-4
    # the latents of this random tiny model reach |z| ~ 30: the same up to float rounding at that scale
    scale = tag.latents[0].abs().max()
    assert (tag.latents[0] - baked.latents[0]).abs().max() <= 1e-5 * scale < (tag.latents[0] - plain.latents[0]).abs().max()
    modules, _ = read_network(path)
    act = Activation(resolve("xl", "0" * 64, modules, comps, "tiny-sdxl"), 1.0, 1.0)
    assert len(act.network.targets) == len(modules)
    pipe = _xl_pipeline(comps)
    pipe.load_lora_weights(str(path))
    ref_ctx, ref = _xl_forward(pipe.text_encoder, pipe.text_encoder_2, pipe.unet)
    with patched(comps, [act]):
        ctx, out = _xl_forward(comps.text_encoder, comps.text_encoder_2, comps.unet)
    assert (out - ref).abs().max() < 1e-4 and (ctx - ref_ctx).abs().max() < 1e-4


def test_resumed_run_equals_uninterrupted_run(settings, tmp_path):
    from safetensors.torch import load_file

    from danqing.training.finetune import train_lora

    straight = train_lora(_lora_cfg("tiny-sd1", tmp_path / "a", train={"steps": 4}), resume=False, log=lambda s: None,
                          settings=settings)
    train_lora(_lora_cfg("tiny-sd1", tmp_path / "b", train={"steps": 2}), resume=False, log=lambda s: None, settings=settings)
    lines = []
    resumed = train_lora(_lora_cfg("tiny-sd1", tmp_path / "b", train={"steps": 4}), resume=True, log=lines.append,
                         settings=settings)
    assert any("resumed from" in s and "step 2" in s for s in lines)
    a, b = load_file(straight["files"][0]), load_file(resumed["files"][0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_mixed_precision_and_gradient_accumulation_through_accelerate(settings, tmp_path):
    """accelerate's bf16 autocast (the CPU has it too) really runs the forward in bf16: the loss
    differs from the fp32 run's but stays close, and the files come out fp32 as kohya writes
    them. grad_accum = 2 with batch 1 steps the optimiser once per two micro-batches."""
    from safetensors.torch import load_file

    from danqing.training.finetune import train_lora

    runs = {}
    for mp in ("no", "bf16"):
        runs[mp] = train_lora(_lora_cfg("tiny-sd1", tmp_path / mp, train={"mixed_precision": mp}), resume=False,
                              log=lambda s: None, settings=settings)
    lo, hi = runs["no"]["loss"], runs["bf16"]["loss"]
    assert np.isfinite(hi) and hi != lo and abs(hi - lo) < 0.1 * lo, (lo, hi)
    sd = load_file(runs["bf16"]["files"][0])
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert not all(torch.equal(sd[k], load_file(runs["no"]["files"][0])[k]) for k in sd)

    acc = train_lora(_lora_cfg("tiny-sd1", tmp_path / "acc", train={"grad_accum": 2, "batch_size": 1}), resume=False,
                     log=lambda s: None, settings=settings)
    assert np.isfinite(acc["loss"]) and acc["steps"] == 4


@pytest.mark.parametrize("base", ["tiny-sd2", "tiny-sdxl"])
def test_lora_trains_v_prediction_and_sdxl(settings, tmp_path, base):
    """SD2 (v-prediction, with min-SNR and noise offset) and SDXL (two text encoders): the run
    finishes with a finite loss and its file fits the model."""
    from danqing.customise.lora import read_network, resolve
    from danqing.models.loader import load_components
    from danqing.training.finetune import train_lora

    cfg = _lora_cfg(base, tmp_path / base, train={"min_snr_gamma": 5.0, "noise_offset": 0.05})
    summary = train_lora(cfg, resume=False, log=lambda s: None, settings=settings)
    assert np.isfinite(summary["loss"])
    comps = load_components(Studio_registry(settings).find("checkpoint", base))
    modules, _ = read_network(Path(summary["files"][0]))
    net = resolve("t", "0" * 64, modules, comps, base)
    parts = {t[0] for t in net.targets}
    assert "unet" in parts and "text_encoder" in parts and (base != "tiny-sdxl" or "text_encoder_2" in parts)


def Studio_registry(settings):
    from danqing.models.registry import Registry

    return Registry(settings.models_dir)


def test_training_errors(settings, tmp_path):
    from danqing.training.finetune import train_lora

    with pytest.raises(InvalidRequest, match="network.rank: rank 500 is larger than the smallest targeted layer"):
        train_lora(_lora_cfg("tiny-sd1", tmp_path / "r", network={"rank": 500}), log=lambda s: None, settings=settings)
    with pytest.raises(InvalidRequest, match="unknown concept 'unicorn'"):
        train_lora(_lora_cfg("tiny-sd1", tmp_path / "r", data={"source": "concept:unicorn"}), log=lambda s: None,
                   settings=settings)
    with pytest.raises(InvalidRequest, match="config: .*train.steps"):
        path = tmp_path / "bad.toml"
        path.write_text("[train]\nsteps = 0\n")
        C.load_config(path, model=C.LoraTrainConfig)
    assert not (tmp_path / "r" / "t.safetensors").exists()  # nothing written half


def test_dreambooth_with_prior_preservation_runs(settings, tmp_path):
    from danqing.models.loader import load_diffusers_folder
    from danqing.training.finetune import train_dreambooth

    cfg = C.DreamBoothTrainConfig.model_validate({
        "model": {"base": "tiny-sd1"}, "data": {"source": "concept:heart", "n_images": 4},
        "prior": {"n_class_images": 3, "sample_steps": 2},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3},
        "output": {"output_dir": str(tmp_path / "db"), "name": "db", "sample_every": 1000, "checkpoint_every": 1000}})
    lines = []
    summary = train_dreambooth(cfg, resume=False, log=lines.append, settings=settings)
    assert any("generating 3 class images" in s for s in lines)
    assert len(list((tmp_path / "db" / "class_images").glob("*.png"))) == 3
    assert len(list((tmp_path / "db" / "class_images").glob("*.txt"))) == 3
    comps = load_diffusers_folder(Path(summary["files"][0]))
    base = load_diffusers_folder(settings.models_dir / "checkpoints" / "tiny-sd1")
    changed = [n for (n, p), (_, q) in zip(comps.unet.named_parameters(), base.unet.named_parameters())
               if not torch.equal(p, q)]
    assert len(changed) > 10  # the whole UNet trains


def test_textual_inversion_trains_only_the_new_word(settings, tmp_path):
    from safetensors.torch import load_file

    from danqing.training.finetune import train_textual_inversion

    cfg = C.TextualInversionTrainConfig.model_validate({
        "model": {"base": "tiny-sd1"}, "data": {"source": "concept:heart", "n_images": 4},
        "embedding": {"name": "dq-heart", "init_word": "shape", "n_vectors": 2},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-2},
        "output": {"output_dir": str(tmp_path / "ti"), "sample_every": 1000, "checkpoint_every": 1000}})
    summary = train_textual_inversion(cfg, resume=False, log=lambda s: None, settings=settings)
    sd = load_file(summary["files"][0])
    assert list(sd) == ["emb_params"] and sd["emb_params"].shape == (2, 32)
    from danqing.customise.embeddings import load_embedding  # what generation reads from embeddings/

    emb = load_embedding(summary["files"][0])
    assert emb.name == "dq-heart" and torch.equal(emb.vectors["emb_params"], sd["emb_params"])
    bad = cfg.model_copy(update={"embedding": C.EmbeddingConfig(name="heart")})
    with pytest.raises(InvalidRequest, match="'heart' is a word of the tokenizer's vocabulary"):
        train_textual_inversion(bad, resume=False, log=lambda s: None, settings=settings)


# ---------------------------------------------------------------------------------------------
# The concept on danqing-tiny (a short version of the run in docs/training.md)
# ---------------------------------------------------------------------------------------------
def _concept_score(studio, scenes, prompt) -> float:
    """The evaluator's mean object score of danqing-tiny on ``scenes``, each drawn from
    ``prompt(canonical caption)`` at the documented settings' seeds (1000 + i), 20 steps, 64 px."""
    from danqing import GenerationRequest
    from danqing.synthetic.captions import caption
    from danqing.synthetic.evaluate import score

    ok = 0.0
    for i, s in enumerate(scenes):
        req = GenerationRequest.create(prompt=prompt(caption(s)), model="danqing-tiny", steps=20, seed=1000 + i,
                                       width=64, height=64)
        ok += score(studio.generate(req).images[0], s.spec).object
    return ok / len(scenes)


def test_the_bundled_heart_lora_teaches_danqing_tiny_the_heart(tmp_path):
    """The bundled ``heart`` LoRA (configs/train/lora-heart.toml, 1,500 steps; docs/training.md)
    on 12 held-out heart prompts: danqing-tiny alone never draws the heart, with the tag it does.
    The recipe's mechanics are the short runs above; the pivotal and textual-inversion runs
    below train on danqing-tiny end to end."""
    from danqing import Settings, Studio
    from danqing.synthetic.concepts import concept_scenes

    studio = Studio(Settings(home=tmp_path / "home", models_dir=tmp_path / "models", device="cpu", dtype="fp32"))
    scenes = concept_scenes(12, split="eval")

    def rate(suffix: str) -> float:
        return _concept_score(studio, scenes, lambda text: text + suffix)

    before, after = rate(""), rate(" <lora:heart:1>")
    # measured: 0.0 -> 0.83 (0.84 on the documented 50 prompts)
    assert before <= 0.1 and after >= 0.7, (before, after)


def test_a_short_pivotal_lora_run_teaches_danqing_tiny_magenta(tmp_path):
    """LoRA on the colour concept, short: configs/train/lora-magenta.toml (a light
    attention LoRA + the word's embedding, bundled) for 300 steps with 24 regularisation images."""
    from danqing import Settings, Studio
    from danqing.synthetic.concepts import concept_scenes
    from danqing.training.config import load_config
    from danqing.training.finetune import train_lora

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/train/lora-magenta.toml",
                      {"train.steps": 300, "prior.n_class_images": 24, "output.output_dir": str(tmp_path / "run"),
                       "output.sample_every": 10_000, "output.formats": ["kohya"]}, model=C.LoraTrainConfig)
    settings = Settings(home=tmp_path / "home", models_dir=tmp_path / "models", device="cpu", dtype="fp32")
    (settings.models_dir / "lora").mkdir(parents=True)
    summary = train_lora(cfg, resume=False, log=lambda s: None, settings=settings)
    Path(summary["files"][0]).rename(settings.models_dir / "lora" / "magenta.safetensors")
    studio = Studio(settings)
    scenes = concept_scenes(12, concept="magenta", split="eval")

    def rate(suffix: str) -> float:
        return _concept_score(studio, scenes, lambda text: text + suffix)

    before, after = rate(""), rate(" <lora:magenta:1>")
    # the documented 800-step run reaches 0.92 on 50 prompts (base 0.08; 0.33 on these 12)
    assert after >= 0.7 and after - before >= 0.4, (before, after)


def test_a_short_textual_inversion_run_teaches_danqing_tiny_magenta(tmp_path):
    """Textual inversion, short: a new colour word learnt from 20 rendered
    pictures of magenta shapes (a colour danqing-tiny never saw). The frozen model can reach it
    (its purple-to-pink range), so the word alone carries it; ordinary prompts cannot change."""
    from danqing import Settings, Studio
    from danqing.synthetic.concepts import concept_scenes
    from danqing.training.config import load_config
    from danqing.training.finetune import train_textual_inversion

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/train/ti-magenta.toml",
                      {"train.steps": 300, "output.output_dir": str(tmp_path / "run"), "output.sample_every": 10_000},
                      model=C.TextualInversionTrainConfig)
    settings = Settings(home=tmp_path / "home", models_dir=tmp_path / "models", device="cpu", dtype="fp32")
    (settings.models_dir / "embeddings").mkdir(parents=True)
    summary = train_textual_inversion(cfg, resume=False, log=lambda s: None, settings=settings)
    Path(summary["files"][0]).rename(settings.models_dir / "embeddings" / "dq-magenta.safetensors")
    studio = Studio(settings)
    scenes = concept_scenes(12, concept="magenta", split="eval")

    def rate(word: str) -> float:
        return _concept_score(studio, scenes, lambda text: text.replace("magenta", word))

    before, pink, after = rate("magenta"), rate("pink"), rate("dq-magenta")
    # measured here: 0.33 (the untrained word "magenta" sometimes lands between pink and purple;
    # 0.08 on the documented 50 prompts), 0.0 and 0.92; the documented 800-step run reaches 0.90
    assert pink <= 0.1 and after >= 0.7 and after - before >= 0.4, (before, pink, after)


def test_out_of_memory_is_one_clear_line_and_writes_nothing(settings, tmp_path, monkeypatch):
    from danqing.errors import OutOfMemory
    from danqing.training import finetune, loop

    calls = {"n": 0}
    real = loop.diffusion_loss

    def tight(*a, **kw):  # the third step does not fit
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **kw)

    monkeypatch.setattr(loop, "diffusion_loss", tight)
    cfg = _lora_cfg("tiny-sd1", tmp_path / "oom", train={"steps": 4}, output={"checkpoint_every": 2})
    with pytest.raises(OutOfMemory, match=r"out of memory at step 3 \(train.batch_size = 2\); lower train.batch_size.*"
                                          r"step-2\) is kept"):
        finetune.train_lora(cfg, resume=False, log=lambda s: None, settings=settings)
    assert not list((tmp_path / "oom").glob("*.safetensors")) and not (tmp_path / "oom" / "t-diffusers").exists()
    assert (tmp_path / "oom" / "checkpoints" / "step-2" / "step.json").is_file()


def test_words_are_left_out_of_a_caption_whole():
    from danqing.training.conditioning import without_words

    assert without_words("a photo of dq_anna, smiling, on a grey background", ["dq_anna"]) == \
        "a photo of, smiling, on a grey background"
    assert without_words("dq_anna and dq_annabel, dq_anna", ["dq_anna"]) == "and dq_annabel"
    assert without_words("a red heart", []) == "a red heart"


def test_text_preservation_keeps_other_prompts_encoded_as_before(settings, tmp_path):
    """``network.te_preserve``: the text encoder's LoRA is held to the base encoder on the
    captions without the trained word, so a prompt that does not name it is encoded much as the
    base model encodes it, while the word's vectors still train. Refused without a text-encoder
    LoRA, and with nothing to preserve."""
    from danqing.customise.lora import Activation, patched, read_bundled, read_network, resolve
    from danqing.models.loader import load_components
    from danqing.training.conditioning import tokenize
    from danqing.training.finetune import train_lora

    comps = load_components(Studio_registry(settings).find("checkpoint", "tiny-sd1"))
    ids = tokenize(comps.tokenizer, ["a blue circle on a white background, flat colours"], "cpu")
    with torch.no_grad():
        base = comps.text_encoder(ids)[0]
    moved = {}
    for weight in (0.0, 100.0):
        cfg = _lora_cfg("tiny-sd1", tmp_path / f"run{weight:g}", train={"steps": 6},
                        network={"train_unet": False, "train_text_encoder": True, "rank": 4,
                                 "word_init": {"heart": "a red heart shape"}, "te_preserve": weight})
        path = train_lora(cfg, resume=False, log=lambda s: None, settings=settings)["files"][0]
        assert read_bundled(path)["heart"]["emb_params"].shape[0] == 4
        modules, _ = read_network(Path(path))
        with torch.no_grad(), patched(comps, [Activation(resolve("t", "0" * 64, modules, comps, "tiny-sd1"), 1.0, 1.0)]):
            moved[weight] = float((comps.text_encoder(ids)[0] - base).pow(2).mean())
    assert moved[0.0] > 0 and moved[100.0] < 0.3 * moved[0.0], moved
    with pytest.raises(ValueError, match="train_text_encoder"):
        _lora_cfg("tiny-sd1", tmp_path / "x", network={"train_text_encoder": False, "te_preserve": 1.0})
    with pytest.raises(InvalidRequest, match="no prompt to preserve"):
        train_lora(_lora_cfg("tiny-sd1", tmp_path / "y", network={"te_preserve": 1.0}), resume=False,
                   log=lambda s: None, settings=settings)
