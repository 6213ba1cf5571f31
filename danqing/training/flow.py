"""danqing-tiny-flow: the SD3 recipe at toy size, trained on the shapes world.

A rectified flow (Liu et al. 2022; Lipman et al. 2023) moves data to noise on a straight line,
x_sigma = (1 - sigma) x0 + sigma * noise, and the model learns its velocity v = noise - x0 with a
plain mean squared error. SD3 (Esser et al. 2024) samples the training sigmas logit-normally,
sigma = sigmoid(N(m, s)), which spends the steps on the middle of the path where the velocity is
hardest to guess; its denoiser is the MMDiT, where text and image tokens attend jointly.

Here the denoiser is diffusers' own ``SD3Transformer2DModel`` at danqing-tiny's UNet's parameter
count, over danqing-tiny's latents (its VAE, frozen), conditioned by danqing-tiny's text encoder
(frozen) in SD3's two-CLIP layout: ``text_encoder`` and ``text_encoder_2`` are two copies of it
(with an identity projection for the pooled embedding), so the context is its penultimate hidden
states twice side by side, as SD3 reads CLIP-L and bigG. No T5: the model is trained on the 77
CLIP tokens alone (``Components.t5_tokens`` = 0, written into the folder's model_index.json as
the ``max_sequence_length`` a diffusers pipeline is given). The result is an SD3 folder that
danqing's loader, sampler and diffusers' ``StableDiffusion3Pipeline`` all run.

The text conditioning comes from ``conditioning.flow_text`` (``sd3_clip`` / ``sd3_context``), the
function the sampler calls, so training and generation cannot read prompts differently.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F

from danqing.conditioning.flow_text import sd3_clip, sd3_context
from danqing.models.components import Components
from danqing.training.base import _gen, encode_all, evaluate_comps, generate_images, image_grid, new_accelerator
from danqing.training.config import FlowTrainConfig
from danqing.training.data import synthetic_dataset, tokenize_captions
from danqing.training.runs import (StepLog, ema_weights, export_run, load_float32, optimiser_step, resume_step, start_run,
                                   my_rows)

Log = Callable[[str], None]
SAMPLE_PROMPTS = ["a red circle", "a blue square left of a yellow triangle", "a green star above a purple cross",
                  "一个橙色的圆形", "two magenta hearts", "a small white square on a black background",
                  "a large cyan triangle at the top right", "a yellow star right of a red circle"]


# ---------------------------------------------------------------------------------------------
# The objective (small pure functions)
# ---------------------------------------------------------------------------------------------
def logit_normal_sigmas(g: torch.Generator, n: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """(n,) training sigmas in (0, 1): sigmoid of N(mean, std) (SD3's "lognorm" sampling)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=g))


def flow_pair(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_sigma, target velocity): x_sigma = (1 - sigma) x0 + sigma noise, v = noise - x0.
    ``sigmas`` (B,) broadcast over the other axes."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1 - s) * x0 + s * noise, noise - x0


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def with_projection(text_encoder):
    """A ``CLIPTextModelWithProjection`` holding ``text_encoder``'s weights and an identity
    projection (hidden size = projection size): its ``text_embeds`` is the pooled EOS state."""
    from transformers import CLIPTextModelWithProjection

    cfg = copy.deepcopy(text_encoder.config)
    cfg.projection_dim = cfg.hidden_size
    cfg.dtype = "float32"
    out = CLIPTextModelWithProjection(cfg)
    # transformers 5: CLIPTextModel is the text transformer itself; WithProjection wraps it
    getattr(out, "text_model", out).load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())
    with torch.no_grad():
        out.text_projection.weight.copy_(torch.eye(cfg.hidden_size))
    return out.float().eval().requires_grad_(False)


def transformer_config(cfg: FlowTrainConfig, latent_size: int, latent_channels: int, text_width: int) -> dict:
    f = cfg.flow
    width = f.num_attention_heads * f.attention_head_dim
    return {"sample_size": latent_size, "patch_size": f.patch_size, "in_channels": latent_channels,
            "out_channels": latent_channels, "num_layers": f.num_layers, "attention_head_dim": f.attention_head_dim,
            "num_attention_heads": f.num_attention_heads, "joint_attention_dim": 2 * text_width,
            "caption_projection_dim": width, "pooled_projection_dim": 2 * text_width,
            "pos_embed_max_size": 2 * latent_size // f.patch_size,  # room for pictures twice the training size
            "qk_norm": None if f.qk_norm == "none" else f.qk_norm}


def flow_components(cfg: FlowTrainConfig, base: Components, seed: int) -> Components:
    """A new SD3 model around ``base``'s text encoder and VAE (copied, frozen): a random
    ``SD3Transformer2DModel`` of the config's size, a flow-matching scheduler."""
    from diffusers import SD3Transformer2DModel

    vae = copy.deepcopy(base.vae).eval().requires_grad_(False)
    if getattr(vae.config, "shift_factor", None) is None:
        vae.register_to_config(shift_factor=0.0)  # SD3's latents are (z - shift) * scale
    latent = cfg.data.size // 2 ** (len(vae.config.block_out_channels) - 1)
    te = with_projection(base.text_encoder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel.from_config(
        transformer_config(cfg, latent, vae.config.latent_channels, te.config.hidden_size))
    return Components(
        family="sd3", prediction_type="flow", unet=transformer, vae=vae, text_encoder=te,
        tokenizer=base.tokenizer, text_encoder_2=copy.deepcopy(te), tokenizer_2=copy.deepcopy(base.tokenizer),
        scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                          "shift": cfg.flow.shift},
        t5_tokens=0,
    )


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def text_batch(comps: Components, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 77 + t5_tokens, D), pooled (B, P)) of token ids (B, 77) through the frozen
    text encoders: the sampler's own ``sd3_clip`` and ``sd3_context``."""
    clip, pooled = sd3_clip(comps, ids, ids)  # both tokenizers are the same one: the same ids
    return sd3_context(comps, clip, None), pooled


