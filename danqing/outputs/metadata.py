"""GenerationRequest <-> A1111 infotext ``parameters``: what makes an image reproduce from its file."""

from __future__ import annotations

import json
import re

from danqing.errors import ImageError, InvalidRequest
from danqing.outputs.infotext import format_infotext, parse_infotext, split_legacy_sampler
from danqing.conditioning.regions import region_fields, region_params
from danqing.customise.speedups import speed_fields, speed_params
from danqing.request import GenerationRequest
from danqing.sampling.flow import FLOW_FAMILIES
from danqing.sampling.samplers import resolve_schedule, samplers, schedule_names

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
    extra_params: dict[str, object] | None = None,
    family: str | None = None,
) -> str:
    """The A1111 infotext of one image of ``request`` (its own seed, i.e. seed + i in a batch).

    ``ti_hashes``: A1111's ``TI hashes`` value (``"name: hash12, ..."``) of the textual-inversion
    embeddings the prompts used (``danqing.customise.embeddings.ti_hashes``). ``extra_params``:
    more ``key: value`` pairs written before ``Version`` and ignored when read back (the
    ``Template`` of a dynamic prompt, an X/Y/Z plot's axes). ``family``: the model's ("sd3" and
    "flux" resolve the schedule type in the flow-matching sampler table)."""

    variation = request.subseed_strength > 0
    params = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "Schedule type": resolve_schedule(request.sampler, request.schedule, flow=family in FLOW_FAMILIES),
        "CFG scale": request.cfg_scale,
        "Distilled CFG Scale": request.distilled_cfg_scale,  # Forge's keys (FLUX; flow-matching models)
        "Shift": request.shift,
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
    # Forge's "Module N": the text encoder files of an SD3 / FLUX file that holds none
    params.update({f"Module {i}": name for i, name in enumerate(request.text_encoders, 1)})
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
    params.update(speed_params(request))
    params.update(extra_params or {})
    params.update(region_params(request.regions))
    params["Version"] = VERSION
    return format_infotext(request.prompt, request.negative_prompt, params)


def _window_text(window: tuple[float, float]) -> str:
    return f"{window[0]:g}-{window[1]:g}"


def _window(text: str) -> tuple[float, float]:
    a, b = text.split("-")
    return float(a), float(b)


def _hires_resize(r: GenerationRequest) -> str | None:
    if not (r.hr_resize_x or r.hr_resize_y):
        return None
    w, h = r.hr_size
    return f"{w}x{h}"


def _size(text: str) -> tuple[int, int]:
    x, y = text.lower().split("x")
    return int(x), int(y)


def _reweight(text: str) -> tuple[tuple[str, float], ...] | None:
    return tuple((w, float(x)) for w, x in (item.rsplit("=", 1) for item in text.split())) or None


# When each group of editing fields is written (from the request) and read (from the infotext's
# parameters); reading a group also sets these request fields.
_GROUPS = {
    "denoise": (lambda r: r.init_image is not None or r.enable_hr, lambda p: True, {}),
    "init": (lambda r: r.init_image is not None, lambda p: True, {}),
    "mask": (lambda r: r.mask is not None, lambda p: True, {}),
    "hires": (lambda r: r.enable_hr, lambda p: any(k in p for k in ("Hires upscaler", "Hires upscale", "Hires resize")),
              {"enable_hr": True}),
    "p2p": (lambda r: r.p2p_source is not None, lambda p: "P2P source" in p, {}),
}

