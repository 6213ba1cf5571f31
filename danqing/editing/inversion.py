"""Null-text inversion (Mokady et al. 2022): a real picture -> noise + per-step null embeddings
that the DDIM sampler, with guidance, turns back into the picture. Prompt-to-Prompt can then
edit the picture as if it had been generated.

1. DDIM inversion: the picture's latents are run "up" the DDIM schedule with the caption and no
   guidance (x_{t_prev} -> x_t with the noise predicted at x_{t_prev}). With guidance, sampling
   back down drifts away from this trajectory.
2. Null-text optimisation: going down, at every step the unconditional ("null") embedding is
   optimised so that the guided DDIM step lands on the inversion trajectory's next point; the
   optimised embedding of each step is kept and used in its place when sampling.

The DDIM step is written out (``ddim_move``) because inversion needs it run backwards and
optimisation needs it differentiable; it is the same arithmetic as diffusers' ``DDIMScheduler``
with eta 0, which the reconstruction then uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from danqing.editing.img2img import to_tensor
from danqing.sampling.samplers import make_scheduler


@dataclass
class NullTextInversion:
    """Attributes:
        latents: x_T, (1, 4, h, w): the noise that sampling starts from.
        uncond: one optimised null embedding per sampler step, (1, 77, D) each.
        trajectory: the DDIM inversion's latents, x_T first and the picture's latents last.
        losses: the last optimisation loss of each step.
    """

    latents: torch.Tensor
    uncond: list[torch.Tensor]
    trajectory: list[torch.Tensor]
    losses: list[float] = field(default_factory=list)


def ddim_move(x: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move of ``x`` from noise level ``alpha_from`` to ``alpha_to``
    (cumulative alphas): predict x0 with ``eps``, then re-noise it with the same ``eps``."""
    x0 = (x - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps


def ddim_alphas(scheduler, steps: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The DDIM sampler's timesteps and, per step, (alpha_t, alpha_prev) as ``DDIMScheduler.step``."""
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    pairs = []
    for t in scheduler.timesteps:
        prev = int(t) - stride
        a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        pairs.append((scheduler.alphas_cumprod[int(t)], a_prev))
    return scheduler.timesteps, pairs


@torch.no_grad()
def encode_mean(vae, picture: Image.Image) -> torch.Tensor:
    """A picture's latents (the posterior mean, scaled): inversion wants no sampling noise."""
    z = vae.encode(to_tensor(picture).to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    if getattr(vae.config, "shift_factor", None):
        z = z - vae.config.shift_factor
    return z * vae.config.scaling_factor


def _eps(unet, x, t, context, dtype):
    return unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False)[0].float()


def null_text_inversion(comps, picture: Image.Image, cond: torch.Tensor, uncond: torch.Tensor, *, steps: int,
                        cfg_scale: float, iterations: int = 10, device, dtype, lr: float = 1e-2,
                        tolerance: float = 1e-5) -> NullTextInversion:
    """Invert ``picture`` (already the request's size) with the caption embedding ``cond``.

    Args:
        cond, uncond: (1, 77, D) caption and negative-prompt hidden states; ``uncond`` is where
            the optimisation starts.
        iterations: Adam steps per sampler step (the paper: 10); 0 = plain DDIM inversion.
        lr, tolerance: the paper's learning rate (decayed linearly to half over the run) and
            early-stop loss (tolerance + step * 2 * tolerance).
    """
    unet = comps.unet
    sched = make_scheduler(comps.scheduler_config, "DDIM", "Automatic")
    timesteps, alphas = ddim_alphas(sched, steps)
    alphas = [(a.to(device), p.to(device)) for a, p in alphas]
    cond = cond.to(device)
    use_cfg = cfg_scale > 1.0

    # 1. DDIM inversion: from the picture's latents up to x_T, no guidance.
    x = encode_mean(comps.vae, picture).float().to(device)
    trajectory = [x]
    with torch.no_grad():
        for i in reversed(range(len(timesteps))):
            a_t, a_prev = alphas[i]
            eps = _eps(unet, x, timesteps[i], cond, dtype)
            x = ddim_move(x, eps, a_prev, a_t)
            trajectory.append(x)
    trajectory.reverse()  # trajectory[i] is the input of sampler step i; [-1] the picture

    # 2. null-text optimisation, step by step down the schedule.
    u = uncond.detach().float().to(device)
    nulls, losses = [], []
    x = trajectory[0]
    for i, t in enumerate(timesteps):
        a_t, a_prev = alphas[i]
        with torch.no_grad():
            eps_c = _eps(unet, x, t, cond, dtype)
        loss_value = 0.0
        if use_cfg and iterations:
            u = u.detach().clone().requires_grad_(True)  # a copy: Adam updates in place
            opt = torch.optim.Adam([u], lr=lr * (1.0 - i / (2 * len(timesteps))))
            target = trajectory[i + 1]
            for _ in range(iterations):
                eps_u = _eps(unet, x, t, u, dtype)
                step = ddim_move(x, eps_u + cfg_scale * (eps_c - eps_u), a_t, a_prev)
                loss = F.mse_loss(step, target)
                opt.zero_grad(set_to_none=True)
                loss.backward(inputs=[u])
                opt.step()
                loss_value = float(loss.detach())
                if loss_value < tolerance + i * 2 * tolerance:
                    break
            u = u.detach()
        nulls.append(u.to(dtype))
        losses.append(loss_value)
        with torch.no_grad():
            eps_u = _eps(unet, x, t, u, dtype) if use_cfg else eps_c
            x = ddim_move(x, eps_u + cfg_scale * (eps_c - eps_u) if use_cfg else eps_c, a_t, a_prev)
    return NullTextInversion(trajectory[0], nulls, trajectory, losses)


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB of two same-size RGB pictures (8-bit peak)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
