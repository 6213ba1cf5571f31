"""GenerationRequest <-> A1111 infotext ``parameters``: what makes an image reproduce from its file."""

from __future__ import annotations

from danqing.errors import ImageError, InvalidRequest
from danqing.outputs.infotext import format_infotext, parse_infotext, split_legacy_sampler
from danqing.request import GenerationRequest

VERSION = "danqing 0.1.0"


def request_infotext(
    request: GenerationRequest,
    *,
    seed: int,
    subseed: int | None,
    model_name: str,
    model_hash: str,
    vae_name: str | None = None,
    vae_hash: str | None = None,
) -> str:
    """The A1111 infotext of one image of ``request`` (its own seed, i.e. seed + i in a batch)."""
    from danqing.sampling.samplers import resolve_schedule

    variation = request.subseed_strength > 0
    params = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "Schedule type": resolve_schedule(request.sampler, request.schedule),
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash[:10],
        "Model": model_name,
        "VAE hash": vae_hash[:10] if vae_hash else None,
        "VAE": vae_name,
        "Variation seed": subseed if variation else None,
        "Variation seed strength": request.subseed_strength if variation else None,
        "Clip skip": request.clip_skip if request.clip_skip != 1 else None,
        "RNG": "CPU" if request.rng == "cpu" else None,
        "Version": VERSION,
    }
    return format_infotext(request.prompt, request.negative_prompt, params)


def request_from_infotext(text: str) -> GenerationRequest:
    """Re-create the request that produced an image from its infotext (batch of one).

    Reads A1111's own images too: pre-1.9 "DPM++ 2M Karras" sampler names are split, and a
    missing "RNG: CPU" means A1111's default GPU noise.
    """
    from danqing.sampling.samplers import samplers, schedule_names

    prompt, negative, params = parse_infotext(text)
    if "Steps" not in params:
        raise ImageError("the infotext has no 'Steps:' parameter line; it was not written by A1111 or danqing")
    fields: dict = {"prompt": prompt, "negative_prompt": negative}
    try:
        fields["steps"] = int(params["Steps"])
        if "Sampler" in params:
            sampler, schedule = split_legacy_sampler(params["Sampler"], samplers(), schedule_names())
            fields["sampler"] = sampler
            fields["schedule"] = params.get("Schedule type") or schedule or "Automatic"
        if "CFG scale" in params:
            fields["cfg_scale"] = float(params["CFG scale"])
        if "Seed" in params:
            fields["seed"] = int(params["Seed"])
        if "Size" in params:
            w, h = params["Size"].lower().split("x")
            fields["width"], fields["height"] = int(w), int(h)
        if "Variation seed" in params:
            fields["subseed"] = int(params["Variation seed"])
            fields["subseed_strength"] = float(params.get("Variation seed strength", 0))
        if "Clip skip" in params:
            fields["clip_skip"] = int(params["Clip skip"])
    except ValueError as exc:
        raise ImageError(f"the infotext has a malformed value ({exc})") from None
    fields["model"] = params.get("Model") or params.get("Model hash")
    fields["vae"] = params.get("VAE")
    fields["rng"] = "cpu" if params.get("RNG", "").upper() == "CPU" else "gpu"
    try:
        return GenerationRequest.create(**fields)
    except InvalidRequest as exc:
        raise ImageError(f"the infotext does not make a valid request: {exc}") from None
