"""img2img and inpaint on loaded Components: picture -> latents -> noised -> denoised -> picture.

The latent side follows diffusers' ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline`` (parity is a test): the init picture is encoded with a sample
of the VAE posterior drawn from image i's own generator, then the noise is drawn from the same
generators. The pixel side follows A1111: resize modes, mask blur, masked content, "only masked"
and blending the result back into the original picture, so pixels outside the mask are kept.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from danqing.conditioning.schedule import ConditioningContext, build_conditioning
from danqing.decode import vae_scale_factor
from danqing.editing.images import (
    composite,
    crop_region,
    feather_inward,
    fill_masked,
    mask_array,
    resize_image,
)
from danqing.editing.instruct import (
    instruct_denoise,
    instruct_schedule,
    is_instruct_unet,
    picture_latents,
    three_branches,
)
from danqing.errors import InvalidRequest
from danqing.passes.batches import Batches, Finish, PassResult, decode_pictures, finish_pictures
from danqing.sampling.flow import DENOISERS
from danqing.sampling.loop import denoise
from danqing.sampling.noise import initial_noise


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (1, 3, H, W) in [-1, 1] (diffusers' ``VaeImageProcessor.preprocess``)."""
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return a * 2 - 1


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents; image i's posterior sample from generator i."""
    out = []
    for i in range(pixels.shape[0]):
        dist = vae.encode(pixels[i:i + 1].to(device=vae.device, dtype=vae.dtype)).latent_dist
        out.append(dist.sample(generator=generators[i % len(generators)]))
    z = torch.cat(out)
    if getattr(vae.config, "shift_factor", None):
        z = z - vae.config.shift_factor
    return z * vae.config.scaling_factor


