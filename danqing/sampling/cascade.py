"""DeepFloyd IF in our loop: stage I (text -> 64x64 pixels), then stage II (4x super-resolution).

Both stages run the one loop (``loop.sample``) with ``PixelDenoise`` as its model call: the UNet
predicts noise and a learned variance (6 channels), CFG mixes the noise halves and keeps the
text branch's variance, and the DDPM scheduler (the stage's own config: ``learned_range``
variance, dynamic thresholding of x0 -- Saharia et al. 2022, section 2.3) takes both. Stage II
sees the stage-I picture upscaled bilinearly and noised to ``noise_level`` by its
``image_noising_scheduler``, concatenated to its input, with the level as its class label
(noise-conditioning augmentation, Ho et al. 2021, "Cascaded Diffusion Models").

As diffusers' ``IFPipeline`` and ``IFSuperResolutionPipeline`` (parity is a test): image i draws
its noise from generator ``seed + i``; stage II continues the same generators (as the
diffusers examples hand one generator through the cascade): its start noise first, then the
noise of the augmentation.

The stages are also callable alone: ``base_pixels`` (stage I, one prompt per picture) and
``upscale`` (stage II on any pictures; a stage II without text gets no CFG). The UNet's first
half may be the noise or, where the scheduler config says ``v_prediction`` (danqing-tiny-if's
stage II), the velocity: the scheduler reads it either way. ``run_ddpm`` runs an unconditional
pixel model (a ``DDPMPipeline`` folder: the course's project 2) in the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from danqing.conditioning.if_text import if_schedule
from danqing.decode import to_pil
from danqing.sampling.loop import Conditioning, ConditioningSchedule, OnStep, sample
from danqing.sampling.noise import initial_noise, make_generators

LEARNED = ("learned", "learned_range")
IF_DEFAULTS = {"steps": 100, "cfg_scale": 7.0, "upscale_steps": 50, "upscale_cfg_scale": 4.0, "noise_level": 250,
               "scale": 4}  # IFPipeline's / IFSuperResolutionPipeline's defaults; stage II makes 4x


@dataclass
class PixelDenoise:
    """The model call of a pixel stage (``loop.sample``'s ``denoise_fn``).

    Attributes:
        learned: the scheduler takes the learned variance (else only the noise half is kept).
        upscaled: stage II: (B, 3, H, W) the noised low-resolution picture, concatenated to x.
        noise_level: stage II: (B,) its noise level, the UNet's class label.
    """

    learned: bool = True
    upscaled: torch.Tensor | None = None
    noise_level: torch.Tensor | None = None

    def __call__(self, unet, x: torch.Tensor, t: torch.Tensor, cond, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
        channels = x.shape[1]
        x_in = x if self.upscaled is None else torch.cat([x, self.upscaled], dim=1)
        labels = self.noise_level
        if use_cfg:
            x_in = torch.cat([x_in, x_in])
            labels = None if labels is None else torch.cat([labels, labels])
        out = unet(x_in, t, encoder_hidden_states=cond.context, class_labels=labels, return_dict=False)[0]
        if use_cfg:
            uncond, text = out.chunk(2)
            eps_u, eps_c = uncond[:, :channels], text[:, :channels]
            out = torch.cat([eps_u + cfg_scale * (eps_c - eps_u), text[:, channels:]], dim=1)
        return out if self.learned else out[:, :channels]


def _scheduler(config: dict):
    import diffusers

    return getattr(diffusers, config.get("_class_name", "DDPMScheduler")).from_config(config)


@dataclass
class CascadeResult:
    """What ``run_if`` made: the stage-I pixels, the stage-II pixels (None without stage II),
    both (B, 3, H, W) in about [-1, 1], the pictures of the last stage run, and the seeds."""

    low: torch.Tensor
    high: torch.Tensor | None
    images: list[Image.Image]
    seeds: list[int]
    interrupted: bool = False
    steps_done: dict = field(default_factory=dict)


def _stage(stage, scheduler_config, noise, cond, steps, cfg_scale, gens, on_step, denoise):
    return sample(stage.unet, _scheduler(scheduler_config), noise, cond, steps=steps, cfg_scale=cfg_scale,
                  generators=gens, on_step=on_step, family=stage.kind, denoise_fn=denoise)


@torch.no_grad()
def run_if(stage_1, request, *, stage_2=None, upscale_steps: int | None = None,
           upscale_cfg_scale: float | None = None, noise_level: int | None = None, on_step: OnStep | None = None,
           device: str | torch.device = "cpu", size: tuple[int, int] | None = None) -> CascadeResult:
    """Text -> stage I at ``request.width`` x ``request.height`` (or ``size``, (height, width):
    below the request's 64-pixel minimum, e.g. danqing-tiny-if's 32) -> (stage II at 4x).

    Args:
        stage_1, stage_2: ``models.cascade_models.PixelStage`` of kind "if-i" / "if-ii".
        request: a ``GenerationRequest``: prompt, negative prompt, steps, CFG scale, seed, size
            and batch size of stage I (its other fields are not read).
        upscale_steps, upscale_cfg_scale, noise_level: stage II's (default 50, 4.0, 250).
    """
    B = request.batch_size
    seeds = [request.seed + i for i in range(B)]
    gens = make_generators(seeds, "cpu" if getattr(request, "rng", "cpu") == "cpu" else device)
    encoder, tokenizer = stage_1.text_encoder, stage_1.tokenizer
    cond = if_schedule(encoder, tokenizer, request.prompt, request.negative_prompt, B, request.steps,
                       request.cfg_scale > 1.0)
    first = base_pixels(stage_1, cond, steps=request.steps, cfg_scale=request.cfg_scale, generators=gens,
                        size=size or (request.height, request.width), on_step=on_step, device=device)
    done = {"if-i": first.steps_done}
    if stage_2 is None or first.interrupted:
        return CascadeResult(first.latents, None, pixel_pictures(first.latents), seeds, first.interrupted, done)

    steps = upscale_steps or IF_DEFAULTS["upscale_steps"]
    cfg = IF_DEFAULTS["upscale_cfg_scale"] if upscale_cfg_scale is None else upscale_cfg_scale
    level = IF_DEFAULTS["noise_level"] if noise_level is None else noise_level
    if stage_2.text_encoder is not None:  # its own T5 (the released stage II uses stage I's)
        encoder, tokenizer = stage_2.text_encoder, stage_2.tokenizer
    cond = if_schedule(encoder, tokenizer, request.prompt, request.negative_prompt, B, steps, cfg > 1.0)
    second = upscale(stage_2, first.latents, cond, steps=steps, cfg_scale=cfg, noise_level=level, generators=gens,
                     on_step=on_step, device=device)
    done["if-ii"] = second.steps_done
    return CascadeResult(first.latents, second.latents, pixel_pictures(second.latents), seeds, second.interrupted, done)


@torch.no_grad()
def base_pixels(stage_1, cond, *, steps: int, cfg_scale: float, generators: list[torch.Generator],
                size: tuple[int, int], on_step: OnStep | None = None, device: str | torch.device = "cpu"):
    """Stage I: pictures of ``size`` (height, width), one per generator, conditioned by ``cond``
    (``if_schedule``'s). Returns the loop's result (its ``latents`` are the pixels, about [-1, 1])."""
    noise = initial_noise((stage_1.unet.config.in_channels, *size), generators).to(device, stage_1.unet.dtype)
    learned = stage_1.scheduler_config.get("variance_type") in LEARNED
    return _stage(stage_1, stage_1.scheduler_config, noise, cond, steps, cfg_scale, generators, on_step,
                  PixelDenoise(learned))


@torch.no_grad()
def upscale(stage_2, low: torch.Tensor, cond=None, *, steps: int, cfg_scale: float = 1.0, noise_level: int,
            generators: list[torch.Generator], on_step: OnStep | None = None, device: str | torch.device = "cpu"):
    """Stage II on pictures ``low`` (B, 3, h, w) in [-1, 1]: ``IF_DEFAULTS["scale"]``x larger,
    conditioned on them upsampled bilinearly and noised to ``noise_level`` (noise drawn from
    ``generators`` after the start noise). ``cond``: a ``ConditioningSchedule`` of text states;
    None for a stage II without text (a zero context, no CFG). Returns the loop's result."""
    B = low.shape[0]
    dtype = stage_2.unet.dtype
    if cond is None:
        width = stage_2.unet.config.cross_attention_dim
        cond = ConditioningSchedule([steps], [Conditioning(torch.zeros(B, 1, width, device=device, dtype=dtype))])
        cfg_scale = 1.0
    size = (low.shape[-2] * IF_DEFAULTS["scale"], low.shape[-1] * IF_DEFAULTS["scale"])
    noise = initial_noise((stage_2.unet.config.in_channels // 2, *size), generators).to(device, dtype)
    upscaled = F.interpolate(low.to(device, dtype), size, mode="bilinear", align_corners=True)
    levels = torch.tensor([noise_level] * B, device=upscaled.device)
    aug = initial_noise(tuple(upscaled.shape[1:]), generators).to(device, dtype)
    upscaled = _scheduler(stage_2.noising_config).add_noise(upscaled, aug, levels)
    denoise = PixelDenoise(stage_2.scheduler_config.get("variance_type") in LEARNED, upscaled, levels)
    return _stage(stage_2, stage_2.scheduler_config, noise, cond, steps, cfg_scale, generators, on_step, denoise)


def pixel_pictures(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB pictures (the IF pipelines' "pil" output, without watermark)."""
    return to_pil((pixels.float().cpu() / 2 + 0.5).clamp(0, 1))


def plain_denoise(unet, x: torch.Tensor, t: torch.Tensor, cond, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
    """The model call of an unconditional pixel model (diffusers' ``UNet2DModel``): no text, no CFG."""
    return unet(x, t, return_dict=False)[0]


@torch.no_grad()
def run_ddpm(unet, scheduler_config: dict, seeds: list[int], *, steps: int, on_step: OnStep | None = None,
             device: str | torch.device = "cpu") -> list[Image.Image]:
    """An unconditional pixel model (a diffusers ``DDPMPipeline`` folder's UNet and scheduler) in
    our loop: one picture per seed at the UNet's ``sample_size``, as ``DDPMPipeline`` draws them
    with one generator per picture."""
    gens = make_generators(seeds, "cpu")
    size = unet.config.sample_size
    noise = initial_noise((unet.config.in_channels, size, size), gens).to(device, unet.dtype)
    nothing = ConditioningSchedule([steps], [Conditioning(torch.zeros(len(seeds), 1, 1, device=device))])
    result = sample(unet, _scheduler(scheduler_config), noise, nothing, steps=steps, cfg_scale=1.0, generators=gens,
                    on_step=on_step, family="ddpm", denoise_fn=plain_denoise)
    return pixel_pictures(result.latents)

