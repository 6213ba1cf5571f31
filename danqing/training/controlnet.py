"""Train a ControlNet (Zhang, Rao & Agrawala 2023) for a base model on (picture, condition,
caption) triples -- by default danqing's synthetic shapes, with Canny or line-art maps.

The ControlNet is diffusers' ``ControlNetModel.from_unet``: a trainable copy of the base UNet's
encoder and middle block, its 12+1 outputs joined to the frozen UNet through zero-initialised
1x1 convolutions ("zero convolutions"), so at step 0 the model is exactly the base model. The
condition enters through a small conv encoder (the hint block) down to the latent size. As in
the paper, 50% of the captions are replaced by the empty prompt so the ControlNet learns to read
the map on its own. The base model (UNet, VAE, text encoder) stays frozen; latents and caption
embeddings are computed once. accelerate places the model and optimiser (and mixed precision).

    danqing train controlnet --config configs/train/danqing-tiny-canny.toml
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from danqing.conditioning.control import ControlDenoise, PreparedControl, image_tensor
from danqing.decode import decode_latents, to_pil
from danqing.preprocess import run_preprocessor
from danqing.preprocess.metrics import edge_f1
from danqing.request import GenerationRequest
from danqing.studio import run_sampling
from danqing.synthetic.captions import caption
from danqing.synthetic.portraits_mouth import mouth_box_mask, mouth_height, talking_examples
from danqing.synthetic.render import degrade, render
from danqing.synthetic.scenes import eval_scenes
from danqing.training.base import _gen, encode_all, new_accelerator
from danqing.training.conditioning import encode_texts
from danqing.training.config import ControlTrainConfig
from danqing.training.data import synthetic_dataset
from danqing.training.runs import (StepLog, ema_weights, load_float32, my_rows, optimiser_step, resume_step,
                                   start_run)

Log = Callable[[str], None]


def hint_channels(vae) -> tuple[int, ...]:
    """Channels of the hint encoder for a VAE of downscale factor 2**k: k + 1 levels (k stride-2
    convolutions), 16, 32, 64, ... (SD's VAE, k = 3: diffusers' (16, 32, 96, 256) is the default)."""
    k = len(vae.config.block_out_channels) - 1
    return tuple(16 * 2 ** i for i in range(k + 1))


def make_condition(kind: str, image):
    """The control map of a rendered picture: "canny" (OpenCV 100/200) or "lineart" (XDoG), RGB."""
    return run_preprocessor(kind, image, resolution=min(image.size))


def structure_map(kind: str, image) -> np.ndarray:
    """The (H, W) uint8 structure a condition of ``kind`` asks for, read off any picture: its
    Canny edges, or its thresholded line art."""
    return np.asarray(make_condition(kind, image))[..., 0]


def new_controlnet(unet, vae):
    """The paper's initialisation: the UNet's encoder copied, zero convolutions at zero."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels(vae))


@torch.no_grad()
def generate_controlled(comps, controlnet, prompts: list[str], maps: list, weight: float, *, steps: int = 20,
                        cfg_scale: float = 7.0, seed: int = 0, size: int = 64, sampler: str = "DPM++ 2M",
                        mode: str = "Balanced", device="cpu"):
    """One picture per (prompt, map) through our loop with one ControlNet unit at ``weight``."""
    images = []
    for i, (prompt, cmap) in enumerate(zip(prompts, maps)):
        req = GenerationRequest(prompt=prompt, steps=steps, cfg_scale=cfg_scale, seed=seed + i, subseed=0,
                                width=size, height=size, sampler=sampler)
        unit = PreparedControl(controlnet, "controlnet", image_tensor(cmap.resize((size, size))), weight, mode=mode)
        lat, _, _, _ = run_sampling(comps, req, device=torch.device(device), dtype=comps.unet.dtype,
                                    control=ControlDenoise([unit]) if weight > 0 else None)
        images += to_pil(decode_latents(comps.vae, lat[0]))
    return images


def control_scores(comps, controlnet, scenes, *, kind: str, weights=(0.0, 1.0), steps: int = 20,
                   cfg_scale: float = 7.0, seed: int = 0, size: int = 64, lang: str = "en") -> dict:
    """Mean edge F1 (``preprocess.metrics.edge_f1``, 1-pixel tolerance) between each held-out
    scene's control map and the same structure read off the picture generated from it, per
    ControlNet weight. Weight 0 is the base model alone (same seeds and prompts)."""
    pictures = [render(s, size) for s in scenes]
    maps = [make_condition(kind, p) for p in pictures]
    targets = [np.asarray(m)[..., 0] for m in maps]
    prompts = [caption(s, lang) for s in scenes]
    out = {}
    for w in weights:
        images = generate_controlled(comps, controlnet, prompts, maps, w, steps=steps, cfg_scale=cfg_scale,
                                     seed=seed, size=size)
        f1 = [edge_f1(structure_map(kind, im), t)["f1"] for im, t in zip(images, targets)]
        out[f"{w:g}"] = round(float(np.mean(f1)), 4)
    return out


