"""Training danqing's own Stable-Diffusion-architecture model from scratch.

Two stages, both in this file and both driven by one TOML config (``danqing train base``):

1. **VAE** (``AutoencoderKL``): reconstruction (L1 + MSE) + a small KL term, as in Rombach et
   al. (2022) without the perceptual and GAN terms, which flat synthetic pictures do not need.
   Then every training image is encoded once (the posterior's mean and std are cached) and the
   latent scaling factor is set to 1/std of the latents, as SD's 0.18215 was.
2. **Text encoder + UNet** (``CLIPTextModel`` with the real CLIP tokenizer, and
   ``UNet2DConditionModel``) trained together from random init with the epsilon objective of
   DDPM (Ho et al., 2020) on SD's noise schedule, caption dropout for classifier-free guidance
   (Ho & Salimans, 2022), EMA weights, accelerate for devices and mixed precision, checkpoints
   that resume to the same state, and every N steps a sample grid and the evaluator's score.

Every random draw of step ``s`` comes from a generator seeded with (seed, s), so a run resumed
from a checkpoint continues exactly as the uninterrupted run would have. Several processes
(``--num-processes N``) share each step's batch as ``danqing.training.runs`` describes.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from danqing.errors import InvalidRequest
from danqing.files import atomic_save_dir
from danqing.decode import decode_latents, to_pil
from danqing.models.families import build_components
from danqing.models.loader import load_components, save_diffusers_folder
from danqing.models.registry import Registry
from danqing.models.single_file import save_single_file
from danqing.request import GenerationRequest
from danqing.settings import Settings
from danqing.studio import run_sampling
from danqing.synthetic.captions import caption
from danqing.synthetic.evaluate import score, summarise
from danqing.synthetic.portrait_reader import score_portrait, summarise_portraits
from danqing.synthetic.portraits import eval_portraits
from danqing.synthetic.portraits_captions import parse_portrait_prompt, portrait_caption
from danqing.synthetic.scenes import eval_scenes
from danqing.training.config import BaseTrainConfig
from danqing.training.data import folder_dataset, render_batch, synthetic_dataset, tokenize_captions
from danqing.training.runs import (any_process, latest_checkpoint, load_float32, mean_over_processes, my_rows, optimiser_step,
                                   quiet, resume_step, save_checkpoint, write_json_line)

Log = Callable[[str], None]


def _gen(seed: int, step: int, stage: str, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step * 7_919 + (1 if stage == "unet" else 0)) % (2**63))


# ---------------------------------------------------------------------------------------------
# Stage 1: VAE
# ---------------------------------------------------------------------------------------------
def new_accelerator(mixed_precision: str, **kwargs):
    """An Accelerator for one training run (or stage), on the GPU when there is one.

    accelerate keeps the mixed precision in a process-wide singleton (``AcceleratorState``) and
    refuses a second Accelerator with another precision in the same process: the server's job
    worker or a test session running two trainings would fail. The singleton is cleared first;
    ``PartialState`` (the process group under ``accelerate launch``) is kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), **kwargs)


def _accelerator(cfg: BaseTrainConfig):
    """A fresh Accelerator per stage, so a stage's checkpoints hold only that stage's state."""
    return new_accelerator(cfg.run.mixed_precision)


def _saturation(x: torch.Tensor) -> torch.Tensor:
    """HSV saturation of images in [-1, 1], (B, 3, H, W) -> (B, 1, H, W)."""
    rgb = (x + 1) / 2
    mx, mn = rgb.amax(1, keepdim=True), rgb.amin(1, keepdim=True)
    return (mx - mn) / mx.clamp_min(1e-3)


