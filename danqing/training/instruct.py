"""Train an instruct-pix2pix model (Brooks et al. 2023) from a text-to-image model, on synthetic
edit pairs (``danqing.synthetic.edits``).

The UNet gets 4 more input channels for the picture being edited (its VAE mode, not scaled, as
diffusers and A1111 feed it); their weights start at zero, so at step 0 the model is exactly
the text-to-image model. The text encoder and VAE stay frozen: instructions are encoded once.
Conditioning dropout (5% no instruction, 5% no picture, 5% neither) teaches the unconditional
branches that three-branch guidance needs.

    danqing train instruct --config configs/train/danqing-tiny-instruct.toml
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from danqing.editing.img2img import run_img2img
from danqing.request import GenerationRequest
from danqing.synthetic.edits import edit_pairs, heldout_edits, judge_edit
from danqing.synthetic.render import render
from danqing.training.base import _gen, encode_all, export_model, new_accelerator
from danqing.training.conditioning import encode_texts
from danqing.training.config import InstructTrainConfig
from danqing.training.data import render_batch
from danqing.training.runs import (StepLog, ema_weights, load_float32, my_rows, optimiser_step, resume_step,
                                   start_run)

Log = Callable[[str], None]


def widen_conv_in(unet, channels: int = 8):
    """A copy of ``unet`` taking ``channels`` input channels; the new ones start at zero."""
    from diffusers import UNet2DConditionModel

    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": channels})
    state = unet.state_dict()
    w = state["conv_in.weight"]
    extra = torch.zeros(w.shape[0], channels - w.shape[1], *w.shape[2:], dtype=w.dtype)
    state["conv_in.weight"] = torch.cat([w, extra], dim=1)
    wide.load_state_dict(state)
    return wide.to(dtype=unet.dtype)


def judge_model(comps, pairs, *, steps: int = 20, cfg_scale: float = 7.0, image_cfg_scale: float = 1.5,
                seed: int = 0, device="cpu") -> dict:
    """Run each held-out edit on its rendered ``before`` picture and judge it."""
    results = []
    for i, pair in enumerate(pairs):
        before = render(pair.before)
        req = GenerationRequest(prompt=pair.instruction, init_image="synthetic", denoising_strength=1.0,
                                steps=steps, cfg_scale=cfg_scale, image_cfg_scale=image_cfg_scale, seed=seed + i,
                                subseed=0, width=before.width, height=before.height, sampler="DPM++ 2M")
        out = run_img2img(comps, req, before, None, device=torch.device(device), dtype=comps.unet.dtype)
        results.append({"kind": pair.kind, **judge_edit(pair, before, out.images[0])})
    summary = {key: round(sum(r[key] for r in results) / max(1, len(results)), 4) for key in ("ok", "done", "kept")}
    for kind in ("recolour", "add", "remove"):
        rows = [r for r in results if r["kind"] == kind]
        if rows:
            summary[f"ok_{kind}"] = round(sum(r["ok"] for r in rows) / len(rows), 4)
    summary["n"] = len(results)
    return summary


@dataclass
class EditData:
    """The edit pairs, encoded once: ``before`` as its VAE mode (unscaled, as diffusers and A1111
    feed the picture being edited), ``after`` as posterior mean and std, instructions as hidden
    states (the last row is the empty instruction)."""

    before_mode: torch.Tensor  # (N, 4, h, w)
    after_mean: torch.Tensor  # (N, 4, h, w)
    after_std: torch.Tensor  # (N, 4, h, w)
    hidden: torch.Tensor  # (T + 1, 77, D)
    text_idx: torch.Tensor  # (N,) row of each pair's instruction in ``hidden``


def edit_data(comps, data_cfg, log: Log) -> EditData:
    """Render and encode ``data_cfg.n_pairs`` synthetic edit pairs and their instructions."""
    t = time.perf_counter()
    pairs = edit_pairs(data_cfg.seed, data_cfg.n_pairs, tuple(data_cfg.langs))
    before_px = render_batch([p.before for p in pairs], data_cfg.size)
    after_px = render_batch([p.after for p in pairs], data_cfg.size)
    before_mode, _ = encode_all(comps.vae, before_px, "cpu")
    after_mean, after_std = encode_all(comps.vae, after_px, "cpu")
    texts = sorted({p.instruction for p in pairs})
    index = {text: i for i, text in enumerate(texts)}
    hidden = encode_texts(comps, texts + [""])
    text_idx = torch.tensor([index[p.instruction] for p in pairs])
    log(f"data: {len(pairs)} edit pairs rendered and encoded, {len(texts)} distinct instructions "
        f"({time.perf_counter() - t:.0f} s)")
    return EditData(before_mode, after_mean, after_std, hidden, text_idx)


def edit_loss(unet, data: EditData, g: torch.Generator, batch_size: int, noise_sched, scaling: float, drops,
              device, rows: slice = slice(None)) -> torch.Tensor:
    """The denoising loss of one batch of edits, with conditioning dropout: ``drops`` =
    (no instruction, no picture, neither) probabilities; all draws from ``g``, for the whole
    batch, of which ``rows`` (this process's, ``runs.my_rows``) go through the UNet."""
    p_text, p_image, p_both = drops
    idx = torch.randint(len(data.text_idx), (batch_size,), generator=g)
    z = (data.after_mean[idx] + data.after_std[idx] * torch.randn(data.after_mean[idx].shape, generator=g)) * scaling
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g)
    x_t = noise_sched.add_noise(z, noise, t)
    u = torch.rand(batch_size, generator=g)
    no_text = (u < p_text) | ((u >= p_text + p_image) & (u < p_text + p_image + p_both))
    no_image = (u >= p_text) & (u < p_text + p_image + p_both)
    context = torch.where(no_text[:, None, None], data.hidden[-1][None], data.hidden[data.text_idx[idx]])
    picture = data.before_mode[idx] * (~no_image).float()[:, None, None, None]
    x_in, t, context, noise = (v[rows].to(device) for v in (torch.cat([x_t, picture], dim=1), t, context, noise))
    pred = unet(x_in, t, context).sample
    return F.mse_loss(pred.float(), noise)


