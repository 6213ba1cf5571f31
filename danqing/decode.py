"""Latents -> pixels: the VAE decode (tiled for large images) and cheap previews."""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np
import torch
from PIL import Image

TILE_ABOVE_PIXELS = 1536 * 1536  # decode tiled above this many output pixels


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell: 2 ** (number of VAE down blocks - 1) -- 8 for every SD VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode (B, 4, h, w) latents to (B, 3, H, W) floats in [0, 1] on the CPU, fp32.

    x = VAE.decode(z / scaling_factor); image = clamp(x / 2 + 0.5, 0, 1) -- as diffusers'
    ``VaeImageProcessor.postprocess`` does, so parity with its pipelines is exact.
    """
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    big = z.shape[-1] * z.shape[-2] * vae_scale_factor(vae) ** 2 > TILE_ABOVE_PIXELS
    x = vae.tiled_decode(z).sample if big else vae.decode(z).sample
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> RGB PIL images (round half to even, like diffusers)."""
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


@functools.lru_cache(maxsize=1)
def _preview_table() -> dict:
    return json.loads(resources.files("danqing").joinpath("data/latent_previews.json").read_text(encoding="utf-8"))


@torch.no_grad()
def cheap_preview(latents: torch.Tensor, family: str) -> Image.Image:
    """A small RGB picture of the first latent of a batch, without the VAE (microseconds).

    rgb = latent . factors + bias, a linear fit of the VAE decoder; for latents that are not
    4-channel, the first three channels are min-max scaled instead.
    """
    z = latents[0].float().cpu()  # (C, h, w)
    if z.ndim != 3:  # not a picture's latents (Kandinsky's prior samples an embedding): a grey square
        return Image.new("RGB", (8, 8), (128, 128, 128))
    table = _preview_table().get(family)
    if table and z.shape[0] == 4:
        rgb = torch.einsum("chw,cr->rhw", z, torch.tensor(table["factors"])) + torch.tensor(table["bias"]).view(3, 1, 1)
        rgb = ((rgb + 1) / 2).clamp(0, 1)
    else:
        rgb = z[:3]
        lo, hi = rgb.amin(dim=(1, 2), keepdim=True), rgb.amax(dim=(1, 2), keepdim=True)
        rgb = (rgb - lo) / (hi - lo + 1e-6)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@torch.no_grad()
def tiny_preview(latents: torch.Tensor, decoder) -> Image.Image:
    """The first latent of a batch through a tiny preview decoder (``models.preview_decoder``):
    TAESD decoders take the latents as the sampler has them (already scaled)."""
    p = next(decoder.parameters())
    x = decoder.decode(latents[:1].to(p.device, p.dtype)).sample
    return to_pil((x.float().cpu() / 2 + 0.5).clamp(0, 1))[0]
