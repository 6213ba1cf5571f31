"""danqing-tiny-prior: unCLIP's prior (DALL-E 2) on danqing-tiny-clip, in Kandinsky 2.2's format.

The prior turns a caption into the CLIP image embedding of a picture the caption describes; with
the unCLIP decoder (``training.unclip``) that makes text-to-image. DALL-E 2 (Ramesh et al. 2022,
2.1) found a diffusion prior better than an autoregressive one: a decoder-only transformer reads
the caption's tokens, its CLIP text embedding, the diffusion timestep and the noised image
embedding, and predicts the unnoised image embedding directly (mean squared error on it, not on
the noise). Kandinsky 2.2 ships that prior as diffusers' ``PriorTransformer`` with an
``UnCLIPScheduler`` (``prediction_type: sample``); the embeddings are normalised by the
transformer's own ``clip_mean`` / ``clip_std``.

Here the text encoder and the image encoder are danqing-tiny-clip's two halves (frozen); the
training pairs are the shapes world's captions and the CLIP image embeddings of their pictures.
The folder is ``KandinskyV22PriorPipeline``'s layout: ``danqing generate --model <unCLIP decoder>
--prior <this folder>`` runs text -> prior -> decoder, and diffusers loads it as it is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from danqing.customise.ip_adapter import encode_images
from danqing.models.unclip_models import KandinskyPrior
from danqing.synthetic.captions import caption
from danqing.synthetic.render import render
from danqing.synthetic.scenes import eval_scenes
from danqing.training.base import _gen, new_accelerator
from danqing.training.config import PriorTrainConfig
from danqing.training.data import picture_embeddings, synthetic_dataset
from danqing.training.runs import StepLog, ema_weights, export_run, my_rows, optimiser_step, resume_step, start_run

Log = Callable[[str], None]
# Kandinsky 2.2's prior scheduler (its released scheduler/; the prior predicts the sample)
PRIOR_SCHEDULER = {"_class_name": "UnCLIPScheduler", "num_train_timesteps": 1000, "variance_type": "fixed_small_log",
                   "clip_sample": True, "clip_sample_range": 10.0, "prediction_type": "sample"}


def text_half(folder: Path):
    """The ``CLIPTextModelWithProjection`` of a whole ``CLIPModel`` folder: its text tower and
    projection, the same modules (``models.ip_adapter._vision_half``'s twin)."""
    from transformers import CLIPModel, CLIPTextModelWithProjection

    full = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    text = full.config.text_config
    text.projection_dim = full.config.projection_dim
    encoder = CLIPTextModelWithProjection(text)
    encoder.text_model, encoder.text_projection = full.text_model, full.text_projection
    return encoder.float().eval().requires_grad_(False)


def new_prior(cfg: PriorTrainConfig, embed_dim: int, text_width: int, embeds: torch.Tensor, seed: int):
    """A random ``PriorTransformer`` of the config's size (Kandinsky 2.2's options) whose
    ``clip_mean`` / ``clip_std`` are the training embeddings' (N, D)."""
    from diffusers import PriorTransformer

    if text_width != embed_dim:
        raise ValueError(f"the prior reads the text's hidden states at the embedding's width: the CLIP's text width "
                         f"{text_width} differs from its projection {embed_dim}")
    p = cfg.prior
    torch.manual_seed(seed)
    prior = PriorTransformer(num_attention_heads=p.num_attention_heads, attention_head_dim=p.attention_head_dim,
                             num_layers=p.num_layers, embedding_dim=embed_dim, num_embeddings=77,
                             additional_embeddings=4, dropout=0.0, time_embed_act_fn="gelu", norm_in_type="layer",
                             embedding_proj_norm_type="layer", encoder_hid_proj_type="linear", added_emb_type="prd")
    with torch.no_grad():
        prior.clip_mean.copy_(embeds.mean(0, keepdim=True))
        prior.clip_std.copy_(embeds.std(0, keepdim=True))
    return prior


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, texts: list[str], batch: int = 512):
    """(text_embeds (N, D), hidden states (N, 77, C), attention mask (N, 77)) of each text, as
    the sampler reads a prompt (``sampling.kandinsky._text``)."""
    embeds, hidden, masks = [], [], []
    for i in range(0, len(texts), batch):
        tok = tokenizer(texts[i:i + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        out = text_encoder(tok.input_ids)
        embeds.append(out.text_embeds.float())
        hidden.append(out.last_hidden_state.float())
        masks.append(tok.attention_mask.bool())
    return torch.cat(embeds), torch.cat(hidden), torch.cat(masks)


def prior_loss(prior, x0: torch.Tensor, proj: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
               g: torch.Generator, noise_sched, acc) -> torch.Tensor:
    """DALL-E 2's prior objective on normalised image embeddings ``x0`` (B, D): noise them to a
    random timestep, predict them back, mean squared error. Draws from ``g`` for the whole batch."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=g)
    x_t = noise_sched.add_noise(x0, noise, t)
    part = my_rows(acc, b)
    x_t, t, proj, hidden, mask, x0 = (v[part].to(acc.device) for v in (x_t, t, proj, hidden, mask, x0))
    with acc.autocast():
        pred = prior(x_t, timestep=t, proj_embedding=proj, encoder_hidden_states=hidden,
                     attention_mask=mask).predicted_image_embedding
        return F.mse_loss(pred.float(), x0.float())


@torch.no_grad()
def prior_rates(prior: KandinskyPrior, n: int, *, steps: int = 25, cfg_scale: float = 4.0, seed: int = 0,
                size: int = 64) -> dict:
    """For the first ``n`` held-out scenes: the cosine between the prior's embedding of the
    scene's caption and the CLIP embedding of its picture, and how often that picture is the
    nearest of the ``n`` (top-1; chance 1/n)."""
    from danqing.sampling.kandinsky import run_prior
    from danqing.sampling.noise import make_generators

    scenes = eval_scenes(max(n, 1))[:n]
    pics = [render(s, size) for s in scenes]
    truth = encode_images(prior.image_encoder, prior.image_processor, pics, plus=False).embeds[0].float()
    got = torch.cat([run_prior(prior, caption(s, "en"), "", 1, make_generators([seed + i], "cpu"), steps=steps,
                               cfg_scale=cfg_scale)[0] for i, s in enumerate(scenes)]).float()
    a, b = F.normalize(got, dim=-1), F.normalize(truth, dim=-1)
    sims = a @ b.T
    top1 = (sims.argmax(dim=1) == torch.arange(n)).float().mean()
    return {"n": n, "cosine": round(float(sims.diag().mean()), 4), "top1": round(float(top1), 4)}


def train_prior(cfg: PriorTrainConfig, *, resume: bool = False, log: Log = print) -> dict:
    """Train and export ``run.output_dir/prior/`` (a Kandinsky 2.2 prior folder, fp32) and
    ``summary.json``; ``resume``: continue from the newest checkpoint."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from danqing.models.clip_model import clip_folder
    from danqing.models.ip_adapter import load_image_encoder
    from danqing.models.tokenizer import clip_tokenizer
    from danqing.models.unclip_models import save_kandinsky_prior

    c, r, d, p = cfg.unet, cfg.run, cfg.data, cfg.prior
    run_dir = start_run(r.output_dir, resume=resume, num_threads=r.num_threads)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    t_start = time.perf_counter()
    folder = clip_folder(p.clip)
    image_encoder, processor = load_image_encoder(folder)
    text_encoder, tokenizer = text_half(folder), clip_tokenizer()

    data = synthetic_dataset(d.n_images, d.size, d.seed, d.captions_per_image)
    embeds = picture_embeddings(image_encoder, processor, data.images)
    texts = sorted({t for caps in data.captions for t in caps})
    index = {t: i for i, t in enumerate(texts)}
    proj, hidden, mask = encode_captions(text_encoder, tokenizer, texts + [""])
    cap_idx = torch.tensor([[index[t] for t in caps] for caps in data.captions])
    log(f"data: {len(data)} pictures and their CLIP image embeddings, {len(texts)} distinct captions "
        f"({time.perf_counter() - t_start:.0f} s)")

    prior = new_prior(cfg, embeds.shape[1], hidden.shape[-1], embeds, r.seed).train()
    model = KandinskyPrior(prior=prior, scheduler_config=dict(PRIOR_SCHEDULER), text_encoder=text_encoder,
                           tokenizer=tokenizer, image_encoder=image_encoder, image_processor=processor)
    prior.clip_mean.requires_grad_(False)  # parameters in diffusers, statistics here: they stay
    prior.clip_std.requires_grad_(False)
    with torch.no_grad():
        x0_all = (embeds - prior.clip_mean) / prior.clip_std  # what post_process_latents undoes
    params = [q for q in prior.parameters() if q.requires_grad]
    acc = new_accelerator(r.mixed_precision)
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)))
    wrapped, opt, sched = acc.prepare(prior, opt, sched)
    ema = EMAModel(params, decay=c.ema_decay, foreach=True)
    acc.register_for_checkpointing(ema)
    start = resume_step(acc, run_dir, log) if resume else 0
    # the forward process of the UnCLIPScheduler the prior samples with (its betas are squaredcos_cap_v2's)
    noise_sched = DDPMScheduler(num_train_timesteps=PRIOR_SCHEDULER["num_train_timesteps"],
                                beta_schedule="squaredcos_cap_v2")
    steps = StepLog("prior", c.steps, start, log, run_dir, r, acc)
    n, k = cap_idx.shape
    for step in range(start, c.steps):
        g = _gen(r.seed, step, "prior")
        idx = torch.randint(n, (c.batch_size,), generator=g)
        pick = torch.randint(k, (c.batch_size,), generator=g)
        drop = torch.rand(c.batch_size, generator=g) < p.drop_text
        rows = torch.where(drop, len(texts), cap_idx[idx, pick])
        wrapped.train()
        loss = prior_loss(wrapped, x0_all[idx], proj[rows], hidden[rows], mask[rows], g, noise_sched, acc)
        optimiser_step(acc, loss, params, opt, sched, c.max_grad_norm, ema)
        done = step + 1
        final = steps.done(done, loss)
        if steps.main and p.eval_prompts and (done % r.eval_every == 0 or final):
            with ema_weights(ema, params, prior):
                res = prior_rates(model, p.eval_prompts, size=d.size)
            log(f"eval step {done}: prior {res}")
            steps.evaluated(done, res, {"prior": res})
        if steps.stopping():
            break

    ema.copy_to(params)
    prior.eval().requires_grad_(False)
    acc.wait_for_everyone()
    summary = {"kind": "prior", "clip": p.clip, "images": len(data), "steps": steps.last["step"],
               "parameters": sum(q.numel() for q in prior.parameters()), "batch_size": c.batch_size,
               "loss": steps.last["loss"], "eval": steps.last["eval"],
               "minutes": round((time.perf_counter() - t_start) / 60, 1), "config": json.loads(cfg.model_dump_json())}
    if steps.main:
        export_run(run_dir, summary, lambda out: save_kandinsky_prior(model, out), log, folder="prior")
    return summary
