"""Our denoising loop: CFG, prompt editing, per-step callbacks, interrupt.

It follows diffusers' ``StableDiffusionPipeline.__call__`` / ``StableDiffusionXLPipeline.__call__``
step for step (parity is a test), but owns the loop so that conditioning can change per step
(A1111 prompt editing) and a callback can watch or stop it. ``denoise`` -- the model call plus
CFG -- has no data-dependent Python control flow and static shapes, so it can be wrapped in
``torch.compile``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch

from danqing.decode import cheap_preview
from danqing.sampling.flow import DENOISERS, img2img_start, noised, timestep_kwargs


class StepControl(enum.Enum):
    """What an ``on_step`` callback may return: None/CONTINUE goes on, STOP interrupts cleanly,
    SKIP ends the current batch where it is (A1111's "skip": its pictures are kept as they are)
    and goes on with the next one."""

    CONTINUE = "continue"
    STOP = "stop"
    SKIP = "skip"


STOP = StepControl.STOP
SKIP = StepControl.SKIP


@dataclass
class StepInfo:
    """Handed to ``on_step`` after every sampler step.

    Attributes:
        step: 1-based sampler step just finished; total: steps in this pass.
        latents: the current latents (read-only!), (B, 4, h, w).
        batch_index, batch_count: which pass of a multi-pass request this is.
    """

    step: int
    total: int
    latents: torch.Tensor
    family: str
    batch_index: int = 0
    batch_count: int = 1

    def preview(self):
        """A cheap RGB PIL preview of the first image (linear latent approximation, no VAE)."""
        return cheap_preview(self.latents, self.family)


OnStep = Callable[[StepInfo], "StepControl | None | bool"]


@dataclass
class Conditioning:
    """Everything the UNet is conditioned on at one step, already batched for CFG.

    Attributes:
        context: (2B, T, D) [uncond; cond] text hidden states, or (B, T, D) without CFG.
        added: SDXL ``added_cond_kwargs`` {"text_embeds": (2B, 1280), "time_ids": (2B, 6)} or None;
            SD3 / FLUX: {"pooled": (2B, P)} and, for FLUX, {"guidance": distilled CFG scale}
            (``sampling.flow``).
    """

    context: torch.Tensor
    added: dict | None = None


@dataclass
class ConditioningSchedule:
    """Conditioning per sampler step: entry i is used up to and including 0-based step ``ends[i]``
    (A1111 ``reconstruct_cond_batch``: the first entry with step <= end_at_step)."""

    ends: list[int]
    conds: list[Conditioning]

    def at(self, step: int) -> Conditioning:
        for end, cond in zip(self.ends, self.conds):
            if step <= end:
                return cond
        return self.conds[-1]


def denoise(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
    """One model evaluation with classifier-free guidance (Ho & Salimans 2022).

    eps = eps_u + s * (eps_c - eps_u), with the unconditional and conditional branches run as
    one (2B, ...) batch. ``x`` is already scaled by the scheduler. Returns (B, 4, h, w).
    """
    x_in = torch.cat([x, x]) if use_cfg else x
    added = {} if cond.added is None else {"added_cond_kwargs": cond.added}  # a 3D UNet takes none
    out = unet(x_in, t, encoder_hidden_states=cond.context, return_dict=False, **added)[0]
    if not use_cfg:
        return out
    uncond, text = out.chunk(2)
    return uncond + cfg_scale * (text - uncond)


@dataclass
class SampleResult:
    latents: torch.Tensor
    interrupted: bool = False
    steps_done: int = 0
    skipped: bool = False
    extra: dict = field(default_factory=dict)


def sample(
    unet,
    scheduler,
    noise: torch.Tensor,
    schedule: ConditioningSchedule,
    *,
    steps: int,
    cfg_scale: float,
    generators: list[torch.Generator] | None = None,
    on_step: OnStep | None = None,
    family: str = "sd1",
    batch_index: int = 0,
    batch_count: int = 1,
    denoise_fn=None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    masked_image_latents: torch.Tensor | None = None,
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
) -> SampleResult:
    """Run the sampler from pure noise (txt2img) or from a noised picture (img2img, inpaint) to
    clean latents.

    Args:
        unet: the diffusers UNet (eval mode, on its device).
        scheduler: a fresh diffusers scheduler (never reused across requests).
        noise: (B, 4, h, w) unit-variance noise on the UNet's device and dtype.
        schedule: conditioning per step (prompt editing), see ``ConditioningSchedule``.
        steps: number of sampler steps.
        cfg_scale: guidance weight; 1 disables CFG (the uncond branch is not run).
        generators: per-image generators for ancestral/stochastic samplers.
        on_step: called after every sampler step; returning STOP (or False) interrupts, SKIP
            ends this batch early (``skipped``; not ``interrupted``, so callers go on).
        denoise_fn: the model+CFG function (``torch.compile(denoise)`` works here); None = the
            family's (``denoise``, or ``sampling.flow.DENOISERS`` for SD3 / FLUX). One with a
            ``begin(n)`` method is told the number of model evaluations of this pass first
            (ControlNet's guidance start/end, ``conditioning.control.ControlDenoise``).
        init_latents: (B, 4, h, w) scaled latents of the init picture (img2img, inpaint).
        strength: img2img denoising strength in (0, 1]: as diffusers' img2img pipelines, the
            last steps run (``flow.img2img_start``: which, per family), from the picture noised
            to the first of them. 1 starts from pure noise.
        mask: (B, 1, h, w) latent mask, 1 = repaint. With a 4-channel UNet the area outside it
            is replaced after every step by the init latents noised to the next step's level
            (diffusers' inpaint pipeline, A1111's latent blending).
        masked_image_latents: (B, 4, h, w) latents of the picture with the masked area
            blanked; given, the UNet is an inpainting UNet (9 input channels: latents, mask,
            masked picture).
        after_step: ``f(i, latents) -> latents`` after every scheduler step i (0-based model
            evaluation); Prompt-to-Prompt's local blending uses it.
        denoising_end: stop where the schedule passes this fraction of the training timesteps
            (diffusers' ``denoising_end``: the SDXL base hands its latents to the refiner there).
        denoising_start: continue ``init_latents`` -- already noisy latents -- from this fraction
            of the training timesteps on, without adding noise (the refiner's side).
    """
    use_cfg = cfg_scale > 1.0
    denoise_fn = DENOISERS.get(family, denoise) if denoise_fn is None else denoise_fn
    # flow families: FLUX's own sigmas and the resolution-dependent shift (mu), as their pipelines
    patch = getattr(getattr(unet, "config", None), "patch_size", 2)
    scheduler.set_timesteps(steps, device=noise.device, **timestep_kwargs(scheduler, family, noise.shape, steps, patch))
    timesteps = scheduler.timesteps
    order = getattr(scheduler, "order", 1)
    total = steps
    n_train = scheduler.config.num_train_timesteps
    if denoising_start is not None:
        cutoff = int(round(n_train - denoising_start * n_train))
        n = int((timesteps < cutoff).sum())
        if order == 2 and n % 2 == 0:
            n += 1
        t_start = len(timesteps) - n
        timesteps = timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        latents = init_latents
    elif init_latents is not None and strength < 1.0:
        # at least one step: diffusers refuses int(steps * strength) == 0, A1111 runs the last
        # (smallest-sigma) step; so do we (a 0-step pass would decode an empty batch)
        t_start = img2img_start(family, steps, strength)
        timesteps = timesteps[t_start * order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * order)
        total = steps - t_start
        latents = noised(scheduler, init_latents, noise, timesteps[:1].repeat(noise.shape[0]))
    else:
        latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # x_T = sigma_max * eps (1: DDPM, flow)
    if denoising_end is not None:
        cutoff = int(round(n_train - denoising_end * n_train))
        timesteps = timesteps[:int((timesteps >= cutoff).sum())]
    if denoising_start is not None or denoising_end is not None:
        total = len(timesteps) // order + (1 if len(timesteps) % order else 0)
    blend = mask is not None and masked_image_latents is None
    if hasattr(denoise_fn, "begin"):  # a per-request denoise that needs the pass length (ControlNet)
        denoise_fn.begin(len(timesteps))
    step_kwargs = {"generator": generators} if generators is not None and _takes_generator(scheduler) else {}
    done = 0
    for i, t in enumerate(timesteps):
        cond = schedule.at(done)
        x = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        if masked_image_latents is not None:
            x = torch.cat([x, mask, masked_image_latents], dim=1)
        eps = denoise_fn(unet, x, t, cond, cfg_scale, use_cfg)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        if blend:
            proper = init_latents
            if i < len(timesteps) - 1:
                proper = noised(scheduler, init_latents, noise, timesteps[i + 1:i + 2])
            latents = (1 - mask) * proper + mask * latents
        if after_step is not None:
            latents = after_step(i, latents)
        # Multi-evaluation samplers (Heun, DPM2) report one step per `order` evaluations.
        if i == len(timesteps) - 1 or (i + 1) % order == 0:
            done += 1
            if on_step is not None:
                answer = on_step(StepInfo(done, total, latents, family, batch_index, batch_count))
                if answer is StepControl.SKIP:
                    return SampleResult(latents, interrupted=False, steps_done=done, skipped=True)
                if answer is StepControl.STOP or answer is False:
                    return SampleResult(latents, interrupted=True, steps_done=done)
    return SampleResult(latents, interrupted=False, steps_done=done)


def _takes_generator(scheduler) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters
