"""The fine-tuning loop shared by LoRA, DreamBooth and textual inversion: the denoising
objective (epsilon or v targets, noise offset, min-SNR-gamma, masked loss) and the optimiser
loop under accelerate, with checkpoints that resume to the same state.

Every random draw of step ``s`` comes from a generator seeded with (seed, s), so a resumed run
continues as the uninterrupted one would have.

Several processes (``danqing train ... --num-processes N``): every process draws the whole batch
of a step (``train.batch_size`` is the global batch) and computes the loss on its own rows, as
``danqing.training.runs`` describes.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from danqing.errors import OutOfMemory
from danqing.training.base import new_accelerator
from danqing.training.runs import (latest_checkpoint, mean_over_processes, my_rows, quiet, resume_step,
                                   save_checkpoint, write_json_line)
from danqing.training.conditioning import text_conditioning
from danqing.training.data import process_caption
from danqing.training.latents import TrainData

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------
def snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon
    targets, min(SNR, gamma) / (SNR + 1) for v targets; SNR = a / (1 - a)."""
    a = alphas_cumprod.to(t.device)[t].float()
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if v_prediction else clipped / snr


def diffusion_loss(unet, noise_sched, z: torch.Tensor, ctx, added, g: torch.Generator, *, v_prediction: bool,
                   noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                   weight_map: torch.Tensor | None = None, rows: tuple[slice, int] | None = None) -> torch.Tensor:
    """Per-sample denoising loss (B,) of scaled latents ``z`` (DDPM, Ho et al. 2020);
    ``weight_map`` (B, 1, h, w) makes it a weighted mean over latent pixels (masked loss).
    ``rows`` = (this process's rows, the whole batch size): ``z`` holds only those rows, and the
    noise and timesteps are drawn for the whole batch and cut the same way."""
    dev = z.device
    part, total = rows if rows is not None else (slice(None), z.shape[0])
    shape = (total, *z.shape[1:])
    noise = torch.randn(shape, generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(total, z.shape[1], 1, 1, generator=g)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (total,), generator=g)
    noise, t = noise[part].to(dev), t[part].to(dev)
    x_t = noise_sched.add_noise(z, noise, t)  # sqrt(a) z + sqrt(1 - a) eps
    target = noise_sched.get_velocity(z, noise, t) if v_prediction else noise
    pred = unet(x_t, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    err = F.mse_loss(pred.float(), target.float(), reduction="none")  # (B, C, h, w)
    if weight_map is not None:
        w = weight_map.to(err)
        loss = (err * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * err.shape[1])
    else:
        loss = err.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * snr_weights(noise_sched.alphas_cumprod, t, min_snr_gamma, v_prediction)
    return loss


# ---------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------
@dataclass
class Trainable:
    """The parameter groups of one method and the modules in train mode."""

    groups: list[dict]
    modules: list[torch.nn.Module] = field(default_factory=list)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _gen(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63))


def _scheduler(opt, cfg):
    warm = max(1, cfg.warmup_steps)

    def factor(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / warm
        frac = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1 - frac)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def out_of_memory(step: int, cfg, run_dir: Path):
    """The one-line error for a step that did not fit (the run's files stay as they were: outputs
    are written only at the end, a checkpoint only once complete)."""
    ckpt = latest_checkpoint(run_dir)
    where = f"the newest checkpoint ({ckpt.name}) is kept and the same command resumes from it" if ckpt else \
        "no checkpoint was written yet"
    return OutOfMemory(f"out of memory at step {step} (train.batch_size = {cfg.batch_size}); lower train.batch_size "
                       "(raise train.grad_accum to keep the effective batch), set train.gradient_checkpointing = true "
                       f"or train.mixed_precision = \"bf16\" / \"fp16\" on a GPU; nothing was written half, {where}")


@dataclass
class RunState:
    step: int = 0
    loss: float | None = None
    seconds: float = 0.0
    steps_per_s: float = 0.0
    main: bool = True  # False in the other processes of a multi-process run: they write no files