def train_instruct(cfg: InstructTrainConfig, *, resume: bool = False, log: Log = print) -> dict:
    """Train and export ``run.output_dir/model`` (diffusers folder) and ``summary.json``.

    ``resume``: continue from the newest checkpoint under ``run.output_dir/checkpoints``
    (written every ``run.checkpoint_every`` steps and at the end); the result is bit-identical
    to an uninterrupted run. Without it, earlier checkpoints of the folder are removed.
    """
    from diffusers import DDPMScheduler  # diffusers' training parts load only when a run starts
    from diffusers.training_utils import EMAModel

    c, r = cfg.unet, cfg.run
    run_dir = start_run(r.output_dir, resume=resume, num_threads=r.num_threads)
    t_start = time.perf_counter()

    # 1. the model to start from, in float32
    comps, _, _ = load_float32(cfg.instruct.init_from, frozen=False)
    # an instruct model already (a run continued from an earlier one's export) is trained as it is
    unet = comps.unet if comps.unet.config.in_channels == 8 else widen_conv_in(comps.unet)

    # 2. data: render, encode, and encode every distinct instruction once
    data = edit_data(comps, cfg.data, log)

    # 3. train
    acc = new_accelerator(r.mixed_precision)
    unet.train()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)))
    unet, opt, sched = acc.prepare(unet, opt, sched)
    ema = EMAModel(params, decay=c.ema_decay, foreach=True)
    acc.register_for_checkpointing(ema)
    start = resume_step(acc, run_dir, log) if resume else 0
    noise_sched = DDPMScheduler.from_config(comps.scheduler_config)
    scaling = comps.vae.config.scaling_factor
    heldout = heldout_edits(cfg.instruct.eval_pairs) if cfg.instruct.eval_pairs else []
    drops = (cfg.instruct.drop_text, cfg.instruct.drop_image, cfg.instruct.drop_both)
    steps = StepLog("instruct", c.steps, start, log, run_dir, r, acc)
    rows = my_rows(acc, c.batch_size)
    for step in range(start, c.steps):
        g = _gen(r.seed, step, "instruct")
        with acc.autocast():
            loss = edit_loss(unet, data, g, c.batch_size, noise_sched, scaling, drops, acc.device, rows)
        optimiser_step(acc, loss, params, opt, sched, c.max_grad_norm, ema)
        final = steps.done(step + 1, loss)
        if steps.main and heldout and ((step + 1) % r.eval_every == 0 or final):
            with ema_weights(ema, params, unet):
                res = judge_model(dataclasses.replace(comps, unet=acc.unwrap_model(unet)), heldout,
                                  steps=r.eval_steps, device=acc.device)
            log(f"eval step {step + 1}: {res}")
            steps.evaluated(step + 1, res, res)
        if steps.stopping():
            break

    # 4. export the EMA weights
    ema.copy_to(params)
    comps = dataclasses.replace(comps, unet=acc.unwrap_model(unet).eval().to("cpu"))
    summary = {"kind": "instruct-pix2pix", "init_from": cfg.instruct.init_from, "pairs": len(data.text_idx),
               "instructions": data.hidden.shape[0] - 1, "steps": steps.last["step"], "batch_size": c.batch_size,
               "loss": steps.last["loss"], "eval": steps.last["eval"],
               "minutes": round((time.perf_counter() - t_start) / 60, 1), "config": json.loads(cfg.model_dump_json())}
    acc.wait_for_everyone()
    if steps.main:  # the main process writes
        export_model(comps, run_dir, name="model")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
