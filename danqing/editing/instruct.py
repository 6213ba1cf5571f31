"""instruct-pix2pix (Brooks et al. 2023): edit a picture by an instruction ("make the circle blue").

The UNet takes 8 input channels: the noisy latents and the *unscaled* VAE mode of the picture
(diffusers' ``StableDiffusionInstructPix2PixPipeline`` and A1111 agree on that). Guidance has
three branches, run as one batch ``[text + picture, uncond + picture, uncond + no picture]``:

    eps = eps_uncond + s_text * (eps_text - eps_picture) + s_image * (eps_picture - eps_uncond)

``cfg_scale`` is ``s_text`` and ``image_cfg_scale`` is ``s_image``; as diffusers, guidance is
off (one branch) unless ``cfg_scale > 1`` and ``image_cfg_scale >= 1``. img2img runs an
8-channel model this way by itself (as A1111 does), so ``danqing img2img`` and the request's
``init_image`` are the way in; ``danqing edit instruct`` is the same with instruct defaults.
"""

from __future__ import annotations

import torch

from danqing.sampling.loop import Conditioning, ConditioningSchedule

INSTRUCT_CHANNELS = 8


def is_instruct_unet(unet) -> bool:
    return unet.config.in_channels == INSTRUCT_CHANNELS


def three_branches(cfg_scale: float, image_cfg_scale: float) -> bool:
    return cfg_scale > 1.0 and image_cfg_scale >= 1.0


@torch.no_grad()
def picture_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the VAE posterior's mode, not scaled (the UNet was trained so)."""
    return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()


def instruct_schedule(schedule, three: bool):
    """Our [uncond; cond] conditioning -> [cond, uncond, uncond] (three branches) or [cond]."""
    conds = []
    for c in schedule.conds:
        b = c.context.shape[0] // 2
        neg, pos = c.context[:b], c.context[b:]
        conds.append(Conditioning(torch.cat([pos, neg, neg]) if three else pos))
    return ConditioningSchedule(schedule.ends, conds)


def instruct_denoise(image_latents: torch.Tensor, image_cfg_scale: float, three: bool):
    """A ``denoise`` for the loop: latents + picture channels, three-branch guidance."""
    cond_image = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)]) if three else image_latents

    def fn(unet, x, t, cond, cfg_scale, use_cfg):
        x_in = torch.cat([torch.cat([x] * 3) if three else x, cond_image], dim=1)
        out = unet(x_in, t, encoder_hidden_states=cond.context, added_cond_kwargs=cond.added, return_dict=False)[0]
        if not three:
            return out
        text, image, uncond = out.chunk(3)
        return uncond + cfg_scale * (text - image) + image_cfg_scale * (image - uncond)

    return fn