class _VaeRoundTrip(torch.nn.Module):
    """Encode, sample the posterior with the given noise, decode: the VAE stage's forward as one
    module, so DDP (which syncs gradients through ``forward``) wraps it in a multi-process run."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = self.vae.encode(x).latent_dist
        return self.vae.decode(post.mean + post.std * eps).sample.float(), post.kl()


def train_vae(vae, images: torch.Tensor, cfg: BaseTrainConfig, log: Log, run_dir: Path, *, phase: str = "full") -> list[float]:
    """Train ``vae`` in place on uint8 images (N, 3, H, W). Returns the logged losses.

    phase "full": whole images, L1 + MSE + KL. Phase "crop": random ``crop_size`` crops, with the
    per-pixel loss weighted by ``1 + object_weight * saturation`` so the few object pixels (what
    the pictures are about) count more than the background. Several processes each train on
    their rows of the batch (``runs.my_rows``); the weights are normalised over the whole batch.
    """
    c = cfg.vae
    crop = phase == "crop"
    steps, batch, lr = (c.crop_steps, c.crop_batch_size, c.crop_lr) if crop else (c.steps, c.batch_size, c.lr)
    accelerator = _accelerator(cfg)
    device, part, main = accelerator.device, my_rows(accelerator, batch), accelerator.is_main_process
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    model, opt = accelerator.prepare(_VaeRoundTrip(vae), opt)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    losses, t0, (n, _, h, _) = [], time.perf_counter(), images.shape
    for step in range(steps):
        g = _gen(cfg.run.seed + (7 if crop else 0), step, "vae")
        idx = torch.randint(n, (batch,), generator=g)
        x = images[idx]
        if crop:
            top, left = (int(v) for v in torch.randint(0, h - c.crop_size + 1, (2,), generator=g))
            x = x[:, :, top:top + c.crop_size, left:left + c.crop_size]
        x = x.float() / 127.5 - 1                                              # (B, 3, H, W) in [-1, 1]
        eps = torch.randn(batch, vae.config.latent_channels, x.shape[2] // down, x.shape[3] // down, generator=g)
        weight = 1 + c.object_weight * _saturation(x) if crop else torch.ones_like(x[:, :1])
        norm = weight.mean()                                                   # over the whole batch
        x, eps, weight = (v[part].to(device) for v in (x, eps, weight))
        with accelerator.autocast():
            rec, kl = model(x, eps)
            err = (rec - x).abs() + (rec - x) ** 2
            loss = (err * weight).mean() / norm.to(device) + c.kl_weight * kl.mean()
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == steps:
            rate = (step + 1) / (time.perf_counter() - t0)
            losses.append(float(mean_over_processes(accelerator, loss.detach())))
            if main:
                log(f"vae ({phase}) step {step + 1}/{steps} loss {losses[-1]:.4f} {rate:.2f} it/s")
                write_json_line(run_dir / "log.jsonl", {"stage": f"vae-{phase}", "step": step + 1, "loss": losses[-1]})
    vae.eval()
    return losses


def _load_vae(folder: str):
    """A diffusers VAE folder, fp32 and trainable; one line naming the folder when it is not one."""
    from diffusers import AutoencoderKL

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise InvalidRequest("model.init_vae", f"{folder}: not a diffusers VAE folder (config.json and weights)")
    return AutoencoderKL.from_pretrained(path).float().requires_grad_(True)


def _save_vae(vae, run_dir: Path, name: str) -> Path:
    return atomic_save_dir(run_dir / name, vae.save_pretrained, overwrite=True)


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every image, (N, 4, h, w) each, on the CPU."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        x = (images[i:i + batch].float() / 127.5 - 1).to(device)
        post = vae.encode(x).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_score(vae, n: int = 64, size: int = 64) -> dict:
    """The evaluator's score of VAE round trips of ``n`` held-out scenes (a VAE that loses shapes
    or colours caps every model trained on it)."""
    scs = eval_scenes(n)
    x = render_batch(scs, size).float() / 127.5 - 1                          # (n, 3, H, W) in [-1, 1]
    rec = vae.decode(vae.encode(x.to(next(vae.parameters()).device)).latent_dist.mean).sample
    imgs = to_pil(((rec.clamp(-1, 1) + 1) / 2).cpu())
    return summarise([score(im, s.spec) for im, s in zip(imgs, scs)])


# ---------------------------------------------------------------------------------------------
# Sampling and evaluation with the model being trained
# ---------------------------------------------------------------------------------------------
def generate_images(comps, prompts: list[str], *, seed: int, steps: int, cfg_scale: float, size: int,
                    sampler: str = "DPM++ 2M", schedule: str = "Automatic", device="cpu") -> list:
    """One image per prompt (seed + i) with our own loop, on Components as they are."""
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            req = GenerationRequest(prompt=p, seed=seed + i, subseed=0, steps=steps, cfg_scale=cfg_scale,
                                    width=size, height=size, sampler=sampler, schedule=schedule, model="(training)")
            lats, *_ = run_sampling(comps, req, device=torch.device(device), dtype=torch.float32)
            out += to_pil(decode_latents(comps.vae, lats[0]))
    return out


def evaluate_comps(comps, n: int, *, lang: str = "en", steps: int = 20, cfg_scale: float = 7.0, size: int = 64,
                   seed: int = 1000, device="cpu") -> dict:
    """Evaluator summary over the first ``n`` held-out evaluation scenes."""
    scs = eval_scenes(max(n, 1))[:n]
    imgs = generate_images(comps, [caption(s, lang) for s in scs], seed=seed, steps=steps, cfg_scale=cfg_scale,
                           size=size, device=device)
    return summarise([score(im, s.spec) for im, s in zip(imgs, scs)])


def evaluate_portrait_comps(comps, n: int, *, lang: str = "en", steps: int = 20, cfg_scale: float = 7.0,
                            size: int = 64, seed: int = 1000, device="cpu") -> dict:
    """The portrait reader's summary over the first ``n`` held-out portraits."""
    prompts = [portrait_caption(p, lang) for p in eval_portraits(max(n, 1))[:n]]
    imgs = generate_images(comps, prompts, seed=seed, steps=steps, cfg_scale=cfg_scale, size=size, device=device)
    return summarise_portraits([score_portrait(im, parse_portrait_prompt(t)) for im, t in zip(imgs, prompts)])


