"""sd-webui-controlnet units in A1111 requests (``alwayson_scripts.controlnet.args``): ControlNet
units become ``ControlUnit`` fields, an IP-Adapter unit becomes the request's image prompt. The
mapping is data, as for the request fields in ``server/a1111.py``: ``CONTROLNET_TO_UNIT``,
``CONTROLNET_SHELL``, ``CONTROLNET_NEUTRAL`` (docs/control.md). Pure: no files, no models."""

from __future__ import annotations

import re
from typing import Any

from danqing.conditioning.control import a1111_module
from danqing.errors import InvalidRequest

# sd-webui-controlnet: alwayson_scripts.controlnet.args[i] (its ControlNetUnit field names) -> ControlUnit.
CONTROLNET_TO_UNIT = {
    "module": "module", "model": "model", "weight": "weight", "resize_mode": "resize_mode",
    "processor_res": "processor_res", "threshold_a": "threshold_a", "threshold_b": "threshold_b",
    "guidance_start": "guidance_start", "guidance_end": "guidance_end", "pixel_perfect": "pixel_perfect",
    "control_mode": "control_mode", "guessmode": "guess_mode",
}
CONTROLNET_SHELL = {"image", "input_image", "enabled"}
CONTROLNET_NEUTRAL: dict[str, tuple] = {
    "low_vram": (None, False), "lowvram": (None, False), "save_detected_map": "any", "is_ui": "any",
    "hr_option": (None, "Both", "Low res only", "High res only"), "mask": (None, ""), "mask_image": (None, ""),
    "loopback": (None, False), "processor_res_default": "any",
}
CONTROL_MODES = ["Balanced", "My prompt is more important", "ControlNet is more important"]  # index order
CONTROL_RESIZE = ["Just Resize", "Crop and Resize", "Resize and Fill"]  # index order
# sd-webui-controlnet's older resize labels
CONTROL_RESIZE_ALIASES = {"Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}


def neutral_ok(value: Any, allowed) -> bool:
    """``value`` is one of ``allowed`` (True is not 1 here, False is not 0)."""
    return allowed == "any" or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


# sd-webui-controlnet unit fields accepted at these values only (the extension's defaults)
_UNIT_NEUTRAL = {"guidance_start": (0, 0.0), "guidance_end": (1, 1.0), "mask": (None,), "effective_region_mask": (None,),
                 "advanced_weighting": (None,), "ipadapter_input": (None,)}


# Regional Prompter (hako-mikan/sd-webui-regional-prompter): alwayson_scripts["Regional Prompter"]
# ["args"] is its ``ui()`` list: active, debug, tab, Matrix submode, Mask submode, Prompt submode,
# ratios, base ratios, use base, use common, use common negative, calc mode, options, LoRA neg TE
# ratios, LoRA neg U ratios, threshold, mask, LoRA stop step, LoRA hires stop step, flip.
REGIONAL_PROMPTER = "regional prompter"
_RP_ARGS = ("active", "debug", "tab", "matrix", "mask_mode", "prompt_mode", "ratios", "base_ratios", "use_base",
            "use_common", "use_common_negative", "calc", "options", "lnter", "lnur", "threshold", "mask", "lstop",
            "lstop_hr", "flip")


def without_regional_prompter(alwayson: Any) -> Any:
    """``alwayson_scripts`` less Regional Prompter's entry (``regional_prompter`` reads it)."""
    if not isinstance(alwayson, dict):
        return alwayson
    return {k: v for k, v in alwayson.items() if str(k).casefold() != REGIONAL_PROMPTER}


def regional_prompter(alwayson: Any) -> dict | None:
    """Regional Prompter's args -> ``GenerationRequest.regions`` fields, None when it is absent or
    not active. Its Attention mode's Matrix tab (Columns, Rows) is understood; the Mask tab (a
    coloured mask picture), Prompt mode, Latent mode, Random and its options are refused by name."""
    if not isinstance(alwayson, dict):
        return None
    script = next((v for k, v in alwayson.items() if str(k).casefold() == REGIONAL_PROMPTER), None)
    if script is None:
        return None
    args = script.get("args") if isinstance(script, dict) else None
    where = "alwayson_scripts.Regional Prompter.args"
    if not isinstance(args, list) or not args:
        raise InvalidRequest(where, "must be Regional Prompter's list of settings (active, debug, tab, ...)")
    a = dict(zip(_RP_ARGS, args))
    if a["active"] is not True:
        return None
    tab, sub, calc = a.get("tab", "Matrix"), a.get("matrix", "Columns"), a.get("calc", "Attention")
    sub = {"Horizontal": "Columns", "Vertical": "Rows"}.get(sub, sub)
    for name, bad, allowed in (
            ("tab", tab not in ("Matrix", "Nope"), "Matrix (Columns, Rows); the Mask and Prompt tabs are not available"),
            ("matrix", sub not in ("Columns", "Rows"), "Columns or Rows"),
            ("calc", calc != "Attention", "Attention (the Latent mode is not available)"),
            ("options", bool(a.get("options")), "no options ([] or false)")):
        if bad:
            raise InvalidRequest(f"{where}.{_RP_ARGS.index(name)}", f"{a.get(name)!r} is not supported by danqing; "
                                 f"use {allowed}")
    ratios = str(a.get("ratios", "1,1"))
    if a.get("flip") is True:  # Regional Prompter's "flip , and ;"
        ratios = ratios.replace(",", "\0").replace(";", ",").replace("\0", ";")
    return {"mode": sub, "ratios": ratios, "base_ratios": str(a.get("base_ratios", "0.2")),
            "use_base": a.get("use_base") is True, "use_common": a.get("use_common") is True,
            "use_common_negative": a.get("use_common_negative") is True}


def is_ip_adapter_unit(unit: dict) -> bool:
    """A ControlNet-extension unit that is an image prompt (its module is an ``ip-adapter`` one)."""
    return str(unit.get("module", "none")).startswith("ip-adapter")


def ip_adapter_unit(alwayson: dict) -> tuple[dict[str, Any], list[str]]:
    """IP-Adapter as A1111 clients send it: a unit of the ControlNet extension
    (``alwayson_scripts={"controlnet": {"args": [{"enabled": true, "module": "ip-adapter_clip_sd15",
    "model": "ip-adapter_sd15 [hash]", "weight": 0.8, "image": <base64>}]}}``; sd-webui-controlnet
    ``internal_controlnet/args.py`` ``ControlNetUnit``).

    Returns:
        (GenerationRequest fields, base64 pictures). Anything else in ``alwayson_scripts`` --
        other scripts, ControlNet units that are not IP-Adapters, more than one enabled unit --
        is refused naming it.
    """
    alwayson = without_regional_prompter(alwayson)  # regional_prompter reads it
    if not alwayson:
        return {}, []
    if not isinstance(alwayson, dict) or set(k.casefold() for k in alwayson) != {"controlnet"}:
        names = ", ".join(map(str, alwayson)) if isinstance(alwayson, dict) else type(alwayson).__name__
        raise InvalidRequest("alwayson_scripts", f"danqing runs no A1111 scripts ({names}); only the ControlNet "
                                                 "extension's IP-Adapter units are understood")
    script = next(iter(alwayson.values()))
    units = script.get("args") if isinstance(script, dict) else script
    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise InvalidRequest("alwayson_scripts", "controlnet must be {\"args\": [unit, ...]} with units as objects")
    units = [u for u in units if u.get("enabled", True) and is_ip_adapter_unit(u)]  # the others: controlnet_units
    if not units:
        return {}, []
    if len(units) > 1:
        raise InvalidRequest("alwayson_scripts", f"danqing takes one IP-Adapter unit per request, got {len(units)} enabled units")
    unit = units[0]
    module = str(unit.get("module", "none"))
    if "face_id" in module:
        raise InvalidRequest("alwayson_scripts", f"ControlNet unit module {module!r} is not supported; danqing takes "
                                                 "IP-Adapter units (module ip-adapter_clip_sd15, ip-adapter_clip_sdxl, "
                                                 "ip-adapter-auto)")
    for name, allowed in _UNIT_NEUTRAL.items():
        if name in unit and unit[name] not in allowed:
            raise InvalidRequest("alwayson_scripts", f"IP-Adapter unit field {name!r} is not supported by danqing yet; "
                                                     f"leave it unset")
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):
        image = [image]
    if isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and image and all(isinstance(i, dict) and isinstance(i.get("image"), str) for i in image):
        images = [i["image"] for i in image]
    else:
        raise InvalidRequest("alwayson_scripts", "the IP-Adapter unit needs \"image\": a base64 picture (or a list "
                                                 "of {\"image\": base64})")
    fields: dict[str, Any] = {}
    model = unit.get("model")
    if isinstance(model, str) and model not in ("", "None"):
        fields["ip_adapter"] = re.sub(r" \[[0-9a-fA-F]+\]$", "", model)
    if "weight" in unit:
        fields["ip_adapter_weight"] = unit["weight"]
    return fields, images