# The img2img / inpaint / hires fix / Prompt-to-Prompt parameters, as A1111 names them (danqing
# adds "Init image", "Mask", "Resize mode" and the P2P keys, which A1111's readers ignore), in
# the order they are written. One row: (infotext key, request field(s), group, write, read):
# ``write(request)`` gives the value (None: not written; a field name: the field as it is),
# ``read(text)`` the field's value (None: left at its default; a tuple for several fields).
EDITING_FIELDS: tuple[tuple[str, str | tuple[str, ...], str, object, object], ...] = (
    ("Denoising strength", "denoising_strength", "denoise", None, float),
    ("Init image", "init_image", "init", None, str),
    ("Resize mode", "resize_mode", "init", lambda r: r.resize_mode if r.resize_mode != "just resize" else None, str),
    ("Image CFG scale", "image_cfg_scale", "init", lambda r: r.image_cfg_scale if r.image_cfg_scale != 1.5 else None,
     float),
    ("Mask", "mask", "mask", None, str),
    ("Mask blur", "mask_blur", "mask", None, int),
    ("Masked content", "inpainting_fill", "mask", None, str),
    ("Inpaint area", "inpaint_full_res", "mask", lambda r: "Only masked" if r.inpaint_full_res else "Whole picture",
     lambda v: True if v == "Only masked" else None),
    ("Masked area padding", "inpaint_full_res_padding", "mask",
     lambda r: r.inpaint_full_res_padding if r.inpaint_full_res else None, int),
    ("Mask mode", "inpainting_mask_invert", "mask", lambda r: "Inpaint not masked" if r.inpainting_mask_invert else None,
     lambda v: True if v == "Inpaint not masked" else None),
    ("Hires upscale", "hr_scale", "hires", lambda r: r.hr_scale if not (r.hr_resize_x or r.hr_resize_y) else None,
     float),
    ("Hires resize", ("hr_resize_x", "hr_resize_y"), "hires", _hires_resize, _size),
    ("Hires steps", "hr_second_pass_steps", "hires", lambda r: r.hr_second_pass_steps or None, int),
    ("Hires upscaler", "hr_upscaler", "hires", None, str),
    ("Hires sampler", "hr_sampler_name", "hires", None, str),
    ("Hires prompt", "hr_prompt", "hires", None, str),
    ("Hires negative prompt", "hr_negative_prompt", "hires", None, str),
    ("P2P source", "p2p_source", "p2p", None, str),
    ("P2P cross", "p2p_cross", "p2p", lambda r: _window_text(r.p2p_cross), _window),
    ("P2P self", "p2p_self", "p2p", lambda r: _window_text(r.p2p_self), _window),
    ("P2P reweight", "p2p_reweight", "p2p", lambda r: " ".join(f"{w}={f:g}" for w, f in r.p2p_reweight) or None,
     _reweight),
    ("P2P local blend", "p2p_local_blend", "p2p", lambda r: True if r.p2p_local_blend else None,
     lambda v: v.lower() == "true"),
    ("P2P features", "p2p_features", "p2p", lambda r: r.p2p_features or None, float),
    ("Null-text iterations", "null_text_iterations", "p2p",
     lambda r: r.null_text_iterations if r.init_image is not None else None, int),
)


def editing_params(request: GenerationRequest, control_hashes: list[str] | None = None) -> dict:
    """img2img / inpaint / hires fix / Prompt-to-Prompt parameters (``EDITING_FIELDS``), then the
    ControlNet units."""
    p: dict = {}
    for key, name, group, write, _ in EDITING_FIELDS:
        if _GROUPS[group][0](request):
            p[key] = getattr(request, name) if write is None else write(request)
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


def _editing_fields(params: dict) -> dict:
    """The inverse of ``editing_params``."""
    f: dict = {}
    for group, (_, present, implied) in _GROUPS.items():
        if present(params):
            f.update(implied)
    for key, name, group, _, read in EDITING_FIELDS:
        if key not in params or not _GROUPS[group][1](params):
            continue
        value = read(params[key])
        if value is None:
            continue
        if isinstance(name, tuple):
            f.update(zip(name, value))
        else:
            f[name] = value
    units = sorted((int(k.split()[1]), v) for k, v in params.items() if re.fullmatch(r"ControlNet \d+", k))
    if units:
        f["controlnet"] = tuple(control_unit_fields(v) for _, v in units)
    return f


def request_from_infotext(text: str) -> GenerationRequest:
    """Re-create the request that produced an image from its infotext (batch of one).

    Reads A1111's own images too: pre-1.9 "DPM++ 2M Karras" sampler names are split, and a
    missing "RNG: CPU" means A1111's default GPU noise.
    """

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
        for key, name in (("Distilled CFG Scale", "distilled_cfg_scale"), ("Shift", "shift")):
            if key in params:
                fields[name] = float(params[key])
        fields.update(_editing_fields(params))
        from danqing.customise.ip_adapter import ip_adapter_fields

        fields.update(ip_adapter_fields(params))
        fields.update(speed_fields(params))
        fields.update(region_fields(params))
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
    fields["text_encoders"] = tuple(v for _, v in sorted((int(k.split()[1]), v) for k, v in params.items()
                                                        if re.fullmatch(r"Module \d+", k)))
    fields["rng"] = "cpu" if params.get("RNG", "").upper() == "CPU" else "gpu"
    try:
        return GenerationRequest.create(**fields)
    except InvalidRequest as exc:
        raise ImageError(f"the infotext does not make a valid request: {exc}") from None
