"""Flow-matching models in our loop: SD3 / SD3.5 (MMDiT) and FLUX.1.

A rectified-flow model predicts the velocity v = noise - x0 of x_sigma = (1 - sigma) x0 +
sigma * noise (Esser et al. 2024, "Scaling Rectified Flow Transformers"; Lipman et al. 2023);
the Euler step is x <- x + (sigma_next - sigma) v (diffusers' ``FlowMatchEulerDiscreteScheduler``).
The schedule is shifted towards the noise end, sigma' = s sigma / (1 + (s - 1) sigma): SD3 with a
static ``shift`` (3.0), FLUX.1 dev with a resolution-dependent one, s = exp(mu) where mu grows
linearly with the number of image tokens (``calculate_shift``, as diffusers' pipelines compute it).

The loop (``loop.sample``) stays one loop: these functions are its model call for the two
families (``denoise_for``) and the extra ``set_timesteps`` arguments they need
(``timestep_kwargs``). FLUX's latents stay (B, C, h, w) in the loop; ``denoise_flux`` packs
them into 2x2 patches for the transformer and unpacks its output (a permutation, so every
scheduler step is the same as on diffusers' packed latents).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch

FLOW_FAMILIES = ("sd3", "flux")
DISTILLED_CFG_SCALE = 3.5  # FLUX.1 dev's guidance when a request leaves it open (diffusers' and Forge's default)
# What a family's diffusers pipeline gives ``set_timesteps``: FLUX passes its own sigmas
# linspace(1, 1/N, N) and always a resolution-dependent mu; SD3 only when its scheduler
# config asks for dynamic shifting (SD3.5 does not).
# img2img: the flow pipelines start at int(N - N * strength) (``get_timesteps`` of
# ``StableDiffusion3Img2ImgPipeline`` / ``FluxImg2ImgPipeline``: the product is not rounded
# first, as the UNet pipelines' int(N * strength) is), so "fractional_start".
FAMILY_TIMESTEPS = {
    "sd3": {"linear_sigmas": False, "always_mu": False, "patch": "transformer", "fractional_start": True},
    "flux": {"linear_sigmas": True, "always_mu": True, "patch": 2, "fractional_start": True},
}


def is_flow_family(family: str) -> bool:
    return family in FLOW_FAMILIES


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift: linear in the number of image tokens, ``base_shift``
    at ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len`` (FLUX.1; diffusers'
    ``pipeline_flux.calculate_shift``). The shift itself is exp(mu)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def timestep_kwargs(scheduler, family: str, latent_shape: tuple[int, ...], steps: int, patch_size: int = 2) -> dict:
    """The extra ``scheduler.set_timesteps`` arguments of a flow family, as its diffusers
    pipeline passes them.

    Args:
        latent_shape: (B, C, h, w) of the unpacked latents.
        patch_size: the transformer's patch size (image tokens = (h / p) * (w / p)).
    """
    table = FAMILY_TIMESTEPS.get(family)
    if table is None:
        return {}
    cfg = scheduler.config
    takes = inspect.signature(scheduler.set_timesteps).parameters
    out: dict = {}
    if table["linear_sigmas"] and "sigmas" in takes and not cfg.get("use_flow_sigmas", False):
        out["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if table["always_mu"] or cfg.get("use_dynamic_shifting", False):
        p = 2 if table["patch"] == 2 else patch_size
        h, w = latent_shape[-2:]
        mu = calculate_shift((h // p) * (w // p), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        if "mu" in takes:
            out["mu"] = mu
        elif hasattr(scheduler, "set_shift"):  # exp time shift with mu == a static shift of exp(mu)
            scheduler.set_shift(math.exp(mu))
    return out


def img2img_start(family: str, steps: int, strength: float) -> int:
    """The first of ``steps`` steps that an img2img pass of ``strength`` in (0, 1) runs (at least
    one step runs). UNet families: steps - int(steps * strength) (diffusers' SD/SDXL img2img);
    flow families: int(steps - steps * strength) (their img2img pipelines)."""
    if FAMILY_TIMESTEPS.get(family, {}).get("fractional_start"):
        return min(int(max(steps - steps * strength, 0)), steps - 1)
    return steps - min(max(int(steps * strength), 1), steps)


def noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 noised to timestep ``t``: a flow-matching scheduler's forward process
    x_t = (1 - sigma) x0 + sigma noise (``scale_noise``), else the scheduler's ``add_noise``
    (DDPM-type, and the DPM-Solver/UniPC flow variants, whose alpha_t is 1 - sigma)."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, t, noise)
    return scheduler.add_noise(x0, noise, t)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens (FLUX's ``_pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of ``pack_latents``."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) positions of the packed tokens: (0, row, column) -- FLUX's RoPE ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _cfg(out: torch.Tensor, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
    if not use_cfg:
        return out
    uncond, text = out.chunk(2)
    return uncond + cfg_scale * (text - uncond)


def denoise_sd3(model, x: torch.Tensor, t: torch.Tensor, cond, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
    """SD3's MMDiT with classifier-free guidance: v = v_u + s (v_c - v_u), one (2B, ...) batch.

    ``cond.context``: (2B, 77 + T5 tokens, D) CLIP-L/bigG hidden states (padded to D) then T5's;
    ``cond.added["pooled"]``: (2B, 768 + 1280) pooled CLIP embeddings. ``t`` in [0, 1000].
    """
    x_in = torch.cat([x, x]) if use_cfg else x
    out = model(hidden_states=x_in, timestep=t.expand(x_in.shape[0]), encoder_hidden_states=cond.context,
                pooled_projections=cond.added["pooled"], return_dict=False)[0]
    return _cfg(out, cfg_scale, use_cfg)


def denoise_flux(model, x: torch.Tensor, t: torch.Tensor, cond, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
    """FLUX.1 on packed latents. Guidance-distilled models (dev) take the distilled guidance as an
    embedding (``cond.added["guidance"]``, one branch); with ``cfg_scale`` > 1 the negative prompt
    is a second branch as well ("true CFG", diffusers' ``true_cfg_scale``). ``t`` in [0, 1000]."""
    b, _, h, w = x.shape
    x_in = pack_latents(torch.cat([x, x]) if use_cfg else x)
    n = x_in.shape[0]
    guidance = None
    if model.config.guidance_embeds:
        guidance = torch.full((n,), float(cond.added["guidance"]), device=x.device, dtype=torch.float32)
    txt_ids = torch.zeros(cond.context.shape[1], 3, device=x.device, dtype=x.dtype)
    out = model(hidden_states=x_in, timestep=t.expand(n).to(x.dtype) / 1000, guidance=guidance,
                pooled_projections=cond.added["pooled"], encoder_hidden_states=cond.context, txt_ids=txt_ids,
                img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
    return _cfg(unpack_latents(out, h, w), cfg_scale, use_cfg)


DENOISERS = {"sd3": denoise_sd3, "flux": denoise_flux}
