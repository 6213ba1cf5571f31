"""danqing-tiny-if: a pixel-space cascade (Imagen / DeepFloyd IF) trained on the shapes world.

Imagen (Saharia et al. 2022) and DeepFloyd IF generate pixels, not latents: a text-conditioned
base model draws a small picture, and super-resolution models conditioned on it (upsampled, and
noised to a random level while training: "noise-conditioning augmentation", Ho et al. 2021)
make it 4x larger. Here both stages are diffusers' ``UNet2DConditionModel`` in IF's layout, so
the result is two IF folders that danqing's loader and cascade sampler
(``sampling.cascade.run_if``) and diffusers' ``IFPipeline`` / ``IFSuperResolutionPipeline`` run:

- **stage I** (``cascade.stage = "base"``): text -> ``base_size`` pixels, with simple
  cross-attention to the text and IF's pooled text embedding added to the timestep's; its T5
  encoder (transformers' ``T5EncoderModel``, a few layers) is trained beside it, from scratch, on
  a word-level tokenizer of the shapes world's captions (``word_tokenizer``);
- **stage II** (``"upscaler"``): ``base_size`` -> 4x, conditioned on the low-resolution picture
  upsampled and noised to a random level below ``max_noise_level`` (the level is the UNet's
  class label); no attention and no text, so it trains on random crops and samples any size.

and, as the recipe's first config, the course's project 2 (``"unconditional"``): a pixel DDPM
with no text at all -- diffusers' ``UNet2DModel``, the plain noise MSE, DDPM's linear betas, EMA
and sample grids -- written as a ``DDPMPipeline`` folder (``sampling.cascade.run_ddpm`` draws
from it in our loop).

The two cascade stages predict the noise and a learned variance (``variance_type = "learned_range"``), trained with
Improved DDPM's hybrid objective (Nichol & Dhariwal 2021): the plain noise MSE plus the
variational bound with the mean's gradient stopped (``training.vlb``), so ancestral DDPM sampling
with 50 of the 1000 steps stays sharp. The schedulers clip x0 by dynamic thresholding (Imagen,
section 2.3) as IF's do. The data are the shapes world rendered at 4x ``base_size``; stage I
learns their box-downsampled copies, the same pictures stage II learns to upscale.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from danqing.training.config import CascadeTrainConfig
from danqing.training.vlb import hybrid_loss

Log = Callable[[str], None]
SCALE = 4  # stage II makes 4x (IF's 64 -> 256; here 32 -> 128)
SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
             "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon", "variance_type": "learned_range",
             "thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5, "clip_sample": True,
             "clip_sample_range": 1.0}  # IF's own settings
PLAIN_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                   "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon", "variance_type": "fixed_small",
                   "clip_sample": True}  # DDPM's (Ho et al. 2020), diffusers' unconditional training example's
NOISING = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
           "beta_start": 0.0001, "beta_end": 0.02}  # stage II's image_noising_scheduler (IF's)
SAMPLE_PROMPTS = ["a red circle", "a blue square left of a yellow triangle", "a green star above a purple cross",
                  "一个橙色的圆形", "two pink hearts", "a small cyan ring on the left",
                  "a large yellow triangle at the top", "a purple star right of a red circle"]


# ---------------------------------------------------------------------------------------------
# The text half of stage I: a word-level T5 tokenizer and a small T5 encoder
# ---------------------------------------------------------------------------------------------
def word_tokenizer(texts, model_max_length: int = 77):
    """A T5 (SentencePiece-Unigram) tokenizer whose pieces are the words of ``texts`` (English,
    lower-cased), each of their other characters (Chinese is written without spaces: one piece
    per character) and the lower-case letters and digits as fallback: <pad>=0, </s>=1, <unk>=2.
    Built with the ``tokenizers`` library; saved as ``tokenizer.json`` for ``T5TokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words: dict[str, int] = {}
    chars: dict[str, int] = {}
    for t in texts:
        for w in t.lower().replace(",", " , ").replace(".", " . ").split():
            if w.isascii():
                words[w] = words.get(w, 0) + 1
            for ch in w:
                chars[ch] = chars.get(ch, 0) + 1
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    total = sum(words.values()) + sum(chars.values())
    vocab += [("\u2581" + w, math.log(c / total)) for w, c in sorted(words.items(), key=lambda x: -x[1])]
    fallback = dict.fromkeys("abcdefghijklmnopqrstuvwxyz0123456789,.\u2581", 1)
    for ch, c in {**fallback, **chars}.items():
        vocab.append((ch, math.log(c / total) - 20.0))  # only where no word fits
    seen, pieces = set(), []
    for piece, logp in vocab:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, logp))
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=model_max_length)