def mouth_scores(comps, controlnet, n: int, *, weights=(0.0, 1.0), steps: int = 20, cfg_scale: float = 7.0,
                 seed: int = 0, size: int = 64) -> dict:
    """Pearson r, per ControlNet weight, between the mouth height the portrait reader reads off
    each of ``n`` held-out people's talking frames (the renderer's) and off the picture generated
    from that frame's mouth map and caption. Weight 0 is the base model alone."""
    frames, maps, caps = talking_examples(n, size, seed=seed, captions_per_image=1, split="heldout", closed_share=0.0)
    target = [mouth_height(f) for f in frames]
    out = {}
    for w in weights:
        images = generate_controlled(comps, controlnet, [c[0] for c in caps], maps, w, steps=steps,
                                     cfg_scale=cfg_scale, seed=seed, size=size)
        got = [mouth_height(im) for im in images]
        out[f"{w:g}"] = round(float(np.corrcoef(target, got)[0, 1]), 4) if np.std(got) > 0 else 0.0
    return out


def export_controlnet(controlnet, out: Path, *, dtype=torch.float16) -> Path:
    """``out`` as a diffusers ControlNet folder (config.json + safetensors) in ``dtype``."""
    import copy
    import shutil

    if out.exists():
        shutil.rmtree(out)
    copy.deepcopy(controlnet).to(dtype).save_pretrained(out, safe_serialization=True)
    return out


@dataclass
class ControlData:
    """The training triples, encoded once: latents (posterior mean, std), condition maps and
    caption hidden states (the last row is the empty prompt)."""

    mean: torch.Tensor  # (N, 4, h, w)
    std: torch.Tensor  # (N, 4, h, w)
    maps: torch.Tensor  # (N, 3, H, W) in [0, 1], fp16
    hidden: torch.Tensor  # (T + 1, 77, D)
    cap_idx: list[list[int]]  # each picture's captions as rows of ``hidden``
    weight: torch.Tensor | None = None  # (1, 1, h, w) loss weight per latent pixel; None: plain MSE


def _shapes_triples(d) -> tuple[torch.Tensor, list[torch.Tensor], list[list[str]]]:
    """Synthetic shapes scenes with their ``d.condition`` maps (half of them from a slightly
    degraded copy when ``d.degrade``)."""
    data = synthetic_dataset(d.n_images, d.size, d.seed, d.captions_per_image)
    rng = random.Random(f"controlnet:{d.seed}")
    maps = []
    for i in range(len(data)):
        pic = Image.fromarray(data.images[i].permute(1, 2, 0).numpy())
        if d.degrade and i % 2:  # half the maps from a slightly blurred/noisy copy: generated pictures are not crisp
            pic = degrade(pic, rng)
        maps.append(image_tensor(make_condition(d.condition, pic))[0].to(torch.float16))
    return data.images, maps, data.captions


def _mouth_triples(d) -> tuple[torch.Tensor, list[torch.Tensor], list[list[str]]]:
    """The portrait world's talking frames with their mouth-shape maps."""
    frames, maps, caps = talking_examples(d.n_images, d.size, d.seed, d.captions_per_image)
    images = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in frames])
    return images, [image_tensor(m)[0].to(torch.float16) for m in maps], caps


def control_data(comps, d, log: Log) -> ControlData:
    """Render ``d.n_images`` training pictures with their ``d.condition`` maps and encode pictures
    and captions; for "mouth", the loss weight ``1 + d.mouth_weight`` inside the mouth box."""
    t = time.perf_counter()
    images, maps, captions = (_mouth_triples if d.condition == "mouth" else _shapes_triples)(d)
    mean, std = encode_all(comps.vae, images, "cpu")
    texts = sorted({t for caps in captions for t in caps})
    index = {text: i for i, text in enumerate(texts)}
    hidden = encode_texts(comps, texts + [""])  # (N, 77, D): the first 77-token chunk
    weight = None
    if d.condition == "mouth" and d.mouth_weight > 0:
        box = torch.from_numpy(np.asarray(mouth_box_mask(mean.shape[-1])) > 0).float()
        weight = (1 + d.mouth_weight * box)[None, None]
    log(f"data: {len(images)} pictures with {d.condition} maps, {len(texts)} distinct captions "
        f"({time.perf_counter() - t:.0f} s)")
    return ControlData(mean, std, torch.stack(maps), hidden, [[index[t] for t in caps] for caps in captions], weight)