@torch.no_grad()
def portrait_reconstruction_score(vae, n: int = 64, size: int = 64) -> dict:
    """The portrait reader's summary of VAE round trips of ``n`` held-out portraits."""
    items = eval_portraits(n)
    x = render_batch(items, size).float() / 127.5 - 1                       # (n, 3, H, W) in [-1, 1]
    rec = vae.decode(vae.encode(x.to(next(vae.parameters()).device)).latent_dist.mean).sample
    imgs = to_pil(((rec.clamp(-1, 1) + 1) / 2).cpu())
    return summarise_portraits([score_portrait(im, p.visible_attributes()) for im, p in zip(imgs, items)])


def image_grid(images: list, cols: int = 8):
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


SAMPLE_PROMPTS = [
    "a red circle left of a blue square", "a yellow triangle", "a green ring above a pink star",
    "a blue star on the right", "一个紫色的圆形", "橙色的十字在青色圆环的下方",
    "a cyan square, a red cross and a yellow circle from left to right", "a pink triangle at the top",
]
PORTRAIT_SAMPLE_PROMPTS = [   # data.world "portraits" and "mix" sample these too
    "a portrait of a person with a round face, pale skin, short black hair and brown eyes, smiling, in a red shirt, "
    "flat colours",
    "a portrait of a person with an oval face, tan skin, long blonde hair and blue eyes, wearing glasses, sad, "
    "in a green shirt, ink drawing",
    "方脸、深肤色、粉色刺头、绿眼睛、惊讶、黄衣服、墨线画",
    "a portrait of a person with a square face, hair in a bun, wearing glasses, smiling, pencil sketch",
]


# ---------------------------------------------------------------------------------------------
# Stage 2: text encoder + UNet
# ---------------------------------------------------------------------------------------------
def lr_factor(step: int, *, warmup: int, steps: int, decay: int) -> float:
    """The UNet stage's learning rate over its base value at ``step`` (0-based): a linear
    warm-up over ``warmup`` steps, then constant, then (``decay`` > 0) a linear fall to 0 over
    the last ``decay`` of ``steps``: warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al.
    2024). A run made in pieces at the constant rate is ended by one more piece with ``steps``
    and ``decay`` set, whatever step it has reached."""
    up = min(1.0, (step + 1) / max(1, warmup))
    down = min(1.0, max(0.0, (steps - step) / decay)) if decay else 1.0
    return up * down


