"""danqing-tiny-unclip: unCLIP's decoder (DALL-E 2) for danqing-tiny, in Stable unCLIP's format.

DALL-E 2 (Ramesh et al. 2022) generates from a CLIP image embedding: a decoder makes pictures
from it, so a picture's own embedding gives **variations** of it (what CLIP keeps of a picture
stays, what it drops varies), and a prior that maps a caption's embedding to an image embedding
makes it text-to-image. Stable unCLIP (Stability AI 2023) is that decoder on Stable Diffusion:
the image embedding, noised to a random level (noise augmentation) and followed by the level's
sinusoidal embedding, goes through the UNet's ``class_embedding`` and is added to its time
embedding.

Here the decoder is danqing-tiny's UNet with that class embedding added (its last layer starts at
zero, so the new model starts as danqing-tiny exactly) and fine-tuned whole on the shapes world;
the image embedding is danqing-tiny-clip's (its vision half, frozen); danqing-tiny's text encoder
and VAE stay frozen. Half the steps drop the caption (variations come with no text) and a tenth
drop the embedding (the zero class label of the unconditional branch). The embedding is noised
by the sampler's own ``sampling.unclip.noised_embedding``; the folder is diffusers'
``StableUnCLIPImg2ImgPipeline`` layout, which ``danqing variations`` and diffusers both run.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from danqing.models.components import Components
from danqing.models.unclip_models import KandinskyDecoder, UnclipModel, movq_from_vae
from danqing.request import GenerationRequest
from danqing.synthetic.evaluate import same_objects
from danqing.synthetic.render import render
from danqing.synthetic.scenes import eval_scenes
from danqing.training.base import _gen, encode_all, new_accelerator
from danqing.training.conditioning import encode_texts
from danqing.training.config import UnclipTrainConfig
from danqing.training.data import picture_embeddings, synthetic_dataset
from danqing.training.runs import (StepLog, ema_weights, export_run, load_float32, my_rows, optimiser_step,
                                   resume_step, start_run)

Log = Callable[[str], None]
# Stable unCLIP's image-noising scheduler (its released image_noising_scheduler/)
NOISING_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                  "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": True, "prediction_type": "epsilon",
                  "variance_type": "fixed_small"}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def decoder_unet(unet, embed_dim: int):
    """``unet`` with Stable unCLIP's class embedding (a projection of the noised embedding and
    its level's embedding, 2 x ``embed_dim``, onto the time embedding), its weights copied and
    the new projection's last layer at zero: the result computes what ``unet`` computes."""
    from diffusers import UNet2DConditionModel

    cfg = dict(unet.config)
    cfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=2 * embed_dim)
    out = UNet2DConditionModel.from_config(cfg)
    missing, unexpected = out.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise ValueError(f"the UNet's weights do not fit the decoder: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        out.class_embedding.linear_2.weight.zero_()
        out.class_embedding.linear_2.bias.zero_()
    return out.float()


def unclip_model(base: Components, encoder, processor, embeds: torch.Tensor) -> UnclipModel:
    """The Stable unCLIP model around ``base`` (its UNet becomes the decoder), the image encoder
    and an image normaliser holding the mean and std of ``embeds`` (N, D), the training pictures'."""
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    dim = embeds.shape[1]
    norm = StableUnCLIPImageNormalizer(embedding_dim=dim)
    with torch.no_grad():
        norm.mean.copy_(embeds.mean(0, keepdim=True))
        norm.std.copy_(embeds.std(0, keepdim=True))
    comps = copy.copy(base)
    comps.family = "sd2"  # Stable unCLIP is SD 2.1's family (danqing-tiny reads its text the same way)
    comps.unet = decoder_unet(base.unet, dim)
    comps.metadata = {}
    return UnclipModel(kind="unclip", components=comps, image_encoder=encoder, feature_extractor=processor,
                       image_normalizer=norm.eval().requires_grad_(False), noising_config=dict(NOISING_CONFIG))


@dataclass
class KandinskyVariations:
    """A Kandinsky 2.2 decoder with the CLIP image encoder that embeds its pictures: what
    ``sampling.kandinsky.run_kandinsky`` reads of a prior to make variations."""

    decoder: KandinskyDecoder
    image_encoder: Any
    image_processor: Any


def kandinsky_unet(unet, embed_dim: int):
    """``unet`` as Kandinsky 2.2's decoder UNet: the image embedding (``embed_dim``) becomes 32
    cross-attention tokens (``encoder_hid_dim_type="image_proj"``) in place of the text, and is
    added to the time embedding (``addition_embed_type="image"``; its last norm starts at zero, so
    that addition starts as nothing); the output has a learned variance beside the noise, as
    Kandinsky's (``conv_out`` doubled: the noise half is ``unet``'s, the variance half starts at
    zero, midway between the DDPM posterior's variance and beta_t). Every other weight is ``unet``'s."""
    from diffusers import UNet2DConditionModel

    cfg = dict(unet.config)
    cfg.update(encoder_hid_dim_type="image_proj", encoder_hid_dim=embed_dim, addition_embed_type="image",
               out_channels=2 * unet.config.out_channels)
    out = UNet2DConditionModel.from_config(cfg)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("conv_out.")}
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("encoder_hid_proj.", "add_embedding.", "conv_out.")) for k in missing):
        raise ValueError(f"the UNet's weights do not fit the decoder: missing {missing}, unexpected {unexpected}")
    c = unet.config.out_channels
    with torch.no_grad():
        out.add_embedding.image_norm.weight.zero_()
        out.add_embedding.image_norm.bias.zero_()
        out.conv_out.weight.zero_()
        out.conv_out.bias.zero_()
        out.conv_out.weight[:c] = unet.conv_out.weight
        out.conv_out.bias[:c] = unet.conv_out.bias
    return out.float()