def flow_loss(transformer, comps: Components, z: torch.Tensor, ids: torch.Tensor, g: torch.Generator, cfg, acc
              ) -> torch.Tensor:
    """The rectified-flow loss of one batch of scaled latents ``z`` and caption ids; all draws
    from ``g`` for the whole batch, of which this process keeps its rows."""
    b = z.shape[0]
    noise = torch.randn(z.shape, generator=g)
    sigmas = logit_normal_sigmas(g, b, cfg.flow.logit_mean, cfg.flow.logit_std)
    x_t, target = flow_pair(z, noise, sigmas)
    part = my_rows(acc, b)
    x_t, target, sigmas, ids = (v[part].to(acc.device) for v in (x_t, target, sigmas, ids))
    ctx, pooled = text_batch(comps, ids)
    with acc.autocast():
        pred = transformer(hidden_states=x_t, timestep=sigmas * 1000, encoder_hidden_states=ctx,
                           pooled_projections=pooled, return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def train_flow(cfg: FlowTrainConfig, *, resume: bool = False, log: Log = print) -> dict:
    """Train and export ``run.output_dir/model/`` (an SD3 diffusers folder, fp32) and
    ``summary.json``; ``resume``: continue from the newest checkpoint (as the uninterrupted run)."""
    from diffusers.training_utils import EMAModel

    from danqing.models.loader import save_diffusers_folder

    c, r, d = cfg.unet, cfg.run, cfg.data
    if d.source != "synthetic":
        from danqing.errors import InvalidRequest

        raise InvalidRequest("data.source", "danqing-tiny-flow trains on the synthetic worlds; use source = \"synthetic\"")
    run_dir = start_run(r.output_dir, resume=resume, num_threads=r.num_threads)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    t_start = time.perf_counter()
    base, _, _ = load_float32(cfg.flow.init_from)
    comps = flow_components(cfg, base, r.seed)
    transformer = comps.unet.float().train()
    log(f"transformer: {parameter_count(transformer):,} parameters (the base UNet: {parameter_count(base.unet):,})")

    data = synthetic_dataset(d.n_images, d.size, d.seed, d.captions_per_image, world=d.world,
                             portrait_share=d.portrait_share, captions=d.captions)
    acc = new_accelerator(r.mixed_precision)
    mean, std = encode_all(comps.vae, data.images, acc.device)
    mean, std = mean.cpu(), std.cpu()
    ids, empty = tokenize_captions(comps.tokenizer, data.captions)
    log(f"data: {len(data)} scenes, latents {tuple(mean.shape[1:])}, {ids.shape[1]} captions each "
        f"({time.perf_counter() - t_start:.0f} s)")
    vae_cfg = comps.vae.config
    scaling, shift = vae_cfg.scaling_factor, vae_cfg.shift_factor or 0.0
    for m in (comps.vae, comps.text_encoder, comps.text_encoder_2):
        m.to(acc.device)

    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)))
    model, opt, sched = acc.prepare(transformer, opt, sched)
    ema = EMAModel(params, decay=c.ema_decay, foreach=True)
    acc.register_for_checkpointing(ema)
    start = resume_step(acc, run_dir, log) if resume else 0
    steps = StepLog("flow", c.steps, start, log, run_dir, r, acc)
    n, k = ids.shape[:2]
    for step in range(start, c.steps):
        g = _gen(r.seed, step, "flow")
        idx = torch.randint(n, (c.batch_size,), generator=g)
        cap = torch.randint(k, (c.batch_size,), generator=g)
        tok = ids[idx, cap].long()
        drop = torch.rand(c.batch_size, generator=g) < c.caption_dropout
        tok = torch.where(drop[:, None], empty.long()[None], tok)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g) - shift) * scaling
        loss = flow_loss(model, comps, z, tok, g, cfg, acc)
        optimiser_step(acc, loss, params, opt, sched, c.max_grad_norm, ema)
        done = step + 1
        final = steps.done(done, loss)
        want_sample = steps.main and (done % r.sample_every == 0 or final)
        want_eval = steps.main and r.eval_prompts and (done % r.eval_every == 0 or final)
        if want_sample or want_eval:
            with ema_weights(ema, params, transformer):
                if want_sample:
                    imgs = generate_images(comps, SAMPLE_PROMPTS, seed=0, steps=r.eval_steps, cfg_scale=7.0,
                                           size=d.size, sampler="Euler", device=acc.device)
                    (run_dir / "samples").mkdir(exist_ok=True)
                    image_grid(imgs).save(run_dir / "samples" / f"step-{done:06d}.png")
                if want_eval:
                    res = evaluate_comps(comps, r.eval_prompts, steps=r.eval_steps, size=d.size, device=acc.device)
                    log(f"eval step {done}: {res}")
                    steps.evaluated(done, res, res)
            model.train()
        if steps.stopping():
            break

    ema.copy_to(params)
    transformer.eval()
    acc.wait_for_everyone()
    summary = {"kind": "flow", "init_from": cfg.flow.init_from, "parameters": parameter_count(transformer),
               "base_unet_parameters": parameter_count(base.unet), "images": len(data), "steps": steps.last["step"],
               "batch_size": c.batch_size, "loss": steps.last["loss"], "eval": steps.last["eval"],
               "minutes": round((time.perf_counter() - t_start) / 60, 1), "config": json.loads(cfg.model_dump_json())}
    if steps.main:
        for m in comps.modules().values():
            m.to("cpu")
        export_run(run_dir, summary, lambda out: save_diffusers_folder(comps, out), log)
    return summary
