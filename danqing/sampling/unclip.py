"""Stable unCLIP in our loop: image variations from a picture's CLIP image embedding.

The picture goes through the CLIP image processor and vision encoder; its embedding is
normalised, noised to ``noise_level`` by the image-noising scheduler (noise augmentation: a
higher level, looser variations), un-normalised, and followed by the level's sinusoidal
embedding. The UNet takes that vector as its class label (added to the time embedding); the
unconditional CFG branch gets zeros. Text conditions as in SD 2.1 (``build_conditioning``:
prompt editing and emphasis included); the prompt may be empty.

As diffusers' ``StableUnCLIPImg2ImgPipeline`` (parity is a test): image i draws from generator
``seed + i`` first the embedding's noise, then its start noise. (diffusers, given a list of
generators, noises one embedding for the whole batch from the first; here each image has its own.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from danqing.conditioning.schedule import ConditioningContext, build_conditioning
from danqing.decode import decode_latents, to_pil, vae_scale_factor
from danqing.sampling.loop import OnStep, sample
from danqing.sampling.noise import make_generators
from danqing.sampling.samplers import make_scheduler

UNCLIP_DEFAULTS = {"noise_level": 0, "steps": 20, "cfg_scale": 10.0}  # StableUnCLIPImg2ImgPipeline's defaults


@dataclass
class ClassLabelDenoise:
    """The model call of a UNet conditioned on a class-label vector (``loop.sample``'s ``denoise_fn``).

    Attributes:
        labels: (2B or B, D) [zeros; embedding] rows with CFG, else (B, D).
    """

    labels: torch.Tensor

    def __call__(self, unet, x: torch.Tensor, t: torch.Tensor, cond, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
        x_in = torch.cat([x, x]) if use_cfg else x
        out = unet(x_in, t, encoder_hidden_states=cond.context, class_labels=self.labels, return_dict=False)[0]
        if not use_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + cfg_scale * (text - uncond)


@dataclass
class VariationsResult:
    """What ``run_unclip`` made: final latents (B, 4, h, w), pictures, seeds."""

    latents: torch.Tensor
    images: list[Image.Image]
    seeds: list[int]
    interrupted: bool = False
    steps_done: int = 0
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def image_embedding(model, picture: Image.Image) -> torch.Tensor:
    """(1, D) CLIP image embedding of a picture (``image_encoder(feature_extractor(picture))``)."""
    enc = model.image_encoder
    pixels = model.feature_extractor(images=picture.convert("RGB"), return_tensors="pt").pixel_values
    return enc(pixels.to(device=enc.device, dtype=enc.dtype)).image_embeds


@torch.no_grad()
def noised_embedding(model, embeds: torch.Tensor, noise: torch.Tensor, level: int | torch.Tensor) -> torch.Tensor:
    """(B, 2D): the embedding noised to ``level`` (in normalised space), then the level's
    sinusoidal embedding (diffusers' ``noise_image_embeddings``). ``level``: one for all rows,
    or (B,) levels, one per row (training)."""
    import diffusers
    from diffusers.models.embeddings import get_timestep_embedding

    cfg = model.noising_config
    noising = getattr(diffusers, cfg.get("_class_name", "DDPMScheduler")).from_config(cfg)
    if isinstance(level, torch.Tensor):
        levels = level.to(embeds.device).long()
    else:
        levels = torch.tensor([level] * embeds.shape[0], device=embeds.device)
    norm = model.image_normalizer.to(embeds.device)
    noisy = norm.unscale(noising.add_noise(norm.scale(embeds), noise, levels))
    level_emb = get_timestep_embedding(levels, noisy.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
    return torch.cat([noisy, level_emb.to(noisy.dtype)], dim=1)


@torch.no_grad()
def run_unclip(model, picture: Image.Image | None, request, *, noise_level: int | None = None,
               on_step: OnStep | None = None, device: str | torch.device = "cpu", prior=None,
               prior_steps: int | None = None, prior_cfg_scale: float | None = None,
               prior_prompt: str | None = None) -> VariationsResult:
    """Variations of ``picture`` at ``request.width`` x ``request.height``; or, with ``prior``
    and no picture, text-to-image: the prior turns the prompt into image embeddings (DALL-E 2).

    Args:
        model: a ``models.unclip_models.UnclipModel``.
        request: a ``GenerationRequest``: prompt (may be empty), negative prompt, sampler,
            schedule, steps, CFG scale, seed, size, batch size.
        noise_level: 0..(the noising scheduler's timesteps - 1); default 0 (closest variations).
        prior: a ``models.unclip_models.KandinskyPrior`` over the same CLIP as the model's image
            encoder; image i's embedding is sampled from generator ``seed + i`` first (its
            unconditional text is ""; the negative prompt is the decoder's), with
            ``prior_steps`` / ``prior_cfg_scale`` (Kandinsky 2.2's defaults, 25 and 4).
        prior_prompt: what the prior reads (default: the request's prompt, which the decoder
            reads as well; give it here with an empty request prompt for the prior's path alone).
    """
    comps = model.components
    B = request.batch_size
    seeds = [request.seed + i for i in range(B)]
    gens = make_generators(seeds, "cpu" if getattr(request, "rng", "cpu") == "cpu" else device)
    level = UNCLIP_DEFAULTS["noise_level"] if noise_level is None else int(noise_level)
    use_cfg = request.cfg_scale > 1.0
    dtype = comps.unet.dtype

    if picture is not None:
        embeds = image_embedding(model, picture).expand(B, -1)
    elif prior is not None:
        from danqing.sampling.kandinsky import KANDINSKY_DEFAULTS, run_prior

        text = request.prompt if prior_prompt is None else prior_prompt
        embeds = torch.cat([run_prior(prior, text, "", 1, [gen], steps=prior_steps or KANDINSKY_DEFAULTS[
            "prior_steps"], cfg_scale=KANDINSKY_DEFAULTS["prior_cfg_scale"] if prior_cfg_scale is None
            else prior_cfg_scale)[0] for gen in gens]).to(model.image_encoder.device, model.image_encoder.dtype)
    else:
        raise ValueError("run_unclip needs a picture or a prior")
    f = vae_scale_factor(comps.vae)
    shape = (comps.unet.config.in_channels, request.height // f, request.width // f)
    labels, noise = [], []
    for i, gen in enumerate(gens):  # per image: the embedding's noise, then the start noise
        emb = embeds[i:i + 1]
        emb_noise = torch.randn(tuple(emb.shape), generator=gen, device=gen.device).to(emb)
        labels.append(noised_embedding(model, emb, emb_noise, level))
        noise.append(torch.randn((1, *shape), generator=gen, device=gen.device))
    labels = torch.cat(labels).to(device, dtype)
    if use_cfg:
        labels = torch.cat([torch.zeros_like(labels), labels])
    schedule = build_conditioning(ConditioningContext().text_encoder(comps), request, batch=B)
    scheduler = make_scheduler(comps.scheduler_config, request.sampler, request.schedule, seed=request.seed)
    result = sample(comps.unet, scheduler, torch.cat(noise).to(device, dtype), schedule, steps=request.steps,
                    cfg_scale=request.cfg_scale, generators=gens, on_step=on_step, family="sd2",
                    denoise_fn=ClassLabelDenoise(labels))
    images = to_pil(decode_latents(comps.vae, result.latents))
    return VariationsResult(result.latents, images, seeds, result.interrupted, result.steps_done)