def run_loop(comps, data: TrainData, trainable: Trainable, cfg, out_cfg, run_dir: Path, *, v_prediction: bool,
             log: Log, resume: bool, prior: TrainData | None = None, prior_weight: float = 1.0,
             caption_cfg=None, after_step: Callable[[], None] | None = None,
             on_sample: Callable[[int], None] | None = None,
             on_step: Callable[[int, int, float], None] | None = None,
             loss_fn: Callable[..., torch.Tensor] | None = None,
             regulariser: Callable[..., torch.Tensor] | None = None) -> RunState:
    """Optimise ``trainable`` on ``data`` (and the prior-preservation ``prior``) for ``cfg.steps``.

    Args:
        cfg: an ``OptimConfig``; out_cfg: an ``OutputConfig``; caption_cfg: the data config
            (caption dropout, tag shuffling).
        after_step: called after each optimiser step (textual inversion restores frozen rows).
        on_sample: called with the step number every ``out_cfg.sample_every`` steps and at the end.
        on_step: called with (step, total, loss) after each optimiser step (the server's train jobs);
            an exception it raises ends the run there.
        loss_fn: the objective, ``loss_fn(comps, noise_sched, z, ctx, added, g, weight_map, rows)`` ->
            per-sample losses; default the denoising loss (``diffusion_loss`` with ``cfg``'s
            noise offset and min-SNR-gamma); distillation brings its own (``training.distill``).
        regulariser: ``regulariser(comps, rng, device)`` is added to each step's loss (the
            training comps, the step's random source; e.g. ``conditioning.TextPreservation``).
    """
    from diffusers import DDPMScheduler

    accelerator = new_accelerator(cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    dev = accelerator.device
    rows = (my_rows(accelerator, cfg.batch_size), cfg.batch_size)
    main = accelerator.is_main_process
    if not main:
        log = quiet
    for m in comps.modules().values():
        m.to(dev)
    if cfg.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(trainable.groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg)
    # the modules that train go through accelerate (DDP under `accelerate launch`); the loss
    # runs on a shallow copy of comps that holds the prepared ones
    prepared = accelerator.prepare(*trainable.modules, opt, sched)
    if not isinstance(prepared, (list, tuple)):
        prepared = [prepared]
    *wrapped, opt, sched = prepared
    train_comps = copy.copy(comps)
    for name, m in comps.modules().items():
        for orig, w in zip(trainable.modules, wrapped):
            if m is orig:
                setattr(train_comps, name, w)
    noise_sched = DDPMScheduler.from_config(comps.scheduler_config)
    scaling = comps.vae.config.scaling_factor
    if loss_fn is None:
        def loss_fn(c, ns, z, ctx, added, g, weight_map, rows):
            return diffusion_loss(c.unet, ns, z, ctx, added, g, v_prediction=v_prediction, noise_offset=cfg.noise_offset,
                                  min_snr_gamma=cfg.min_snr_gamma, weight_map=weight_map, rows=rows)
    state = RunState()
    def load_trainable(ckpt: Path) -> None:  # the trained tensors (adapters, embedding rows) themselves
        saved = torch.load(ckpt / "trainable.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for p, v in zip(trainable.params, saved):
                p.copy_(v)

    if resume:
        state.step = resume_step(accelerator, run_dir, log, before_load=load_trainable)
    for m in trainable.modules:
        m.train()
    progress = _Progress(cfg.steps, state.step, log, out_cfg.log_every)
    t0, avg = time.perf_counter(), None
    for step in range(state.step, cfg.steps):
        rng = random.Random(f"{cfg.seed}:{step}")
        g = _gen(cfg.seed, step)
        try:
            with accelerator.accumulate(*wrapped):
                loss = _batch_loss(train_comps, data, rng, g, cfg, caption_cfg, noise_sched, scaling, dev, rows, loss_fn)
                if prior is not None:
                    loss = loss + prior_weight * _batch_loss(train_comps, prior, rng, g, cfg, None, noise_sched,
                                                             scaling, dev, rows, loss_fn)
                if regulariser is not None:
                    loss = loss + regulariser(train_comps, rng, dev)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable.params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            progress.close()
            raise out_of_memory(step + 1, cfg, run_dir) from None
        if after_step is not None:
            after_step()
        value = float(mean_over_processes(accelerator, loss.detach()))  # the whole batch's loss
        avg = value if avg is None else 0.95 * avg + 0.05 * value
        done = step + 1
        state.step, state.loss = done, avg
        progress.update(done, avg)
        if on_step is not None:
            on_step(done, cfg.steps, value)
        if done % out_cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(accelerator, run_dir, done,
                            extra=lambda ckpt: torch.save([p.detach().cpu() for p in trainable.params],
                                                          ckpt / "trainable.pt"))
            if main:
                write_json_line(run_dir / "log.jsonl", {"step": done, "loss": avg})
        if main and on_sample is not None and (done % out_cfg.sample_every == 0 or done == cfg.steps):
            for m in trainable.modules:
                m.eval()
            on_sample(done)
            for m in trainable.modules:
                m.train()
    progress.close()
    for m in trainable.modules:
        m.eval()
    if cfg.gradient_checkpointing:
        comps.unet.disable_gradient_checkpointing()
    state.seconds = time.perf_counter() - t0
    ran = state.step - progress.start
    state.steps_per_s = ran / state.seconds if state.seconds > 0 and ran else 0.0
    state.main = main
    accelerator.wait_for_everyone()
    return state


def _batch_loss(comps, data: TrainData, rng, g, cfg, caption_cfg, noise_sched, scaling, dev,
                rows: tuple[slice, int], loss_fn) -> torch.Tensor:
    """The loss of this process's rows of the step's batch (all of it with one process)."""
    part, _ = rows
    bucket, idx = data.draw(rng, cfg.batch_size)
    mean, std = bucket.mean[idx], bucket.std[idx]
    z = (mean + std * torch.randn(mean.shape, generator=g))[part].to(dev) * scaling  # posterior samples, (b, 4, h, w)
    texts = []
    for i in idx:
        text = rng.choice(bucket.captions[i])
        if caption_cfg is not None:
            text = process_caption(text, rng, dropout=caption_cfg.caption_dropout, shuffle=caption_cfg.shuffle_tags,
                                   keep=caption_cfg.keep_tokens)
        texts.append(text)
    ctx, added = text_conditioning(comps, texts[part], bucket.size, dev)
    weight_map = None
    if caption_cfg is not None and caption_cfg.object_weight and bucket.masks is not None:
        weight_map = (1 + caption_cfg.object_weight * bucket.masks[idx][part]).to(dev)
    return loss_fn(comps, noise_sched, z, ctx, added, g, weight_map, rows).mean()


class _Progress:
    """A rich progress bar with loss and it/s on a terminal; a log line every N steps otherwise."""

    def __init__(self, total: int, start: int, log: Log, every: int):
        self.total, self.start, self.log, self.every = total, start, log, every
        self.t0 = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
                                TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", rate="-")
            self.bar.start()

    def update(self, done: int, loss: float) -> None:
        rate = (done - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=f"{loss:.4f}", rate=f"{rate:.2f}")
        elif done % self.every == 0 or done == self.total:
            self.log(f"step {done}/{self.total} loss {loss:.4f} {rate:.2f} it/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

