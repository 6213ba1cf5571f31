"""The SDXL refiner's side of the base -> refiner hand-off (diffusers' XL img2img pipeline with
``denoising_start``): each batch's latents, left at ``refiner_switch_at`` by the base model,
denoised to the end with the refiner's own conditioning and fresh per-image generators."""

from __future__ import annotations

import torch

from danqing.conditioning.schedule import ConditioningContext, build_conditioning
from danqing.errors import InvalidRequest
from danqing.passes.batches import Batches, PassResult

# the latent space of each family: a refiner must share the base model's
LATENT_SPACE = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sdxl-refiner": "sdxl"}


def check_refiner(base_family: str, refiner_family: str, name: str) -> None:
    """A refiner must share the base model's latent space (SDXL with SDXL, SD1/SD2 together)."""
    space = LATENT_SPACE
    if space.get(base_family) != space.get(refiner_family):
        raise InvalidRequest("refiner_checkpoint", f"{name!r} is a {refiner_family} model; a {base_family} model's "
                             f"latents can only be refined by a model of the same latent space "
                             f"({', '.join(f for f, s in space.items() if s == space.get(base_family))})")


def refine(comps, request, latents: list[torch.Tensor], *, device, dtype, on_step=None,
           context: ConditioningContext | None = None) -> PassResult:
    """Finish each batch's ``latents`` from ``request.refiner_switch_at`` on with the refiner
    ``comps``; the result's latents are not decoded."""
    context = context or ConditioningContext()
    encoder = context.text_encoder(comps, request.clip_skip)
    cond = build_conditioning(encoder, request, batch=request.batch_size)  # no IP-Adapter on the refiner
    batches = Batches(request, device, count=len(latents))
    for batch, lat in zip(batches, latents):
        lat = lat.to(device=device, dtype=dtype)
        sampled = batch.sample(comps, lat, cond, sampler=request.sampler, schedule=request.schedule,
                               steps=request.steps, cfg_scale=request.cfg_scale, on_step=on_step,
                               init_latents=lat, denoising_start=request.refiner_switch_at)
        batches.record(batch, sampled)
    return batches.result


def run_refiner(comps, request, latents: list[torch.Tensor], *, device, dtype, on_step=None,
                context: ConditioningContext | None = None):
    """``refine`` as a tuple: (latents per batch, interrupted)."""
    out = refine(comps, request, latents, device=device, dtype=dtype, on_step=on_step, context=context)
    return out.latents, out.interrupted