def t5_encoder(cfg: CascadeTrainConfig, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    c = cfg.cascade
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=c.text_width, d_kv=c.text_width // c.text_heads, d_ff=2 * c.text_width,
        num_layers=c.text_layers, num_heads=c.text_heads, relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, dtype="float32"))


# ---------------------------------------------------------------------------------------------
# The UNets, in IF's layout
# ---------------------------------------------------------------------------------------------
def base_unet(cfg: CascadeTrainConfig):
    """Stage I: IF-I's layout at toy size (first level plain ResNets, the others with simple
    cross-attention to the T5 states, the pooled text added to the timestep embedding)."""
    from diffusers import UNet2DConditionModel

    c = cfg.cascade
    n = len(c.block_out_channels)
    down = ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (n - 1)
    up = ["SimpleCrossAttnUpBlock2D"] * (n - 1) + ["ResnetUpsampleBlock2D"]
    return UNet2DConditionModel(
        sample_size=c.base_size, in_channels=3, out_channels=6, layers_per_block=c.layers_per_block,
        block_out_channels=tuple(c.block_out_channels), down_block_types=down,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=up, norm_num_groups=c.norm_num_groups,
        cross_attention_dim=c.block_out_channels[-1], encoder_hid_dim=c.text_width,
        attention_head_dim=c.attention_head_dim, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu")


def plain_unet(cfg: CascadeTrainConfig):
    """The unconditional recipe's ``UNet2DModel`` (the course's project 2; diffusers'
    unconditional example): plain ResNets at the first level, self-attention below."""
    from diffusers import UNet2DModel

    c = cfg.cascade
    n = len(c.block_out_channels)
    return UNet2DModel(
        sample_size=c.base_size, in_channels=3, out_channels=3, layers_per_block=c.layers_per_block,
        block_out_channels=tuple(c.block_out_channels), down_block_types=["DownBlock2D"] + ["AttnDownBlock2D"] * (n - 1),
        up_block_types=["AttnUpBlock2D"] * (n - 1) + ["UpBlock2D"], norm_num_groups=c.norm_num_groups,
        attention_head_dim=c.attention_head_dim)


def upscaler_unet(cfg: CascadeTrainConfig):
    """Stage II: plain ResNet levels (no attention, no text: it sees the picture it enlarges),
    6 input channels (the noisy picture and the upsampled low-resolution one), the augmentation's
    noise level as a timestep class label (IF-II's ``class_embed_type = "timestep"``)."""
    from diffusers import UNet2DConditionModel

    c = cfg.cascade
    n = len(c.block_out_channels)
    return UNet2DConditionModel(
        sample_size=c.base_size * SCALE, in_channels=6, out_channels=6, layers_per_block=c.layers_per_block,
        block_out_channels=tuple(c.block_out_channels), down_block_types=["ResnetDownsampleBlock2D"] * n,
        mid_block_type=None, up_block_types=["ResnetUpsampleBlock2D"] * n, norm_num_groups=c.norm_num_groups,
        cross_attention_dim=c.text_width, class_embed_type="timestep", resnet_time_scale_shift="scale_shift",
        act_fn="gelu")


def downsample(pixels: torch.Tensor, factor: int = SCALE) -> torch.Tensor:
    """(N, 3, H, W) pictures in [-1, 1], box-averaged to H/factor (stage I's data; stage II's input)."""
    return F.avg_pool2d(pixels, factor)


def upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    """As the cascade sampler (and IFSuperResolutionPipeline) enlarges stage I's picture."""
    return F.interpolate(low, (size, size), mode="bilinear", align_corners=True)


def _pixels(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def stage_scheduler(cfg: CascadeTrainConfig) -> dict:
    """IF's scheduler settings with the stage's prediction type."""
    return {**SCHEDULER, "prediction_type": cfg.cascade.prediction}


def _stage(cfg: CascadeTrainConfig, unet, encoder=None, tokenizer=None):
    from danqing.models.cascade_models import PixelStage

    kind = "if-i" if cfg.cascade.stage == "base" else "if-ii"
    return PixelStage(kind=kind, unet=unet, scheduler_config=stage_scheduler(cfg),
                      noising_config=dict(NOISING) if kind == "if-ii" else None, text_encoder=encoder,
                      tokenizer=tokenizer)


@torch.no_grad()
def sample_base(stage, prompts: list[str], *, seed: int, steps: int, cfg_scale: float, size: int,
                thresholding: bool = True, device="cpu") -> list:
    """One stage-I picture per prompt (seed + i) through the cascade sampler."""
    from danqing.request import GenerationRequest
    from danqing.sampling.cascade import run_if

    if not thresholding:
        stage = _with_config(stage, thresholding=False)
    out = []
    for i, p in enumerate(prompts):
        req = GenerationRequest(prompt=p, seed=seed + i, subseed=0, steps=steps, cfg_scale=cfg_scale, model="(training)")
        out += run_if(stage, req, device=device, size=(size, size)).images
    return out


def _with_config(stage, **changes):
    import dataclasses

    return dataclasses.replace(stage, scheduler_config={**stage.scheduler_config, **changes})


def _stage_modules(cfg: CascadeTrainConfig, data):
    """(unet, text encoder, tokenizer, low-resolution pixels, caption ids, empty ids) for the stage;
    the parts a stage does not use are None."""
    from danqing.training.data import tokenize_captions

    stage = cfg.cascade.stage
    encoder = tokenizer = low = ids = empty = None
    if stage == "base":
        tokenizer = word_tokenizer([t for caps in data.captions for t in caps])
        encoder = t5_encoder(cfg, len(tokenizer)).train()
        unet = base_unet(cfg).train()
        low = downsample(_pixels(data.images))  # (N, 3, base, base) in [-1, 1]
        ids, empty = tokenize_captions(tokenizer, data.captions)
    elif stage == "unconditional":
        unet = plain_unet(cfg).train()
        low = downsample(_pixels(data.images))
    else:
        unet = upscaler_unet(cfg).train()
    return unet, encoder, tokenizer, low, ids, empty


def _upscaler_batch(images, noising, g, size: int, crop: int, max_level: int):
    """Stage II's training batch: (true crops, the matching crops of the noised 4x-upsampled
    low-resolution pictures, their noise levels)."""
    n = len(images)
    high = _pixels(images)
    up = upsample(downsample(high), size)
    levels = torch.randint(max_level, (n,), generator=g)
    up = noising.add_noise(up, torch.randn(up.shape, generator=g), levels)
    oy, ox = (torch.randint(size - crop + 1, (n,), generator=g) for _ in range(2))
    x0 = torch.stack([high[i, :, oy[i]:oy[i] + crop, ox[i]:ox[i] + crop] for i in range(n)])
    up = torch.stack([up[i, :, oy[i]:oy[i] + crop, ox[i]:ox[i] + crop] for i in range(n)])
    return x0, up, levels


def _sample_and_eval(cfg: CascadeTrainConfig, run_dir, done: int, unet, encoder, tokenizer, held, device, *,
                     sample: bool, evaluate: bool):
    """Write the step's sample grid (when ``sample``); return stage I's object scores on the
    held-out scenes (when ``evaluate``), else None."""
    from danqing.synthetic.captions import caption
    from danqing.synthetic.evaluate import score, summarise
    from danqing.training.base import image_grid

    k, r = cfg.cascade, cfg.run
    stage = None if k.stage == "unconditional" else _stage(cfg, unet, encoder, tokenizer)
    grid = run_dir / "samples" / f"step-{done:06d}.png"
    grid.parent.mkdir(exist_ok=True)
    if sample and k.stage == "unconditional":
        from danqing.sampling.cascade import run_ddpm

        image_grid(run_ddpm(unet, PLAIN_SCHEDULER, list(range(16)), steps=k.eval_steps, device=device)).save(grid)
    elif sample and k.stage == "base":
        image_grid(sample_base(stage, SAMPLE_PROMPTS, seed=0, steps=k.eval_steps, cfg_scale=7.0,
                               size=k.base_size, device=device)).save(grid)
    elif sample:
        image_grid(upscale_truth(stage, held[:8], steps=k.eval_steps, base_size=k.base_size)).save(grid)
    if not evaluate:
        return None
    scs = held[:r.eval_prompts]
    imgs = sample_base(stage, [caption(s, "en") for s in scs], seed=1000, steps=k.eval_steps,
                       cfg_scale=7.0, size=k.base_size, device=device)
    return summarise([score(im, s.spec) for im, s in zip(imgs, scs)])


def _save(cfg: CascadeTrainConfig, out, unet, encoder, tokenizer) -> None:
    """The trained stage as a diffusers folder: an IF stage, or a ``DDPMPipeline``."""
    if cfg.cascade.stage == "unconditional":
        from diffusers import DDPMPipeline, DDPMScheduler

        DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(PLAIN_SCHEDULER)).save_pretrained(
            out, safe_serialization=True)
    else:
        from danqing.models.cascade_models import save_if_folder

        save_if_folder(_stage(cfg, unet, encoder, tokenizer), out)


def train_cascade(cfg: CascadeTrainConfig, *, resume: bool = False, log: Log = print) -> dict:
    """Train one stage and export ``run.output_dir/model/`` (a diffusers IF folder, fp32) and
    ``summary.json``; ``resume``: continue from the newest checkpoint (as the uninterrupted run)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from danqing.errors import InvalidRequest
    from danqing.synthetic.scenes import eval_scenes
    from danqing.training.base import _gen, new_accelerator
    from danqing.training.data import synthetic_dataset
    from danqing.training.runs import (StepLog, ema_weights, export_run, my_rows, optimiser_step, resume_step,
                                       start_run)

    c, r, d, k = cfg.unet, cfg.run, cfg.data, cfg.cascade
    if d.source != "synthetic":
        raise InvalidRequest("data.source", "the cascade trains on the synthetic worlds; use source = \"synthetic\"")
    if d.size != SCALE * k.base_size:
        raise InvalidRequest("data.size", f"{d.size}: the cascade's pictures are {SCALE}x cascade.base_size "
                                          f"({SCALE * k.base_size})")
    base, plain = k.stage == "base", k.stage == "unconditional"
    run_dir = start_run(r.output_dir, resume=resume, num_threads=r.num_threads)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    t_start = time.perf_counter()
    data = synthetic_dataset(d.n_images, d.size, d.seed, d.captions_per_image, world=d.world,
                             portrait_share=d.portrait_share, captions=d.captions)
    torch.manual_seed(r.seed)
    unet, encoder, tokenizer, low, ids, empty = _stage_modules(cfg, data)
    modules = [m for m in (unet, encoder) if m is not None]
    n_params = sum(p.numel() for m in modules for p in m.parameters())
    name = {"base": "stage I (base)", "upscaler": "stage II (upscaler)", "unconditional": "unconditional DDPM"}[k.stage]
    log(f"{name}: {n_params:,} parameters; data: {len(data)} scenes at "
        f"{d.size} px ({time.perf_counter() - t_start:.0f} s)")
    scheduler = DDPMScheduler.from_config(PLAIN_SCHEDULER if plain else stage_scheduler(cfg))
    noising = DDPMScheduler.from_config(NOISING)
    acc = new_accelerator(r.mixed_precision)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)))
    prepared = acc.prepare(*modules, opt, sched)
    model, opt, sched = prepared[0], prepared[-2], prepared[-1]
    text_model = prepared[1] if base else None
    ema = EMAModel(params, decay=c.ema_decay, foreach=True)
    acc.register_for_checkpointing(ema)
    start = resume_step(acc, run_dir, log) if resume else 0
    steps = StepLog(k.stage, c.steps, start, log, run_dir, r, acc)
    n = len(data)
    held = eval_scenes(max(r.eval_prompts, 8))
    for step in range(start, c.steps):
        g = _gen(r.seed, step, "cascade")
        idx = torch.randint(n, (c.batch_size,), generator=g)
        t = torch.randint(1000, (c.batch_size,), generator=g)
        part = my_rows(acc, c.batch_size)
        if base:
            x0 = low[idx]
            cap = torch.randint(ids.shape[1], (c.batch_size,), generator=g)
            tok = ids[idx, cap].long()
            drop = torch.rand(c.batch_size, generator=g) < c.caption_dropout
            tok = torch.where(drop[:, None], empty.long()[None], tok)
            noise = torch.randn(x0.shape, generator=g)
            x_t = scheduler.add_noise(x0, noise, t)
            x0, x_t, t, noise, tok = (v[part].to(acc.device) for v in (x0, x_t, t, noise, tok))
            with acc.autocast():
                ctx = text_model(tok, attention_mask=(tok != tokenizer.pad_token_id).long())[0]
                out = model(x_t, t, encoder_hidden_states=ctx, return_dict=False)[0]
        elif plain:
            x0 = low[idx]
            noise = torch.randn(x0.shape, generator=g)
            x_t = scheduler.add_noise(x0, noise, t)
            x_t, t, noise = (v[part].to(acc.device) for v in (x_t, t, noise))
            with acc.autocast():
                pred = model(x_t, t, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
        else:
            x0, up, levels = _upscaler_batch(data.images[idx], noising, g, d.size, k.crop_size, k.max_noise_level)
            noise = torch.randn(x0.shape, generator=g)
            x_t = scheduler.add_noise(x0, noise, t)
            x0, x_t, t, noise, up, levels = (v[part].to(acc.device) for v in (x0, x_t, t, noise, up, levels))
            with acc.autocast():
                out = model(torch.cat([x_t, up], 1), t, encoder_hidden_states=None, class_labels=levels,
                            return_dict=False)[0]
        if not plain:
            loss = hybrid_loss(out, scheduler, x0, x_t, t, noise, k.vlb_weight, k.prediction)
        optimiser_step(acc, loss, params, opt, sched, c.max_grad_norm, ema)
        done = step + 1
        final = steps.done(done, loss)
        want_sample = steps.main and (done % r.sample_every == 0 or final)
        want_eval = steps.main and base and r.eval_prompts and (done % r.eval_every == 0 or final)
        if want_sample or want_eval:
            with ema_weights(ema, params, *modules):
                res = _sample_and_eval(cfg, run_dir, done, unet, encoder, tokenizer, held, acc.device,
                                       sample=want_sample, evaluate=want_eval)
            if res is not None:
                log(f"eval step {done}: {res}")
                steps.evaluated(done, res, res)
            for m in modules:
                m.train()
        if steps.stopping():
            break

    ema.copy_to(params)
    for m in modules:
        m.eval()
    acc.wait_for_everyone()
    summary = {"kind": "cascade", "stage": k.stage, "parameters": n_params, "images": len(data),
               "steps": steps.last["step"], "batch_size": c.batch_size, "loss": steps.last["loss"],
               "eval": steps.last["eval"], "minutes": round((time.perf_counter() - t_start) / 60, 1),
               "config": json.loads(cfg.model_dump_json())}
    if steps.main:
        for m in modules:
            m.to("cpu")

        export_run(run_dir, summary, lambda out: _save(cfg, out, unet, encoder, tokenizer), log)
    return summary


@torch.no_grad()
def upscale_truth(stage, scenes, *, steps: int, base_size: int, noise_level: int = 100, seed: int = 0) -> list:
    """Stage II on the true low-resolution renders of ``scenes``: [low (nearest, 4x), upscaled,
    true 4x render] per scene, for sample grids."""
    from PIL import Image

    from danqing.sampling.cascade import pixel_pictures, upscale
    from danqing.sampling.noise import make_generators
    from danqing.training.data import render_batch

    high = _pixels(render_batch(scenes, base_size * SCALE, workers=1))
    low = downsample(high)
    gens = make_generators([seed + i for i in range(len(scenes))], "cpu")
    res = pixel_pictures(upscale(stage, low, steps=steps, noise_level=noise_level, generators=gens).latents)
    out = []
    for i in range(len(scenes)):
        lo = Image.fromarray(((low[i].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy())
        out += [lo.resize((base_size * SCALE,) * 2, Image.NEAREST), res[i],
                Image.fromarray(((high[i].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())]
    return out


# ---------------------------------------------------------------------------------------------
# Judging the cascade (danqing eval cascade)
# ---------------------------------------------------------------------------------------------
def clipped_share(image) -> float:
    """The share of pixels with a channel at the ends of the range (<= 2 or >= 253): none of the
    shapes world's colours or backgrounds is there, so in a generated picture they are
    over-saturation (x0 pushed past [-1, 1] by high CFG and cut off)."""
    import numpy as np

    a = np.asarray(image.convert("RGB"))
    return float(((a <= 2) | (a >= 253)).any(axis=2).mean())


def saturation(image) -> float:
    """Mean HSV saturation (0-1) of a picture."""
    import numpy as np

    return float(np.asarray(image.convert("HSV"))[..., 1].mean() / 255)


def _chunks(n: int, size: int):
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def cascade_pictures(stage_1, stage_2, prompts: list[str], *, seed: int, steps: int, cfg_scale: float,
                     upscale_steps: int, noise_level: int, size: int, batch: int = 25) -> tuple[list, list]:
    """(stage-I pictures, stage-II pictures or []) for ``prompts``, picture i from seed + i --
    batched, as ``run_if`` would make each alone (its generators continue into stage II)."""
    from danqing.conditioning.if_text import if_schedule
    from danqing.sampling.cascade import base_pixels, pixel_pictures, upscale
    from danqing.sampling.noise import make_generators

    lows, highs = [], []
    for rows in _chunks(len(prompts), batch):
        gens = make_generators([seed + i for i in rows], "cpu")
        cond = if_schedule(stage_1.text_encoder, stage_1.tokenizer, [prompts[i] for i in rows], "", len(rows), steps,
                           cfg_scale > 1.0)
        first = base_pixels(stage_1, cond, steps=steps, cfg_scale=cfg_scale, generators=gens, size=(size, size))
        lows += pixel_pictures(first.latents)
        if stage_2 is not None:
            highs += pixel_pictures(upscale(stage_2, first.latents, steps=upscale_steps, noise_level=noise_level,
                                       generators=gens).latents)
    return lows, highs


def judge_cascade(stage_1, stage_2, n: int = 200, *, steps: int = 50, cfg_scale: float = 7.0,
                  upscale_steps: int = 50, noise_level: int = 100, seed: int = 1000, baseline=None,
                  baseline_steps: int = 20, lang: str = "en", on_picture=None) -> dict:
    """The evaluator's summaries on the first ``n`` held-out scenes: the cascade's 128x128
    pictures ("cascade"), stage I's alone ("base"), and, with ``baseline`` (Components of a
    64x64 text-to-image model, e.g. danqing-tiny), its pictures of the same prompts and seeds
    enlarged to 128x128 with Lanczos ("baseline_lanczos"). ``on_picture(i, prompt, pictures)``
    sees each scene's pictures (low, high[, baseline])."""
    from PIL import Image

    from danqing.synthetic.captions import caption
    from danqing.synthetic.evaluate import score, summarise
    from danqing.synthetic.scenes import eval_scenes
    from danqing.training.base import generate_images

    scs = eval_scenes(n)[:n]
    prompts = [caption(s, lang) for s in scs]
    size = stage_1.unet.config.sample_size
    lows, highs = cascade_pictures(stage_1, stage_2, prompts, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                   upscale_steps=upscale_steps, noise_level=noise_level, size=size)
    out = {"n": n, "base": summarise([score(im, s.spec) for im, s in zip(lows, scs)])}
    if highs:
        out["cascade"] = summarise([score(im, s.spec) for im, s in zip(highs, scs)])
    base_imgs = []
    if baseline is not None:
        small = generate_images(baseline, prompts, seed=seed, steps=baseline_steps, cfg_scale=cfg_scale, size=64)
        base_imgs = [im.resize((size * SCALE,) * 2, Image.LANCZOS) for im in small]
        out["baseline_lanczos"] = summarise([score(im, s.spec) for im, s in zip(base_imgs, scs)])
    if on_picture is not None:
        for i, p in enumerate(prompts):
            on_picture(i, p, [lows[i]] + ([highs[i]] if highs else []) + ([base_imgs[i]] if base_imgs else []))
    return out


def thresholding_errors(stage_1, n: int = 100, *, cfg_scales=(7.0, 20.0), steps: int = 50, seed: int = 1000,
                        lang: str = "en") -> list[dict]:
    """Stage I with IF's dynamic thresholding against static clipping of x0 to [-1, 1], at each
    CFG scale: the evaluator's object score, the share of clipped pixels (``clipped_share``) and
    the mean saturation above the true pictures' (the same scenes rendered and box-downsampled
    as stage I learned them)."""
    import numpy as np

    from danqing.synthetic.captions import caption
    from danqing.synthetic.evaluate import score
    from danqing.synthetic.scenes import eval_scenes
    from danqing.training.data import render_batch
    from danqing.sampling.cascade import pixel_pictures

    scs = eval_scenes(n)[:n]
    prompts = [caption(s, lang) for s in scs]
    size = stage_1.unet.config.sample_size
    truth = pixel_pictures(downsample(_pixels(render_batch(scs, size * SCALE, workers=1))))
    true_sat = float(np.mean([saturation(im) for im in truth]))
    rows = []
    for cfg in cfg_scales:
        for dynamic in (True, False):
            stage = _with_config(stage_1, thresholding=dynamic, clip_sample=True)
            lows, _ = cascade_pictures(stage, None, prompts, seed=seed, steps=steps, cfg_scale=cfg, upscale_steps=0,
                                       noise_level=0, size=size)
            rows.append({"cfg_scale": cfg, "x0": "dynamic thresholding" if dynamic else "static clipping",
                         "object": float(np.mean([score(im, s.spec).object for im, s in zip(lows, scs)])),
                         "clipped_pixels": float(np.mean([clipped_share(im) for im in lows])),
                         "saturation_excess": float(np.mean([saturation(im) for im in lows])) - true_sat})
    return rows