def control_loss(controlnet, unet, data: ControlData, g: torch.Generator, batch_size: int, captions_per_image: int,
                 drop_prompt: float, noise_sched, scaling: float, acc) -> torch.Tensor:
    """The denoising loss of one batch through the ControlNet and the frozen UNet (a share
    ``drop_prompt`` of the captions replaced by the empty prompt); all draws from ``g``, for the
    whole batch, of which this process keeps its rows (``runs.my_rows``)."""
    idx = torch.randint(len(data.cap_idx), (batch_size,), generator=g)
    z = (data.mean[idx] + data.std[idx] * torch.randn(data.mean[idx].shape, generator=g)) * scaling
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g)
    x_t = noise_sched.add_noise(z, noise, t)
    pick = torch.randint(captions_per_image, (batch_size,), generator=g)
    drop = torch.rand(batch_size, generator=g) < drop_prompt
    empty = data.hidden[-1]
    ctx = torch.stack([empty if drop[k] else data.hidden[data.cap_idx[int(i)][int(pick[k])]] for k, i in enumerate(idx)])
    hint = data.maps[idx].float()
    part = my_rows(acc, batch_size)
    x_t, t, ctx, hint, noise = (v[part].to(acc.device) for v in (x_t, t, ctx, hint, noise))
    with acc.autocast():
        down, mid = controlnet(x_t, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        pred = unet(x_t, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        if data.weight is None:
            return F.mse_loss(pred.float(), noise)
        return ((pred.float() - noise) ** 2 * data.weight.to(acc.device)).mean()


def train_controlnet(cfg: ControlTrainConfig, *, resume: bool = False, log: Log = print) -> dict:
    """Train and export ``run.output_dir/controlnet`` (diffusers folder, fp16) and ``summary.json``.

    ``resume``: continue from the newest checkpoint under ``run.output_dir/checkpoints``
    (written every ``run.checkpoint_every`` steps and at the end); the result is bit-identical
    to an uninterrupted run. Without it, earlier checkpoints of the folder are removed.
    """
    from diffusers import ControlNetModel, DDPMScheduler  # diffusers' training parts load only when a run starts
    from diffusers.training_utils import EMAModel

    c, r, d = cfg.unet, cfg.run, cfg.data
    run_dir = start_run(r.output_dir, resume=resume, num_threads=r.num_threads)
    t_start = time.perf_counter()

    # 1. the frozen base model, float32
    comps, _, _ = load_float32(cfg.controlnet.init_from)
    torch.manual_seed(r.seed)
    if cfg.controlnet.init_controlnet:
        controlnet = ControlNetModel.from_pretrained(cfg.controlnet.init_controlnet, local_files_only=True).float()
    else:
        controlnet = new_controlnet(comps.unet, comps.vae)

    # 2. data: pictures -> latents, maps, caption embeddings (each distinct caption once)
    data = control_data(comps, d, log)

    # 3. train the ControlNet through the frozen UNet
    acc = new_accelerator(r.mixed_precision)
    controlnet.train()
    params = [p for p in controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)))
    controlnet, opt, sched = acc.prepare(controlnet, opt, sched)
    unet = comps.unet.to(acc.device)
    ema = EMAModel(params, decay=c.ema_decay, foreach=True)  # every ControlNet parameter trains
    acc.register_for_checkpointing(ema)
    start = resume_step(acc, run_dir, log) if resume else 0
    noise_sched = DDPMScheduler.from_config(comps.scheduler_config)
    scaling = comps.vae.config.scaling_factor
    mouth = d.condition == "mouth"
    heldout = eval_scenes(cfg.controlnet.eval_maps) if cfg.controlnet.eval_maps and not mouth else []
    steps = StepLog("controlnet", c.steps, start, log, run_dir, r, acc)
    model = acc.unwrap_model(controlnet)
    for step in range(start, c.steps):
        g = _gen(r.seed, step, "controlnet")
        loss = control_loss(controlnet, unet, data, g, c.batch_size, d.captions_per_image, cfg.controlnet.drop_prompt,
                            noise_sched, scaling, acc)
        optimiser_step(acc, loss, params, opt, sched, c.max_grad_norm, ema)
        final = steps.done(step + 1, loss)
        if steps.main and (heldout or mouth and cfg.controlnet.eval_maps) and ((step + 1) % r.eval_every == 0 or final):
            with ema_weights(ema, params, model):
                if mouth:
                    res = mouth_scores(comps, model, cfg.controlnet.eval_maps, steps=r.eval_steps)
                else:
                    res = control_scores(comps, model, heldout, kind=d.condition, steps=r.eval_steps)
            log(f"eval step {step + 1}: {'mouth height r' if mouth else 'edge F1'} by weight {res}")
            steps.evaluated(step + 1, res, {"mouth_r" if mouth else "f1": res})
        if steps.stopping():
            break

    # 4. export the EMA weights (the main process writes)
    ema.copy_to(params)
    model.eval()
    acc.wait_for_everyone()
    summary = {"kind": "controlnet", "condition": d.condition, "init_from": cfg.controlnet.init_from,
               "images": len(data.cap_idx), "steps": steps.last["step"], "batch_size": c.batch_size,
               "loss": steps.last["loss"], "eval_f1": steps.last["eval"],
               "minutes": round((time.perf_counter() - t_start) / 60, 1), "config": json.loads(cfg.model_dump_json())}
    if steps.main:
        export_controlnet(model, run_dir / "controlnet")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