def controlnet_units(alwayson: dict[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """(ControlUnit fields without ``image``, the unit's image as sent) for every enabled unit of
    ``alwayson_scripts`` (pure). Other always-on scripts, unknown unit fields and values danqing
    cannot honour are refused naming the field; A1111 module names map through
    ``data/control.json``'s ``a1111_modules``."""
    alwayson = without_regional_prompter(alwayson)  # regional_prompter reads it
    unknown = [k for k in alwayson if k.casefold() != "controlnet"]
    if unknown:
        raise InvalidRequest("alwayson_scripts", f"{unknown[0]!r} is not available in danqing; only 'controlnet' "
                             "and 'Regional Prompter' are")
    if not alwayson:
        return []
    script = next(iter(alwayson.values()))
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise InvalidRequest("alwayson_scripts.controlnet", "must be {\"args\": [unit, ...]}")
    out = []
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args.{i}"
        if not isinstance(unit, dict):
            raise InvalidRequest(where, "must be an object of sd-webui-controlnet unit fields")
        if unit.get("enabled", True) is False or is_ip_adapter_unit(unit):  # IP-Adapter: ip_adapter_unit
            continue
        fields: dict[str, Any] = {}
        for name, value in unit.items():
            if name in CONTROLNET_TO_UNIT:
                fields[CONTROLNET_TO_UNIT[name]] = value
            elif name in CONTROLNET_NEUTRAL:
                if not neutral_ok(value, CONTROLNET_NEUTRAL[name]):
                    raise InvalidRequest(f"{where}.{name}", "not supported by danqing yet; leave it unset")
            elif name not in CONTROLNET_SHELL:
                allowed = sorted(set(CONTROLNET_TO_UNIT) | CONTROLNET_SHELL | set(CONTROLNET_NEUTRAL))
                raise InvalidRequest(f"{where}.{name}", f"unknown ControlNet unit field; allowed: {', '.join(allowed)}")
        image = unit.get("image") if unit.get("image") is not None else unit.get("input_image")
        if isinstance(image, dict):  # {"image": b64, "mask": b64}
            if image.get("mask"):
                raise InvalidRequest(f"{where}.image.mask", "unit masks are not supported yet; send the image alone")
            image = image.get("image")
        if not image:
            raise InvalidRequest(f"{where}.image", "each enabled unit needs an image (base64)")
        if fields.get("model") in (None, "", "None"):
            raise InvalidRequest(f"{where}.model", "each enabled unit needs a ControlNet model (see /controlnet/model_list)")
        fields["model"] = re.sub(r" \[[0-9a-fA-F]+\]$", "", fields["model"])
        fields["module"] = a1111_module(fields.get("module") or "none", f"{where}.module")
        for name, table in (("control_mode", CONTROL_MODES), ("resize_mode", CONTROL_RESIZE)):
            v = fields.get(name)
            if v is None:
                fields.pop(name, None)
            elif isinstance(v, int) and not isinstance(v, bool):
                if not 0 <= v < len(table):
                    raise InvalidRequest(f"{where}.{name}", f"must be 0-{len(table) - 1} or one of {', '.join(table)}, got {v}")
                fields[name] = table[v]
            elif name == "resize_mode":
                fields[name] = CONTROL_RESIZE_ALIASES.get(v, v)
        for name in ("threshold_a", "threshold_b"):
            if fields.get(name) is not None and fields[name] == -1:
                fields[name] = None  # sd-webui-controlnet: -1 = the module's default
        if fields.get("processor_res") in (-1, None):
            fields.pop("processor_res", None)
        out.append((fields, image))
    return out
