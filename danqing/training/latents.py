"""Fine-tuning data: captioned images -> aspect-ratio buckets -> VAE posteriors cached once.

Each bucket keeps the posterior's mean and std of its images (and of their mirror images when
``flip`` is on); every step draws a fresh latent from them, as kohya's ``cache_latents`` with
random sampling does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from danqing.decode import vae_scale_factor
from danqing.errors import InvalidRequest
from danqing.synthetic.scenes import concepts
from danqing.training.data import bucket_sizes, caption_folder, concept_items, fit_bucket, world_items


@dataclass
class LatentBucket:
    """Cached VAE posteriors of the images of one (width, height) bucket.

    Attributes:
        mean, std: (N, 4, h, w) each, unscaled; flipped copies follow their originals when
            ``flip`` is on (index 2i / 2i+1).
        captions: N caption lists; repeats: N weights (kohya repeats).
    """

    size: tuple[int, int]
    mean: torch.Tensor
    std: torch.Tensor
    captions: list[list[str]]
    repeats: list[int]
    flipped: bool = False
    masks: torch.Tensor | None = None  # (N, 1, h, w) in [0, 1] at latent size: the masked loss's objects


@dataclass
class TrainData:
    buckets: list[LatentBucket]
    n_images: int

    def draw(self, rng: random.Random, batch: int) -> tuple[LatentBucket, list[int]]:
        """A bucket (by its share of repeated images) and ``batch`` indices in it (by repeats)."""
        weights = [sum(b.repeats) for b in self.buckets]
        b = rng.choices(self.buckets, weights=weights)[0]
        idx = rng.choices(range(len(b.captions)), weights=b.repeats, k=batch)
        return b, idx


def bucket_step(comps) -> int:
    """Pixel multiple every bucket side must be: the VAE factor times the UNet's downsamplings."""
    return vae_scale_factor(comps.vae) * 2 ** (len(comps.unet.config.block_out_channels) - 1)


def load_items(data_cfg, *, size: int):
    """The configured images with captions (a folder, ``concept:<shape or colour>`` or
    ``world:<shapes|portraits|mix>``)."""
    if data_cfg.source.startswith("concept:"):
        concept = data_cfg.source.split(":", 1)[1]
        if concept not in concepts():
            raise InvalidRequest("data.source", f"unknown concept {concept!r}; concepts: "
                                 f"{', '.join('concept:' + s for s in concepts())}, or a folder")
        return concept_items(concept, data_cfg.n_images, size=size, captions_per_image=data_cfg.captions_per_image,
                             seed=data_cfg.seed, pair_share=data_cfg.pair_share, relations=data_cfg.pair_relations)
    if data_cfg.source.startswith("world:"):
        return world_items(data_cfg.source.split(":", 1)[1], data_cfg.n_images, size=size,
                           captions_per_image=data_cfg.captions_per_image, seed=data_cfg.seed)
    return caption_folder(data_cfg.source, caption_ext=data_cfg.caption_ext, repeats=data_cfg.repeats)


@torch.no_grad()
def cache_latents(items, comps, *, resolution: int, buckets: bool, flip: bool, device) -> TrainData:
    """Encode every image once (and its mirror image when ``flip``), grouped by bucket."""
    sizes = bucket_sizes(resolution, bucket_step(comps)) if buckets else None
    groups: dict[tuple[int, int], list] = {}
    for it in items:
        im = fit_bucket(it.image, sizes, resolution)
        mask = fit_bucket(it.mask, None, resolution, size=im.size) if it.mask is not None else Image.new("L", im.size, 0)
        groups.setdefault(im.size, []).append((im, mask, it))
    vae = comps.vae
    out = []
    for size, members in sorted(groups.items()):
        pics, masks = [], []
        for im, mask, _ in members:
            pics.append(im)
            masks.append(mask)
            if flip:
                pics.append(im.transpose(Image.FLIP_LEFT_RIGHT))
                masks.append(mask.transpose(Image.FLIP_LEFT_RIGHT))
        x = torch.from_numpy(np.stack([np.asarray(p, np.float32) for p in pics])).permute(0, 3, 1, 2) / 127.5 - 1
        means, stds = [], []
        for i in range(0, len(x), 32):
            dist = vae.encode(x[i:i + 32].to(device=device, dtype=vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        caps = [it.captions for _, _, it in members for _ in range(2 if flip else 1)]
        reps = [it.repeats for _, _, it in members for _ in range(2 if flip else 1)]
        m = torch.from_numpy(np.stack([np.asarray(k, np.float32) / 255 for k in masks]))[:, None]  # (N, 1, H, W)
        m = F.adaptive_avg_pool2d(m, means[0].shape[-2:])  # the share of each latent pixel inside the mask
        out.append(LatentBucket(size, torch.cat(means), torch.cat(stds), caps, reps, flip, m))
    return TrainData(out, len(items))