def kandinsky_decoder(base: Components, encoder, processor, latents: torch.Tensor) -> KandinskyVariations:
    """The Kandinsky 2.2 decoder around ``base``: its UNet (``kandinsky_unet``), its VAE as the
    MoVQ (``models.unclip_models.movq_from_vae``, codebook from ``latents``, scaled), and a DDPM
    scheduler on its noise schedule. The scheduler samples with DDPM's fixed variance: with the
    UNet's learned one (``variance_type = "learned_range"``) the trained decoder's pictures came
    out with coloured blots (docs/training.md, unCLIP)."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
            "timestep_spacing", "steps_offset")
    sched = {"_class_name": "DDPMScheduler", "clip_sample": False, "variance_type": "fixed_small",
             **{k: v for k, v in base.scheduler_config.items() if k in keep}}
    dim = encoder.config.projection_dim
    decoder = KandinskyDecoder(unet=kandinsky_unet(base.unet, dim), movq=movq_from_vae(base.vae, latents),
                               scheduler_config=sched)
    return KandinskyVariations(decoder, encoder, processor)


# ---------------------------------------------------------------------------------------------
# Judging it: variations of held-out pictures
# ---------------------------------------------------------------------------------------------
PAIRS = ("held-out", "seen")


def judged_scenes(n: int, pairs: str = "held-out") -> list:
    """The pictures variations are judged on, one or two objects each (alternating):
    "held-out", the evaluator's held-out set (every object a colour-shape pair no training
    picture has); "seen", new scenes of the training pairs (their own random stream, which no
    training set draws from)."""
    import random

    from danqing.synthetic.scenes import sample_scene

    if pairs == "held-out":
        return eval_scenes(max(n, 1))[:n]
    if pairs != "seen":
        raise ValueError(f"pairs: {pairs!r}, not one of {PAIRS}")
    rng = random.Random("variations:0")
    return [sample_scene(rng, "train", 1 + i % 2) for i in range(n)]


@torch.no_grad()
def variation_rates(model: UnclipModel, n: int, *, steps: int = 20, cfg_scale: float = 10.0, seed: int = 0,
                    size: int = 64, noise_level: int = 0, pairs: str = "held-out",
                    on_pair: Callable | None = None) -> dict:
    """One variation (empty prompt) of each of ``n`` pictures (``judged_scenes``): the share
    that shows the same coloured shapes as its source, their mean centroid shift (64x64 pixels),
    and, looser, the shares with the same set of colours and with as many objects. ``model``: an
    ``UnclipModel`` or ``KandinskyVariations`` (whose scheduler is its own: the sampler and
    ``noise_level`` are Stable unCLIP's)."""
    from danqing.sampling.kandinsky import run_kandinsky
    from danqing.sampling.unclip import run_unclip
    from danqing.synthetic.evaluate import detect

    same, shifts, colours, counts = [], [], [], []
    for i, scene in enumerate(judged_scenes(n, pairs)):
        picture = render(scene, size)
        req = GenerationRequest(prompt="", steps=steps, cfg_scale=cfg_scale, seed=seed + i, subseed=0,
                                width=size, height=size, sampler="DPM++ 2M")
        image = (run_kandinsky(model, model.decoder, req, picture=picture) if isinstance(model, KandinskyVariations)
                 else run_unclip(model, picture, req, noise_level=noise_level)).images[0]
        ok, shift = same_objects(picture, image)
        same.append(ok)
        src, got = detect(picture), detect(image)
        colours.append(sorted({d.colour for d in src}) == sorted({d.colour for d in got}))
        counts.append(len(src) == len(got))
        if shift is not None:
            shifts.append(shift)
        if on_pair is not None:
            on_pair(i, picture, image, ok, shift)
    return {"n": n, "pairs": pairs, "same_objects": round(float(np.mean(same)), 4),
            "same_colours": round(float(np.mean(colours)), 4), "same_count": round(float(np.mean(counts)), 4),
            "centroid_shift": round(float(np.mean(shifts)), 2) if shifts else None}


@torch.no_grad()
def prior_text_to_image(model: UnclipModel, prior, n: int, *, steps: int = 20, cfg_scale: float = 10.0,
                        seed: int = 0, size: int = 64, noise_level: int = 0, lang: str = "en",
                        decoder_text: bool = True, out_dir: Path | None = None) -> dict:
    """Text-to-image through ``prior`` (a ``KandinskyPrior``) and the decoder on the first ``n``
    held-out prompts (the evaluator's captions, seed + i), scored by the evaluator.
    ``decoder_text``: the decoder reads the prompt too (Stable unCLIP's way), else only the
    prior does (the decoder gets "": what the image embedding alone carries). A Kandinsky decoder
    (``KandinskyVariations``) reads no text; the prior runs at its pipeline's defaults."""
    from danqing.sampling.kandinsky import run_kandinsky
    from danqing.sampling.unclip import run_unclip
    from danqing.synthetic.captions import caption
    from danqing.synthetic.evaluate import score, summarise

    if out_dir is not None:
        Path(out_dir).mkdir(parents=True)
    scores = []
    for i, scene in enumerate(eval_scenes(max(n, 1))[:n]):
        text = caption(scene, lang)
        req = GenerationRequest(prompt=text if decoder_text else "", steps=steps, cfg_scale=cfg_scale, seed=seed + i,
                                subseed=0, width=size, height=size, sampler="DPM++ 2M")
        if isinstance(model, KandinskyVariations):
            image = run_kandinsky(prior, model.decoder, req.model_copy(update={"prompt": text})).images[0]
        else:
            image = run_unclip(model, None, req, noise_level=noise_level, prior=prior, prior_prompt=text).images[0]
        if out_dir is not None:
            image.save(Path(out_dir) / f"{i:04d}.png")
        scores.append(score(image, scene.spec))
    return summarise(scores)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def noised_latents(batch: dict, g: torch.Generator, noise_sched, scaling: float):
    """(z, noise, t, x_t) of a batch, drawn from ``g`` in that order: a latent sampled from each
    row's posterior (``batch``'s mean / std) and scaled, its noise, a timestep, the noised latent."""
    z = (batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=g)) * scaling
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (z.shape[0],), generator=g)
    return z, noise, t, noise_sched.add_noise(z, noise, t)


def decoder_loss(unet, model: UnclipModel, batch: dict, g: torch.Generator, cfg: UnclipTrainConfig, noise_sched,
                 scaling: float, acc) -> torch.Tensor:
    """The denoising loss of one batch (``batch``: latents mean / std, image embeddings and caption
    hidden states of its rows): each picture's own embedding, noised to a random level, as class
    label; caption or embedding dropped at the config's rates. All draws from ``g`` for the whole
    batch, of which this process keeps its rows."""
    from danqing.sampling.unclip import noised_embedding  # the sampler's own noising, one level per row

    b, u = batch["mean"].shape[0], cfg.unclip
    z, noise, t, x_t = noised_latents(batch, g, noise_sched, scaling)
    levels = torch.randint(0, u.max_noise_level, (b,), generator=g)
    labels = noised_embedding(model, batch["embeds"], torch.randn(batch["embeds"].shape, generator=g), levels)
    drop_image = torch.rand(b, generator=g) < u.drop_image
    labels = torch.where(drop_image[:, None], torch.zeros_like(labels), labels)
    part = my_rows(acc, b)
    x_t, t, ctx, labels, noise = (v[part].to(acc.device) for v in (x_t, t, batch["hidden"], labels, noise))
    with acc.autocast():
        pred = unet(x_t, t, encoder_hidden_states=ctx, class_labels=labels).sample
        return F.mse_loss(pred.float(), noise)