def train_unet(comps, latents: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, empty_ids: torch.Tensor,
               cfg: BaseTrainConfig, log: Log, run_dir: Path, *, resume: bool, evaluate: bool) -> dict:
    """Train text encoder + UNet of ``comps`` in place; at the end their weights are the EMA ones.

    Args:
        latents: cached posterior (mean, std), (N, 4, h, w) each, unscaled.
        ids: (N, K, 77) caption token ids; empty_ids: (77,) ids of the empty prompt.
        evaluate: log the evaluator's score (synthetic data only).
    Returns:
        {"step": last step, "loss": last logged loss, "eval": last evaluation or None}.
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    c, r = cfg.unet, cfg.run
    accelerator = _accelerator(cfg)
    unet, te = comps.unet, comps.text_encoder
    frozen_te = cfg.model.frozen_text_encoder_from is not None
    unet.train()
    te.train(not frozen_te)
    te.requires_grad_(not frozen_te)
    params = [p for m in ((unet,) if frozen_te else (unet, te)) for p in m.parameters()]
    ema = EMAModel(params, decay=c.ema_decay, foreach=True)
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        lr_factor, warmup=c.warmup_steps, steps=c.steps, decay=c.decay_steps))
    unet, te, opt, sched = accelerator.prepare(unet, te, opt, sched)
    accelerator.register_for_checkpointing(ema)
    noise_sched = DDPMScheduler.from_config(comps.scheduler_config)
    scaling = comps.vae.config.scaling_factor
    mean, std = latents
    n, k = ids.shape[:2]
    start = resume_step(accelerator, run_dir, log) if resume else 0
    dev = accelerator.device
    # On a GPU the cached latents and token ids live there and each step's batch is drawn there
    # (a CUDA generator per step): drawing it on the CPU was the bottleneck of a small model.
    gdev = dev if dev.type == "cuda" else torch.device("cpu")
    mean, std, ids, empty_ids = (x.to(gdev) for x in (mean, std, ids, empty_ids))
    part, main = my_rows(accelerator, c.batch_size), accelerator.is_main_process  # this process's rows; who writes
    t0, last = time.perf_counter(), {"step": start, "loss": None, "eval": None}
    if cfg.data.world != "shapes":
        last["eval_portraits"] = None
    loss_avg = None
    deadline = t0 + r.max_minutes * 60 if r.max_minutes else None
    for step in range(start, c.steps):
        g = _gen(r.seed, step, "unet", gdev)
        idx = torch.randint(n, (c.batch_size,), generator=g, device=gdev)
        cap = torch.randint(k, (c.batch_size,), generator=g, device=gdev)
        tok = ids[idx, cap].long()                                             # (B, 77)
        drop = torch.rand(c.batch_size, generator=g, device=gdev) < c.caption_dropout
        tok = torch.where(drop[:, None], empty_ids.long()[None], tok)        # no mask indexing: no sync
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=gdev)) * scaling  # (B, 4, h, w)
        noise = torch.randn(z.shape, generator=g, device=gdev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (c.batch_size,), generator=g, device=gdev)
        x_t = noise_sched.add_noise(z, noise, t)                               # sqrt(a)z + sqrt(1-a)eps
        tok, x_t, t, noise = (v[part].to(dev) for v in (tok, x_t, t, noise))
        with accelerator.autocast():
            with torch.set_grad_enabled(not frozen_te):
                cond = te(tok)[0]                                               # (B, 77, d)
            pred = unet(x_t, t, cond).sample
            loss = F.mse_loss(pred.float(), noise)
        optimiser_step(accelerator, loss, params, opt, sched, c.max_grad_norm, ema)
        # stays on the device (no sync with the GPU per step); the whole batch's with several processes
        value = mean_over_processes(accelerator, loss.detach().float())
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        done = step + 1
        if done % r.log_every == 0 or done == c.steps:
            loss_avg = float(loss_avg)
            rate = (done - start) / (time.perf_counter() - t0)
            eta = (c.steps - done) / max(rate, 1e-9)
            if main:
                log(f"unet step {done}/{c.steps} loss {loss_avg:.4f} lr {sched.get_last_lr()[0]:.2e} "
                    f"{rate:.2f} it/s eta {eta / 60:.1f} min")
                write_json_line(run_dir / "log.jsonl", {"stage": "unet", "step": done, "loss": loss_avg})
            last.update(step=done, loss=loss_avg)
        out_of_time = any_process(accelerator, deadline is not None and time.perf_counter() > deadline)
        if out_of_time:
            loss_avg = float(loss_avg)
            if main:
                log(f"unet: run.max_minutes={r.max_minutes} reached at step {done}; stopping there")
                write_json_line(run_dir / "log.jsonl", {"stage": "unet", "step": done, "loss": loss_avg})
            last.update(step=done, loss=loss_avg)
        if done % r.checkpoint_every == 0 or done == c.steps or out_of_time:
            save_checkpoint(accelerator, run_dir, done)
        final = done == c.steps or out_of_time
        want_sample = main and (done % r.sample_every == 0 or final)  # the main process samples and writes
        want_eval = main and evaluate and r.eval_prompts and (done % r.eval_every == 0 or final)
        want_export = main and r.export_every and (done % r.export_every == 0 or final)
        if want_sample or want_eval or want_export:
            ema.store(params)
            ema.copy_to(params)
            unet.eval()
            te.eval()
            if want_sample:
                prompts = SAMPLE_PROMPTS if cfg.data.world == "shapes" else SAMPLE_PROMPTS + PORTRAIT_SAMPLE_PROMPTS
                imgs = generate_images(comps, prompts, seed=0, steps=r.eval_steps, cfg_scale=7.0,
                                       size=cfg.data.size, device=dev)
                (run_dir / "samples").mkdir(exist_ok=True)
                image_grid(imgs).save(run_dir / "samples" / f"step-{done:06d}.png")
            if want_eval:
                res = evaluate_comps(comps, r.eval_prompts, steps=r.eval_steps, size=cfg.data.size, device=dev)
                log(f"eval step {done}: {res}")
                write_json_line(run_dir / "log.jsonl", {"stage": "eval", "step": done, **res})
                last["eval"] = res
                if cfg.data.world != "shapes":
                    res = evaluate_portrait_comps(comps, r.eval_prompts, steps=r.eval_steps, size=cfg.data.size, device=dev)
                    log(f"eval portraits step {done}: {res}")
                    write_json_line(run_dir / "log.jsonl", {"stage": "eval-portraits", "step": done, **res})
                    last["eval_portraits"] = res
            if want_export:
                _export_latest(comps, run_dir, done)
            ema.restore(params)
            unet.train()
            te.train(not frozen_te)
        if out_of_time:
            break
    ema.copy_to(params)
    comps.unet, comps.text_encoder = accelerator.unwrap_model(unet).eval(), accelerator.unwrap_model(te).eval()
    return last


def _export_latest(comps, run_dir: Path, step: int) -> None:
    """``latest.safetensors``: the model as it is now (EMA weights), fp16, single file, written
    atomically -- small enough to copy out while a run of fixed length is still going."""
    import copy


    c = copy.copy(comps)
    for part in ("unet", "vae", "text_encoder"):
        setattr(c, part, copy.deepcopy(getattr(comps, part)).to("cpu", torch.float16))
    save_single_file(c, run_dir / "latest.safetensors", metadata={"danqing.step": str(step)}, overwrite=True)


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------
def export_model(comps, out: Path, *, dtype: torch.dtype = torch.float32, name: str = "model",
                 metadata: dict | None = None) -> tuple[Path, Path]:
    """Write ``out/<name>/`` (diffusers folder) and ``out/<name>.safetensors`` (single file, LDM
    layout with our configs in the header), in ``dtype``. Replaces an earlier export of the run."""
    import copy

    c = copy.copy(comps)
    for part in ("unet", "vae", "text_encoder"):
        setattr(c, part, copy.deepcopy(getattr(comps, part)).to(dtype))
    folder, single = out / name, out / f"{name}.safetensors"
    for p in (folder, single):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    save_diffusers_folder(c, folder)
    save_single_file(c, single, metadata=metadata or {})
    return folder, single


def train_base(cfg: BaseTrainConfig, *, resume: bool = False, log: Log = print) -> dict:
    """Run both stages of ``cfg``; returns a summary. Artifacts under ``cfg.run.output_dir``:
    ``vae/`` (stage 1), ``checkpoints/step-N/`` (stage 2, resumable), ``samples/``, ``log.jsonl``,
    ``model/`` + ``model.safetensors`` (the final EMA model, fp32)."""
    from diffusers import AutoencoderKL

    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    acc = _accelerator(cfg)
    device, main = acc.device, acc.is_main_process  # the other processes of a multi-process run write nothing
    if main:
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    else:
        log = quiet
    t_start = time.perf_counter()
    synthetic = cfg.data.source == "synthetic"
    t = time.perf_counter()
    ckpt = latest_checkpoint(run_dir) if resume else None
    finished = (ckpt is not None and (run_dir / "vae" / "config.json").is_file()
                and json.loads((ckpt / "step.json").read_text())["step"] >= cfg.unet.steps)
    if finished:  # only the export is left: no data needed
        data = None
        log(f"{ckpt} reaches unet.steps={cfg.unet.steps}: exporting it")
    elif synthetic:
        data = synthetic_dataset(cfg.data.n_images, cfg.data.size, cfg.data.seed, cfg.data.captions_per_image,
                                 world=cfg.data.world, portrait_share=cfg.data.portrait_share, captions=cfg.data.captions,
                                 portrait_drop=cfg.data.portrait_drop)
    else:
        data = folder_dataset(cfg.data.source, cfg.data.size)
    n_images = len(data) if data is not None else (cfg.data.n_images if synthetic else None)
    if data is not None:
        log(f"data: {len(data)} images at {cfg.data.size}px ({time.perf_counter() - t:.1f} s)")
    if cfg.model.init_from:
        comps = load_components(Registry(Settings.from_env().models_dir).find("checkpoint", cfg.model.init_from))
        for m in comps.modules().values():
            m.float().requires_grad_(True)
        log(f"model: continuing from {cfg.model.init_from}")
    else:
        comps = build_components(cfg.model.family, seed=cfg.run.seed)
    if cfg.model.init_vae:
        comps.vae = _load_vae(cfg.model.init_vae)
        log(f"vae: starting from {cfg.model.init_vae}")
    if cfg.model.frozen_text_encoder_from:
        comps.text_encoder = load_float32(cfg.model.frozen_text_encoder_from)[0].text_encoder
        log(f"text encoder: {cfg.model.frozen_text_encoder_from}'s, frozen")
    summary: dict = {"family": cfg.model.family, "images": n_images, "init_from": cfg.model.init_from}

    # Stage 1: the VAE, in two phases; a finished phase in the run folder is not redone.
    t = time.perf_counter()
    for phase, steps, folder in (("full", cfg.vae.steps, "vae-full"), ("crop", cfg.vae.crop_steps, "vae")):
        if phase == "full" and cfg.vae.crop_steps == 0:
            folder = "vae"
        done = run_dir / folder
        if resume and (done / "config.json").is_file():
            comps.vae = AutoencoderKL.from_pretrained(done).eval()
            log(f"vae: loaded {done}")
            continue
        if steps:
            train_vae(comps.vae, data.images, cfg, log, run_dir, phase=phase)
        comps.vae.to(device)
        if folder == "vae" and (cfg.vae.steps or cfg.vae.crop_steps):  # a kept VAE keeps its scale
            mean, _ = encode_all(comps.vae, data.images[:2048], device)
            comps.vae.register_to_config(scaling_factor=round(float(1.0 / mean.std()), 5))
        if main:
            _save_vae(comps.vae, run_dir, folder)
        acc.wait_for_everyone()
    summary["vae_seconds"] = round(time.perf_counter() - t, 1)
    comps.vae.to(device)
    if synthetic and main:
        summary["vae_reconstruction"] = reconstruction_score(comps.vae, size=cfg.data.size)
        log(f"vae reconstructions: {summary['vae_reconstruction']}")
        if cfg.data.world != "shapes":
            summary["vae_portrait_reconstruction"] = portrait_reconstruction_score(comps.vae, size=cfg.data.size)
            log(f"vae portrait reconstructions: {summary['vae_portrait_reconstruction']}")

    # Stage 2: cache latents and captions, then train text encoder + UNet.
    t = time.perf_counter()
    if finished:  # placeholders: the loop has no step left to run
        h = cfg.data.size // (2 ** (len(comps.vae.config.block_out_channels) - 1))
        latents = (torch.zeros(1, comps.vae.config.latent_channels, h, h),) * 2
        ids, empty = tokenize_captions(comps.tokenizer, [[""]])
    else:
        latents = encode_all(comps.vae, data.images, device)
        ids, empty = tokenize_captions(comps.tokenizer, data.captions)
    log(f"cached {latents[0].shape[0]} latents {tuple(latents[0].shape[1:])} and {ids.shape[1]} captions each "
        f"({time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    comps.unet.to(device)
    comps.text_encoder.to(device)
    res = train_unet(comps, latents, ids, empty, cfg, log, run_dir, resume=resume, evaluate=synthetic)
    summary.update(unet_seconds=round(time.perf_counter() - t, 1), **{f"final_{k}": v for k, v in res.items()})
    comps.unet.to("cpu")
    comps.text_encoder.to("cpu")
    comps.vae.to("cpu")
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    if main:
        meta = {"danqing.training": json.dumps({"config": cfg.model_dump(), "steps": res["step"], "images": n_images})}
        export_model(comps, run_dir, metadata=meta)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log(f"done: {run_dir / 'model'} and {run_dir / 'model.safetensors'}")
    return summary
