"""txt2img: noise -> denoised latents, batch after batch (``Studio.generate`` steps 3 and 4)."""

from __future__ import annotations

from danqing.conditioning.schedule import ConditioningContext, build_conditioning
from danqing.decode import vae_scale_factor
from danqing.passes.batches import Batches, PassResult
from danqing.sampling.noise import initial_noise


def run_txt2img(comps, request, *, device, dtype, on_step=None, context: ConditioningContext | None = None,
                denoising_end: float | None = None, control=None) -> PassResult:
    """Condition, then sample every batch from noise; the latents are not decoded (a refiner
    or hires pass may follow).

    Args:
        comps: loaded ``Components``.
        request: the ``GenerationRequest``.
        context: the request's embeddings and image prompt (``ConditioningContext``).
        denoising_end: stop at this fraction of the schedule (the SDXL base before its refiner).
        control: a ``conditioning.control.ControlDenoise`` (ControlNet / T2I-Adapter units) or None.
    """
    context = context or ConditioningContext()
    # 3. condition: every distinct prompt of the prompt-editing schedules, padded to one length.
    encoder = context.text_encoder(comps, request.clip_skip)
    cond = build_conditioning(encoder, request, batch=request.batch_size, image_prompt=context.image_prompt)

    # 4. sample: a fresh scheduler and per-image generators for each batch.
    factor = vae_scale_factor(comps.vae)
    shape = (comps.latent_channels, request.height // factor, request.width // factor)
    batches = Batches(request, device)
    for batch in batches:
        noise = initial_noise(shape, batch.generators, subseeds=batch.subseeds,
                              subseed_strength=request.subseed_strength)
        sampled = batch.sample(comps, noise.to(device=device, dtype=dtype), cond, sampler=request.sampler,
                               schedule=request.schedule, steps=request.steps, cfg_scale=request.cfg_scale,
                               on_step=on_step, denoising_end=denoising_end, shift=getattr(request, "shift", None),
                               **({"denoise_fn": control} if control is not None else {}))
        batches.record(batch, sampled)
    return batches.result


def run_sampling(comps, request, *, device, dtype, on_step=None, denoising_end: float | None = None, control=None,
                 context: ConditioningContext | None = None):
    """``run_txt2img`` as a tuple, for training (sample grids, evaluation during a run).

    Returns:
        (latents per batch, seeds, subseeds, interrupted).
    """
    out = run_txt2img(comps, request, device=device, dtype=dtype, on_step=on_step, context=context,
                      denoising_end=denoising_end, control=control)
    return out.latents, out.seeds, out.subseeds, out.interrupted
