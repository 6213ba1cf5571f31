"""GenerationRequest <-> A1111 infotext ``parameters``: what makes an image reproduce from its file."""

from __future__ import annotations

import json
import re

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
    refiner: tuple[str, str] | None = None,
    lora_hashes: list[tuple[str, str]] | None = None,
    ti_hashes: str | None = None,
    ip_adapter_hash: str | None = None,
    control_hashes: list[str] | None = None,
) -> str:
    """The A1111 infotext of one image of ``request`` (its own seed, i.e. seed + i in a batch).

    ``ti_hashes``: A1111's ``TI hashes`` value (``"name: hash12, ..."``) of the textual-inversion
    embeddings the prompts used (``danqing.customise.embeddings.ti_hashes``)."""
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
    }
    if request.refiner_checkpoint is not None:
        name, digest = refiner if refiner else (request.refiner_checkpoint, "")
        params["Refiner"] = f"{name} [{digest[:10]}]" if digest else name
        params["Refiner switch at"] = request.refiner_switch_at
    params.update(editing_params(request, control_hashes))
    if request.restore_faces:  # A1111: "Face restoration: GFPGAN" (the model's name)
        params["Face restoration"] = request.face_restoration_model or "GFPGAN"
    if lora_hashes:  # A1111: Lora hashes: "name: 12-hex sha256 prefix, ..."
        params["Lora hashes"] = ", ".join(f"{name}: {digest[:12]}" for name, digest in lora_hashes)
    params["TI hashes"] = ti_hashes
    from danqing.customise.ip_adapter import ip_adapter_params

    params.update(ip_adapter_params(request, ip_adapter_hash))
    params["Version"] = VERSION
    return format_infotext(request.prompt, request.negative_prompt, params)


def editing_params(request: GenerationRequest, control_hashes: list[str] | None = None) -> dict:
    """img2img / inpaint / hires fix parameters, as A1111 names them (danqing adds "Init image",
    "Mask" and "Resize mode", which A1111's readers ignore)."""
    p: dict = {}
    if request.init_image is not None or request.enable_hr:
        p["Denoising strength"] = request.denoising_strength
    if request.init_image is not None:
        p["Init image"] = request.init_image
        if request.resize_mode != "just resize":
            p["Resize mode"] = request.resize_mode
        if request.image_cfg_scale != 1.5:
            p["Image CFG scale"] = request.image_cfg_scale
    if request.mask is not None:
        p.update({
            "Mask": request.mask, "Mask blur": request.mask_blur, "Masked content": request.inpainting_fill,
            "Inpaint area": "Only masked" if request.inpaint_full_res else "Whole picture",
            "Masked area padding": request.inpaint_full_res_padding if request.inpaint_full_res else None,
            "Mask mode": "Inpaint not masked" if request.inpainting_mask_invert else None,
        })
    if request.enable_hr:
        w, h = request.hr_size
        p.update({
            "Hires upscale": request.hr_scale if not (request.hr_resize_x or request.hr_resize_y) else None,
            "Hires resize": f"{w}x{h}" if (request.hr_resize_x or request.hr_resize_y) else None,
            "Hires steps": request.hr_second_pass_steps or None,
            "Hires upscaler": request.hr_upscaler,
            "Hires sampler": request.hr_sampler_name,
            "Hires prompt": request.hr_prompt,
            "Hires negative prompt": request.hr_negative_prompt,
        })
    if request.p2p_source is not None:
        p.update({
            "P2P source": request.p2p_source,
            "P2P cross": f"{request.p2p_cross[0]:g}-{request.p2p_cross[1]:g}",
            "P2P self": f"{request.p2p_self[0]:g}-{request.p2p_self[1]:g}",
            "P2P reweight": " ".join(f"{w}={f:g}" for w, f in request.p2p_reweight) or None,
            "P2P local blend": True if request.p2p_local_blend else None,
            "P2P features": request.p2p_features or None,
            "Null-text iterations": request.null_text_iterations if request.init_image is not None else None,
        })
    for i, unit in enumerate(request.controlnet):
        p[f"ControlNet {i}"] = control_unit_text(unit, control_hashes[i] if control_hashes else None)
    return p


# sd-webui-controlnet's infotext keys ("ControlNet 0: \"Module: canny, Model: ..., ...\""); danqing
# adds "Image" (the control picture's path) and "Guess Mode", which its reader ignores.
_UNIT_KEYS = (("Module", "module"), ("Model", "model"), ("Image", "image"), ("Weight", "weight"),
              ("Resize Mode", "resize_mode"), ("Processor Res", "processor_res"), ("Threshold A", "threshold_a"),
              ("Threshold B", "threshold_b"), ("Guidance Start", "guidance_start"), ("Guidance End", "guidance_end"),
              ("Pixel Perfect", "pixel_perfect"), ("Control Mode", "control_mode"), ("Guess Mode", "guess_mode"))


def _unit_value(v) -> str:
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"') else text


def control_unit_text(unit, model_hash: str | None = None) -> str:
    """One unit as sd-webui-controlnet writes it: "Key: value, ..." (values with , : or " quoted);
    the model as its title "name [first 8 hex of sha256]" when the hash is known."""
    parts = []
    for key, name in _UNIT_KEYS:
        v = getattr(unit, name)
        if name == "model" and model_hash:
            v = f"{v} [{model_hash[:8]}]"
        if v is None or (name == "guess_mode" and not v):
            continue
        parts.append(f"{key}: {_unit_value(v)}")
    return ", ".join(parts)