def latent_mask(mask: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """(H, W) pixel mask -> (1, 1, h, w), nearest (as diffusers' inpaint pipeline)."""
    return F.interpolate(torch.from_numpy(mask)[None, None].float(), size=shape)


def full_mask(init: Image.Image, mask_img: Image.Image, request) -> np.ndarray:
    """The inpaint mask at the init picture's size, (H, W) float32 in [0, 1], 1 = repaint
    (inverted when ``request.inpainting_mask_invert``)."""
    return mask_array(mask_img if mask_img.size == init.size else mask_img.resize(init.size, Image.LANCZOS),
                      invert=request.inpainting_mask_invert)


def only_masked_box(init: Image.Image, mask_img: Image.Image | None, request) -> tuple[int, int, int, int] | None:
    """"Only masked" (A1111's ``inpaint_full_res``): the box (x1, y1, x2, y2) of ``init`` that is
    inpainted at width x height (the mask's box + padding, grown to W:H: ``crop_region``); None
    when the request is not an only-masked inpaint or its mask is empty."""
    if mask_img is None or not request.inpaint_full_res:
        return None
    m = full_mask(init, mask_img, request)
    if m.max() <= 0:
        return None
    return crop_region(m, request.inpaint_full_res_padding, request.width, request.height)


def run_img2img(comps, request, init: Image.Image, mask_img: Image.Image | None, *, device, dtype,
                on_step=None, control=None, post: Finish | None = None,
                context: ConditioningContext | None = None) -> PassResult:
    """img2img (``mask_img`` None) or inpaint of ``init`` as ``request`` says.

    Args:
        control: a ``conditioning.control.ControlDenoise`` (ControlNet units at width x height;
            for "only masked", their maps already cropped to ``only_masked_box`` as the init
            picture is) or None.
        post: ``picture -> (picture, warnings)`` applied to each generated picture before an
            inpaint is pasted back (face restoration: A1111 restores faces before its overlay,
            so the pixels outside the mask stay the init picture's).
        context: the request's embeddings and image prompt.
    """
    warnings: list[str] = []
    W, H = request.width, request.height
    run = dict(device=device, dtype=dtype, on_step=on_step, warnings=warnings, control=control, post=post,
               context=context or ConditioningContext())
    if mask_img is None:
        return _run(comps, request, resize_image(init, W, H, request.resize_mode), None, latent_upscale_from=init,
                    **run)

    mask_full = full_mask(init, mask_img, request)
    if mask_full.max() <= 0:
        warnings.append("mask: it masks no pixel; nothing to inpaint, the init image is returned unchanged")
        n = request.batch_size * request.batch_count
        img = init if request.inpaint_full_res else resize_image(init, W, H, request.resize_mode)
        return PassResult([], [request.seed + i for i in range(n)], [request.subseed + i for i in range(n)],
                          images=[img.copy() for _ in range(n)], warnings=warnings)
    if mask_full.min() >= 1:
        warnings.append("mask: it masks every pixel; the whole picture is repainted (img2img with the "
                        "masked content and strength asked for)")

    if not request.inpaint_full_res:
        base = resize_image(init, W, H, request.resize_mode)
        m = mask_array(resize_image(Image.fromarray(np.round(mask_full * 255).astype(np.uint8)), W, H,
                                    request.resize_mode))
        out = _run(comps, request, base, m, **run)
        weight = feather_inward(m, request.mask_blur)
        out.images = [composite(base, im, weight) for im in out.images]
        return out

    # "only masked": the mask's box (+ padding, grown to W:H) inpainted at W x H, pasted back.
    x1, y1, x2, y2 = only_masked_box(init, mask_img, request)
    crop = init.crop((x1, y1, x2, y2)).resize((W, H), Image.LANCZOS)
    m_crop = mask_array(Image.fromarray(np.round(mask_full[y1:y2, x1:x2] * 255).astype(np.uint8)).resize((W, H), Image.LANCZOS))
    out = _run(comps, request, crop, m_crop, **run)
    weight = feather_inward(mask_full, request.mask_blur)
    pasted = []
    for im in out.images:
        canvas = init.copy()
        canvas.paste(im.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
        pasted.append(composite(init, canvas, weight))
    out.images = pasted
    return out


def _run(comps, request, base: Image.Image, m: np.ndarray | None, *, device, dtype, on_step, warnings,
         latent_upscale_from: Image.Image | None = None, control=None, post: Finish | None = None,
         context: ConditioningContext) -> PassResult:
    """Encode, noise, denoise and decode ``base`` (already W x H) with the pixel mask ``m``;
    the decoded pictures finished by ``post``."""
    B = request.batch_size
    if request.denoising_strength == 0:
        warnings.append("denoising_strength: 0 changes nothing; the init image is returned")
        n = B * request.batch_count
        images = finish_pictures([base.copy() for _ in range(n)], post, warnings)
        return PassResult([], [request.seed + i for i in range(n)], [request.subseed + i for i in range(n)],
                          images=images, warnings=warnings)

    inpainting_unet = comps.unet.config.in_channels == 9
    instruct = is_instruct_unet(comps.unet)
    if instruct and control is not None:
        raise InvalidRequest("controlnet", "an instruct-pix2pix model does not take ControlNet units yet")
    if instruct and m is not None:
        raise InvalidRequest("mask", "an instruct-pix2pix model edits the whole picture from its instruction; "
                             "it takes no mask")
    if m is not None and request.inpainting_fill == "fill":
        base = fill_masked(base, m)
    pixels = to_tensor(base)
    upscale_latents = request.resize_mode == "latent upscale" and latent_upscale_from is not None
    if upscale_latents:
        src = latent_upscale_from
        f = vae_scale_factor(comps.vae)
        src = src.resize((max(f, src.width // f * f), max(f, src.height // f * f)), Image.LANCZOS)
        pixels = to_tensor(src)

    encoder = context.text_encoder(comps, request.clip_skip)
    cond = build_conditioning(encoder, request, batch=B, image_prompt=context.image_prompt)
    factor = vae_scale_factor(comps.vae)
    shape = (comps.vae.config.latent_channels, request.height // factor, request.width // factor)
    denoise_fn = control if control is not None else DENOISERS.get(comps.family, denoise)  # SD3 / FLUX: theirs
    if instruct:
        three = three_branches(request.cfg_scale, request.image_cfg_scale)
        if request.cfg_scale > 1.0 and not three:  # as diffusers: no guidance at all then
            cond = instruct_schedule(cond, False)
        elif three:
            cond = instruct_schedule(cond, True)
        image_lat = picture_latents(comps.vae, pixels).to(device=device, dtype=dtype).expand(B, -1, -1, -1)
        denoise_fn = instruct_denoise(image_lat, request.image_cfg_scale, three)
    lmask = latent_mask(m, shape[1:]).to(device=device, dtype=dtype).expand(B, -1, -1, -1) if m is not None else None
    masked_pixels = pixels * torch.from_numpy(m < 0.5)[None, None] if (m is not None and inpainting_unet) else None

    batches = Batches(request, device)
    for batch in batches:
        gens = batch.generators
        # as diffusers: the init picture's posterior samples first, then the noise (an inpainting
        # UNet at full strength never looks at the init latents, and diffusers does not draw them)
        if (inpainting_unet and m is not None or instruct) and request.denoising_strength == 1.0:
            init_lat = torch.zeros((B, *shape), device=device, dtype=dtype)
        else:
            init_lat = encode(comps.vae, pixels.expand(B, -1, -1, -1), gens).to(device=device, dtype=dtype)
        if upscale_latents:
            init_lat = F.interpolate(init_lat.float(), size=shape[1:], mode="bilinear").to(dtype)
        noise = initial_noise(shape, gens, subseeds=batch.subseeds, subseed_strength=request.subseed_strength)
        noise = noise.to(device=device, dtype=dtype)
        masked_lat = None
        if masked_pixels is not None:
            masked_lat = encode(comps.vae, masked_pixels.expand(B, -1, -1, -1), gens).to(device=device, dtype=dtype)
        if lmask is not None and request.inpainting_fill in ("latent noise", "latent nothing"):
            fill = (torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in gens]).to(device, dtype)
                    if request.inpainting_fill == "latent noise" else torch.zeros_like(init_lat))
            init_lat = init_lat * (1 - lmask) + fill * lmask
        cfg_scale = request.cfg_scale if not instruct or three else 1.0
        sampled = batch.sample(comps, noise, cond, sampler=request.sampler, schedule=request.schedule,
                               steps=request.steps, cfg_scale=cfg_scale, on_step=on_step, init_latents=init_lat,
                               strength=request.denoising_strength, mask=lmask, masked_image_latents=masked_lat,
                               denoise_fn=denoise_fn, shift=getattr(request, "shift", None))
        batches.record(batch, sampled, images=decode_pictures(comps.vae, sampled.latents, post, warnings))
    batches.result.warnings = warnings
    return batches.result