def kandinsky_loss(unet, batch: dict, g: torch.Generator, cfg: UnclipTrainConfig, noise_sched, scaling: float,
                   uncond: torch.Tensor, acc) -> torch.Tensor:
    """The loss of one batch for a Kandinsky decoder: Improved DDPM's hybrid loss of its noise and
    variance (``training.vlb``, ``unclip.vlb_weight``), conditioned on each picture's own
    embedding, or for ``unclip.drop_image`` of them the unconditional one (``uncond``: the
    encoder's embedding of a zero picture, as the pipeline's). All draws from ``g`` for the whole
    batch."""
    from danqing.training.vlb import hybrid_loss

    b = batch["mean"].shape[0]
    z, noise, t, x_t = noised_latents(batch, g, noise_sched, scaling)
    drop = torch.rand(b, generator=g) < cfg.unclip.drop_image
    embeds = torch.where(drop[:, None], uncond.expand_as(batch["embeds"]), batch["embeds"])
    part = my_rows(acc, b)
    z, x_t, t, embeds, noise = (v[part].to(acc.device) for v in (z, x_t, t, embeds, noise))
    with acc.autocast():
        out = unet(x_t, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": embeds}).sample
    return hybrid_loss(out, noise_sched, z, x_t, t, noise, cfg.unclip.vlb_weight)


def _decoder(cfg: UnclipTrainConfig, base: Components, encoder, processor, embeds, mean, log: Log):
    """The decoder a run trains: a new one around ``base`` or ``unclip.init_decoder``'s."""
    u = cfg.unclip
    if u.format == "kandinsky":
        if u.init_decoder:
            from danqing.models.unclip_models import load_kandinsky_decoder

            log(f"decoder: continuing from {u.init_decoder}")
            model = KandinskyVariations(load_kandinsky_decoder(Path(u.init_decoder)), encoder, processor)
        else:
            model = kandinsky_decoder(base, encoder, processor, mean[:512] * base.vae.config.scaling_factor)
        return model, model.decoder.unet.float()
    if u.init_decoder:  # an earlier run's decoder, its normaliser (the same pictures' statistics) kept
        from danqing.models.unclip_models import load_unclip_folder

        model = load_unclip_folder(Path(u.init_decoder))
        log(f"decoder: continuing from {u.init_decoder}")
    else:
        model = unclip_model(base, encoder, processor, embeds)
    return model, model.components.unet.float()


def train_unclip(cfg: UnclipTrainConfig, *, resume: bool = False, log: Log = print) -> dict:
    """Train and export ``run.output_dir/model/`` (a Stable unCLIP or, with ``unclip.format =
    "kandinsky"``, a Kandinsky 2.2 decoder folder, fp32) and ``summary.json``; ``resume``:
    continue from the newest checkpoint."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from danqing.models.clip_model import clip_folder
    from danqing.models.ip_adapter import load_image_encoder
    from danqing.models.unclip_models import save_kandinsky_decoder, save_unclip_folder
    from danqing.sampling.kandinsky import picture_embedding

    c, r, d, u = cfg.unet, cfg.run, cfg.data, cfg.unclip
    run_dir = start_run(r.output_dir, resume=resume, num_threads=r.num_threads)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    t_start = time.perf_counter()
    base, _, _ = load_float32(u.init_from)
    encoder, processor = load_image_encoder(clip_folder(u.image_encoder))

    # data, each part encoded once: latents, image embeddings, caption hidden states
    data = synthetic_dataset(d.n_images, d.size, d.seed, d.captions_per_image)
    mean, std = encode_all(base.vae, data.images, "cpu")
    embeds = picture_embeddings(encoder, processor, data.images)
    kandinsky = u.format == "kandinsky"
    texts = sorted({t for caps in data.captions for t in caps})
    index = {t: i for i, t in enumerate(texts)}
    hidden = None if kandinsky else encode_texts(base, texts + [""])  # a Kandinsky decoder reads no text
    cap_idx = torch.tensor([[index[t] for t in caps] for caps in data.captions])
    log(f"data: {len(data)} pictures, their CLIP image embeddings, {len(texts)} distinct captions "
        f"({time.perf_counter() - t_start:.0f} s)")

    model, unet = _decoder(cfg, base, encoder, processor, embeds, mean, log)
    uncond = picture_embedding(model, None) if kandinsky else None
    unet = unet.train().requires_grad_(True)
    params = list(unet.parameters())
    acc = new_accelerator(r.mixed_precision)
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)))
    wrapped, opt, sched = acc.prepare(unet, opt, sched)
    ema = EMAModel(params, decay=c.ema_decay, foreach=True)
    acc.register_for_checkpointing(ema)
    start = resume_step(acc, run_dir, log) if resume else 0
    noise_sched = DDPMScheduler.from_config(base.scheduler_config)
    scaling = base.vae.config.scaling_factor
    steps = StepLog("unclip", c.steps, start, log, run_dir, r, acc)
    n, k = cap_idx.shape
    for step in range(start, c.steps):
        g = _gen(r.seed, step, "unclip")
        idx = torch.randint(n, (c.batch_size,), generator=g)
        pick = torch.randint(k, (c.batch_size,), generator=g)
        drop_text = torch.rand(c.batch_size, generator=g) < u.drop_text
        rows = torch.where(drop_text, len(texts), cap_idx[idx, pick])
        batch = {"mean": mean[idx], "std": std[idx], "embeds": embeds[idx]}
        wrapped.train()
        if kandinsky:
            loss = kandinsky_loss(wrapped, batch, g, cfg, noise_sched, scaling, uncond, acc)
        else:
            batch["hidden"] = hidden[rows]
            loss = decoder_loss(wrapped, model, batch, g, cfg, noise_sched, scaling, acc)
        optimiser_step(acc, loss, params, opt, sched, c.max_grad_norm, ema)
        done = step + 1
        final = steps.done(done, loss)
        if steps.main and u.eval_pictures and (done % r.eval_every == 0 or final):
            with ema_weights(ema, params, unet):
                res = variation_rates(model, u.eval_pictures, steps=r.eval_steps, size=d.size)
            log(f"eval step {done}: variations {res}")
            steps.evaluated(done, res, {"variations": res})
        if steps.stopping():
            break

    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    acc.wait_for_everyone()
    summary = {"kind": "unclip", "format": u.format, "init_from": u.init_from, "image_encoder": u.image_encoder,
               "images": len(data),
               "steps": steps.last["step"], "batch_size": c.batch_size, "loss": steps.last["loss"],
               "eval": steps.last["eval"], "minutes": round((time.perf_counter() - t_start) / 60, 1),
               "config": json.loads(cfg.model_dump_json())}
    if steps.main:
        export_run(run_dir, summary, lambda out: (save_kandinsky_decoder(model.decoder, out) if kandinsky
                                                  else save_unclip_folder(model, out)), log)
    return summary