_UNIT_ITEM = re.compile(r'\s*([A-Za-z ]+):\s*("(?:\\.|[^"\\])*"|[^,]*)\s*(?:,|$)')


def control_unit_fields(text: str) -> dict:
    """The inverse of ``control_unit_text`` (also reads sd-webui-controlnet's own units; a model
    title "name [hash]" gives the name)."""
    names = dict(_UNIT_KEYS)
    f: dict = {}
    for key, raw in _UNIT_ITEM.findall(text):
        key = key.strip()
        if key not in names:
            continue
        value = json.loads(raw) if raw.startswith('"') else raw.strip()
        name = names[key]
        if name in ("weight", "guidance_start", "guidance_end", "threshold_a", "threshold_b"):
            value = float(value)
        elif name == "processor_res":
            value = int(float(value))
        elif name in ("pixel_perfect", "guess_mode"):
            value = value.lower() == "true"
        elif name == "model":
            value = re.sub(r" \[[0-9a-fA-F]+\]$", "", value)
        f[name] = value
    return f


def _window(text: str) -> tuple[float, float]:
    a, b = text.split("-")
    return float(a), float(b)


def _editing_fields(params: dict) -> dict:
    """The inverse of ``editing_params``."""
    f: dict = {}
    if "P2P source" in params:
        f["p2p_source"] = params["P2P source"]
        if "P2P cross" in params:
            f["p2p_cross"] = _window(params["P2P cross"])
        if "P2P self" in params:
            f["p2p_self"] = _window(params["P2P self"])
        if params.get("P2P reweight"):
            f["p2p_reweight"] = tuple((w, float(x)) for w, x in (item.rsplit("=", 1) for item in params["P2P reweight"].split()))
        f["p2p_local_blend"] = params.get("P2P local blend", "").lower() == "true"
        if "P2P features" in params:
            f["p2p_features"] = float(params["P2P features"])
        if "Null-text iterations" in params:
            f["null_text_iterations"] = int(params["Null-text iterations"])
    units = sorted((int(k.split()[1]), v) for k, v in params.items() if re.fullmatch(r"ControlNet \d+", k))
    if units:
        f["controlnet"] = tuple(control_unit_fields(v) for _, v in units)
    if "Denoising strength" in params:
        f["denoising_strength"] = float(params["Denoising strength"])
    if "Init image" in params:
        f["init_image"] = params["Init image"]
    if "Image CFG scale" in params:
        f["image_cfg_scale"] = float(params["Image CFG scale"])
    if "Resize mode" in params:
        f["resize_mode"] = params["Resize mode"]
    if "Mask" in params:
        f["mask"] = params["Mask"]
    if "Mask blur" in params:
        f["mask_blur"] = int(params["Mask blur"])
    if "Masked content" in params:
        f["inpainting_fill"] = params["Masked content"]
    if params.get("Inpaint area") == "Only masked":
        f["inpaint_full_res"] = True
    if "Masked area padding" in params:
        f["inpaint_full_res_padding"] = int(params["Masked area padding"])
    if params.get("Mask mode") == "Inpaint not masked":
        f["inpainting_mask_invert"] = True
    if "Hires upscaler" in params or "Hires upscale" in params or "Hires resize" in params:
        f["enable_hr"] = True
        if "Hires upscale" in params:
            f["hr_scale"] = float(params["Hires upscale"])
        if "Hires resize" in params:
            x, y = params["Hires resize"].lower().split("x")
            f["hr_resize_x"], f["hr_resize_y"] = int(x), int(y)
        if "Hires steps" in params:
            f["hr_second_pass_steps"] = int(params["Hires steps"])
        for key, name in (("Hires upscaler", "hr_upscaler"), ("Hires sampler", "hr_sampler_name"),
                          ("Hires prompt", "hr_prompt"), ("Hires negative prompt", "hr_negative_prompt")):
            if key in params:
                f[name] = params[key]
    return f


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
        fields.update(_editing_fields(params))
        from danqing.customise.ip_adapter import ip_adapter_fields

        fields.update(ip_adapter_fields(params))
        if params.get("Face restoration"):
            fields["restore_faces"] = True
            fields["face_restoration_model"] = params["Face restoration"]
        if params.get("Refiner"):
            fields["refiner_checkpoint"] = re.sub(r" \[[0-9a-fA-F]+\]$", "", params["Refiner"])
            if "Refiner switch at" in params:
                fields["refiner_switch_at"] = float(params["Refiner switch at"])
    except ValueError as exc:
        raise ImageError(f"the infotext has a malformed value ({exc})") from None
    fields["model"] = params.get("Model") or params.get("Model hash")
    fields["vae"] = params.get("VAE")
    fields["rng"] = "cpu" if params.get("RNG", "").upper() == "CPU" else "gpu"
    try:
        return GenerationRequest.create(**fields)
    except InvalidRequest as exc:
        raise ImageError(f"the infotext does not make a valid request: {exc}") from None
