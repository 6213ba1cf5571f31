"""Hires fix (A1111): a first pass at width x height, the result upscaled (in latent space, or
as a picture through an upscaler and encoded again), then a second img2img pass at
``denoising_strength`` that adds the detail the first pass had no room for."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from danqing.conditioning.schedule import ConditioningContext, build_conditioning
from danqing.decode import decode_latents, to_pil, vae_scale_factor
from danqing.editing.img2img import encode, to_tensor
from danqing.editing.upscale import upscale_image, upscaler_names
from danqing.errors import InvalidRequest
from danqing.passes.batches import Batches, PassResult
from danqing.sampling.noise import initial_noise

# A1111's latent upscale modes: name -> (torch interpolation mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


def hires_upscalers(library=None) -> list[str]:
    """A1111's latent modes, the built-in picture upscalers and, with ``library`` (an
    ``UpscalerLibrary``), the installed model upscalers."""
    return list(LATENT_UPSCALERS) + upscaler_names(library)


def check_hires_upscaler(name: str, library=None) -> None:
    """Raise InvalidRequest unless ``name`` is one of ``hires_upscalers(library)``: the one
    check of ``hr_upscaler`` (the CLI, ``Studio.generate`` and the server call it)."""
    names = hires_upscalers(library)
    if name not in names:
        raise InvalidRequest("hr_upscaler", f"unknown upscaler {name!r}; installed: {', '.join(names)}")


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], name: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size) with one of A1111's latent modes."""
    mode, aa = LATENT_UPSCALERS[name]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(latents.float(), size=size, mode=mode, antialias=aa, **kwargs).to(latents.dtype)


def second_pass_request(request):
    """The request of the second pass: hires size, its own steps, sampler and prompts."""
    w, h = request.hr_size
    return request.replace(
        width=w, height=h, enable_hr=False,
        steps=request.hr_second_pass_steps or request.steps,
        sampler=request.hr_sampler_name or request.sampler,
        prompt=request.prompt if request.hr_prompt is None else request.hr_prompt,
        negative_prompt=request.negative_prompt if request.hr_negative_prompt is None else request.hr_negative_prompt,
    )


def run_hires(comps, request, first: list[torch.Tensor], *, device, dtype, on_step=None, control=None,
              upscalers=None, context: ConditioningContext | None = None) -> PassResult:
    """The second pass over the first pass's latents (one tensor per batch); its prompts
    continue the first pass's prompt-editing timeline (A1111 >= 1.6: ``[a:b:25]`` after 20
    first-pass steps switches at hires step 5, ``[a:b:1.5]`` half way through the hires pass).

    Args:
        control: a ``ControlDenoise`` with the units' maps at the second pass's size
            (sd-webui-controlnet's "Both" hires option), or None.
        upscalers: the ``UpscalerLibrary`` whose models ``hr_upscaler`` may name.
        context: the request's embeddings and image prompt.

    Returns:
        ``PassResult`` with the latents of each batch (not decoded).
    """
    check_hires_upscaler(request.hr_upscaler, upscalers)  # Studio.generate checks it before loading too
    context = context or ConditioningContext()
    req2 = second_pass_request(request)
    f = vae_scale_factor(comps.vae)
    size = (req2.height // f, req2.width // f)
    cond = build_conditioning(context.text_encoder(comps, request.clip_skip), req2, batch=request.batch_size,
                              image_prompt=context.image_prompt, first_pass_steps=request.steps)
    batches = Batches(request, device, count=len(first))
    for batch, lat in zip(batches, first):
        gens = batch.generators  # the same seeds as the first pass
        if request.hr_upscaler in LATENT_UPSCALERS:
            z = upscale_latents(lat, size, request.hr_upscaler)
        else:
            pics = [upscale_image(im, req2.width, req2.height, request.hr_upscaler, upscalers)
                    for im in to_pil(decode_latents(comps.vae, lat))]
            z = encode(comps.vae, torch.cat([to_tensor(p) for p in pics]), gens)
        z = z.to(device=device, dtype=dtype)
        noise = initial_noise((lat.shape[1], *size), gens, subseeds=batch.subseeds,
                              subseed_strength=request.subseed_strength).to(device=device, dtype=dtype)
        sampled = batch.sample(comps, noise, cond, sampler=req2.sampler, schedule=req2.schedule, steps=req2.steps,
                               cfg_scale=req2.cfg_scale, on_step=on_step, init_latents=z,
                               strength=request.denoising_strength,
                               **({"denoise_fn": control} if control is not None else {}))
        batches.record(batch, sampled)
    return batches.result
