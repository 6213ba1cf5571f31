"""ControlNet (Zhang et al. 2023) and T2I-Adapter (Mou et al. 2023) inside our denoising loop.

A request carries ``ControlUnit``s (sd-webui-controlnet's "units"): which model, which picture,
how strongly and when. At run time each unit becomes a ``PreparedControl`` (model + image tensor)
and ``ControlDenoise`` replaces the loop's ``denoise``: every ControlNet is run on the (scaled)
latents, its 12+1 residuals are weighted, summed over units (diffusers' ``MultiControlNetModel``
sums them the same way) and handed to the UNet as ``down_block_additional_residuals`` /
``mid_block_additional_residual``; T2I-Adapter features go in as
``down_intrablock_additional_residuals``. The models are diffusers' ``ControlNetModel`` and
``T2IAdapter``, loaded by ``danqing.models.control``; only the weighting is ours. The units
are ``danqing.request.ControlUnit``.

Weighting, per unit, at model evaluation i of n (diffusers' ``controlnet_keep``):

    keep_i  = 0 if i / n < guidance_start or (i + 1) / n > guidance_end else 1
    r_k    <- r_k * weight * keep_i * s_k            k = 0 .. K (K = the mid block)

with s_k = 1 ("Balanced"), s_k = 0.825 ** (K - k) (sd-webui-controlnet's "soft injection":
"My prompt is more important" and "ControlNet is more important"), or s_k = 10 ** (k / K - 1)
(diffusers' ``guess_mode``: ``torch.logspace(-1, 0, K + 1)``). "ControlNet is more important"
and guess mode also run the ControlNet on the conditional half of the CFG batch only (the
unconditional half gets no residuals: sd-webui-controlnet's ``cfg_injection``, diffusers'
guess mode), so CFG pushes towards the control.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from danqing.errors import IncompatibleModel, InvalidRequest
from danqing.models.control import CROSS_ATTENTION_FAMILY
from danqing.pictures import load_image, resize_image
from danqing.preprocess import inpaint_condition, preprocessor_names, run_preprocessor
from danqing.preprocess.models import render_pose_json
from danqing.request import ControlUnit

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
SOFT_BASE = 0.825  # sd-webui-controlnet hook.py: control_scales = [w * 0.825 ** (12 - i) for i in range(13)]
T2I_SOFT = (0.25, 0.62, 0.825, 1.0)  # sd-webui-controlnet's soft weights for the 4 T2I-Adapter levels


def control_types() -> dict:
    """``data/control.json``: control type -> {"module": preprocessor, "model": ControlNet name}."""
    return json.loads(resources.files("danqing").joinpath("data/control.json").read_text(encoding="utf-8"))["types"]


def a1111_module(name: str, field: str = "module") -> str:
    """An sd-webui-controlnet module name ("canny", "lineart_realistic", "depth_midas", ...) ->
    danqing's preprocessor (``data/control.json``'s ``a1111_modules``; our own names pass)."""
    if name in preprocessor_names():
        return name
    table = json.loads(resources.files("danqing").joinpath("data/control.json").read_text(encoding="utf-8"))["a1111_modules"]
    if name in table:
        return table[name]
    raise InvalidRequest(field, f"unknown preprocessor {name!r}; available: {', '.join(preprocessor_names())} "
                                f"(and sd-webui-controlnet's {', '.join(table)})")


def parse_control_spec(spec: str, *, preprocess: bool = False) -> dict:
    """The CLI's ``TYPE:IMAGE[:WEIGHT]`` -> ControlUnit fields. TYPE is a control type of
    ``data/control.json`` (its ControlNet) or a ControlNet name; IMAGE is a control map, or with
    ``preprocess`` a picture that the type's preprocessor turns into one (pixel perfect)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not kind or not rest:
        raise InvalidRequest("control", f"{spec!r}: expected TYPE:IMAGE or TYPE:IMAGE:WEIGHT, e.g. canny:edges.png:0.8")
    image, weight = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep and head:
        try:
            image, weight = head, float(tail)
        except ValueError:
            pass
    types = control_types()
    entry = types.get(kind)
    module = entry["module"] if (entry and preprocess) else "none"
    if preprocess and not entry:
        raise InvalidRequest("control", f"{kind!r} has no preprocessor; types with one: {', '.join(types)}")
    # preprocessing on the fly works "pixel perfect": the map is made at the output's resolution
    return {"model": entry["model"] if entry else kind, "image": str(Path(image).expanduser().resolve()),
            "weight": weight, "module": module, "pixel_perfect": module != "none"}


# -- pure helpers ---------------------------------------------------------------------------------
def control_keep(i: int, n: int, start: float, end: float) -> float:
    """diffusers' ``controlnet_keep``: 1 while model evaluation i of n lies in [start, end]."""
    return 1.0 - float(i / n < start or (i + 1) / n > end)


def block_scales(n_residuals: int, mode: str, guess: bool) -> list[float]:
    """Per-residual scales s_k, k = 0 .. K (K = n_residuals - 1 is the mid block).

    "Balanced": 1. Soft injection (the other two A1111 modes): 0.825 ** (K - k). Guess mode
    (diffusers): ``torch.logspace(-1, 0, K + 1)``, i.e. 10 ** (k / K - 1).
    """
    K = n_residuals - 1
    if guess:
        return [10.0 ** (k / K - 1.0) for k in range(n_residuals)]
    if mode != "Balanced":
        return [SOFT_BASE ** (K - k) for k in range(n_residuals)]
    return [1.0] * n_residuals


def pixel_perfect_resolution(raw_w: int, raw_h: int, target_w: int, target_h: int, resize_mode: str) -> int:
    """sd-webui-controlnet's "pixel perfect": the preprocessor resolution (short side) at which
    the map lands on the output grid one pixel per pixel after ``resize_mode``."""
    k0, k1 = target_h / raw_h, target_w / raw_w
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(round(k * min(raw_h, raw_w)))


def request_resize_mode(mode: str) -> str:
    """A1111's ControlNet labels -> our ``resize_image`` modes."""
    return mode.lower()


# -- families -------------------------------------------------------------------------------------
def control_family(config) -> str:
    """The base family a ControlNet / adapter config belongs to, from its cross-attention width
    (768 SD1, 1024 SD2, 2048 SDXL) or, for T2I-Adapters, the adapter type."""
    if "adapter_type" in config:  # T2I-Adapter: no text side; SDXL adapters are "full_adapter_xl"
        return "sdxl" if config["adapter_type"] == "full_adapter_xl" else "sd1/sd2"
    dim = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return CROSS_ATTENTION_FAMILY.get(dim, f"custom (cross-attention {dim})")


def unet_family(unet_config, family: str) -> str:
    dim = unet_config.get("cross_attention_dim")
    return family if CROSS_ATTENTION_FAMILY.get(dim) == family or family == "sdxl" and dim == 2048 else f"custom (cross-attention {dim})"


def check_compatible(model_config, unet_config, *, control_name: str, model_name: str, family: str) -> None:
    """A ControlNet must match the UNet's cross-attention width and conditioning (and an adapter
    its channels); otherwise name both families."""
    base = unet_family(unet_config, family)
    mine = control_family(model_config)
    if "adapter_type" in model_config:
        ok = (mine == "sdxl") == (family == "sdxl") and list(model_config["channels"]) == list(
            unet_config["block_out_channels"])[:len(model_config["channels"])]
    else:
        ok = (model_config.get("cross_attention_dim") == unet_config.get("cross_attention_dim")
              and list(model_config.get("block_out_channels", ())) == list(unet_config.get("block_out_channels", ()))
              and model_config.get("addition_embed_type") == unet_config.get("addition_embed_type"))
    if not ok:
        raise IncompatibleModel(f"ControlNet {control_name!r} is a {mine} model but the checkpoint {model_name!r} is "
                                f"{base}; use a ControlNet made for {base}")


# -- preparing units ------------------------------------------------------------------------------
@dataclass
class PreparedControl:
    """One unit ready to run: the model (read-only) and its (1, 3, H, W) image in [0, 1]
    (the inpaint condition has -1 where the picture is to be repainted)."""

    model: object
    kind: str
    image: "torch.Tensor"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "Balanced"
    guess: bool = False


def crop_to(picture, box: tuple[int, int, int, int], width: int, height: int):
    """"Only masked": a picture at the init picture's size cut to ``box`` (x1, y1, x2, y2) and
    resized to width x height exactly as the init picture's crop is (LANCZOS), so map and
    picture stay pixel-aligned (sd-webui-controlnet crops its control image the same way)."""
    return picture.crop(box).resize((width, height), Image.LANCZOS)


def control_map(unit: ControlUnit, width: int, height: int, *, mask=None, models_dir=None, crop=None, picture=None):
    """The unit's picture, preprocessed and fitted to width x height: an RGB PIL image, or for
    the "inpaint" module a (H, W, 3) float array with -1 under ``mask``. An OpenPose unit may
    give a pose JSON file instead of a picture. ``picture``: this picture in place of the
    unit's file (a frame of a clip the unit names).

    Args:
        crop: "only masked" inpainting: ``((full_width, full_height), box)``: the map is made and
            fitted (its resize mode) to the full init picture's size, then cut to ``box`` and
            resized to width x height (``crop_to``), as the init picture is; ``mask`` is then at
            the full size.
    """
    if crop is not None:
        (full_w, full_h), box = crop
        if unit.module == "inpaint":  # crop picture and mask, then mark the mask (no -1 smeared by resizing)
            pic = crop_to(resize_image(load_image(unit.image, "controlnet.image"), full_w, full_h,
                                       request_resize_mode(unit.resize_mode)), box, width, height)
            m = None if mask is None else np.asarray(crop_to(mask.convert("L"), box, width, height), np.float32) / 255
            return inpaint_condition(pic, m)
        return crop_to(control_map(unit, full_w, full_h, mask=mask, models_dir=models_dir, picture=picture), box,
                       width, height)
    mode = request_resize_mode(unit.resize_mode)
    if picture is None and unit.module == "openpose" and str(unit.image).lower().endswith(".json"):
        return resize_image(render_pose_json(unit.image), width, height, mode)
    img = load_image(unit.image, "controlnet.image") if picture is None else picture
    res = (pixel_perfect_resolution(img.width, img.height, width, height, unit.resize_mode)
           if unit.pixel_perfect else unit.processor_res)
    if unit.module == "inpaint":
        fitted = resize_image(img, width, height, mode)
        m = None if mask is None else np.asarray(resize_image(mask.convert("L"), width, height, mode), np.float32) / 255
        return inpaint_condition(fitted, m)
    out = run_preprocessor(unit.module, img, resolution=res, a=unit.threshold_a, b=unit.threshold_b,
                           models_dir=models_dir)
    return resize_image(out.convert("RGB"), width, height, mode)


def image_tensor(picture) -> "torch.Tensor":
    """RGB PIL (or float array) -> (1, 3, H, W) float32 in [0, 1] (diffusers' control image
    processor: ``do_normalize=False``)."""
    a = picture if isinstance(picture, np.ndarray) else np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]


def per_sample(z: "torch.Tensor", n: int) -> "torch.Tensor":
    """A unit's (k, ...) image or features for a batch of ``n``: one picture for every sample,
    or k pictures (a clip's frames, one map per frame) for every group of k samples, as a motion
    UNet lays out its batch (clip after clip, frame after frame)."""
    if z.shape[0] == 1:
        return z.expand(n, *z.shape[1:])
    if n % z.shape[0]:
        raise ValueError(f"{z.shape[0]} control maps cannot be spread over a batch of {n}")
    return z.repeat(n // z.shape[0], *([1] * (z.dim() - 1)))


# -- the denoise function -------------------------------------------------------------------------
@dataclass
class ControlDenoise:
    """A ``denoise`` for the loop (``sampling.loop.sample(denoise_fn=...)``) that adds the
    units' residuals. Made per request (it counts model evaluations); the models are read only.

    The loop calls ``begin(n)`` with the number of model evaluations of a pass before the first.
    """

    units: list[PreparedControl]
    hashes: list[str] = field(default_factory=list)  # each unit's model sha256 (for the infotext)
    n_evals: int = 1
    i: int = 0
    _adapter_cache: dict = field(default_factory=dict)

    def begin(self, n_evals: int) -> None:
        self.n_evals, self.i = max(1, n_evals), 0

    def residuals(self, x, x_in, t, cond, use_cfg: bool, frames: list[int] | None = None):
        """Summed (down residuals, mid residual, adapter features) at this evaluation, each
        already batched like ``x_in``; None where no unit of that kind acts. ``frames``: the
        maps of these frames of a unit that holds one per frame (a context window's)."""
        B = x.shape[0]
        down_sum, mid_sum, adapter_sum = None, None, None
        for u in self.units:
            scale = u.weight * control_keep(self.i, self.n_evals, u.start, u.end)
            if scale == 0.0:
                continue  # exactly what running it at scale 0 would add
            cond_only = use_cfg and (u.guess or u.mode == "ControlNet is more important")
            if u.kind == "t2i":
                feats = self._adapter(u, x)
                s = [scale * w for w in (T2I_SOFT if u.mode != "Balanced" and len(feats) == 4 else [1.0] * len(feats))]
                feats = [per_sample(f, B) * w for f, w in zip(feats, s)]
                if use_cfg:
                    feats = [torch.cat([torch.zeros_like(f) if cond_only else f, f]) for f in feats]
                adapter_sum = feats if adapter_sum is None else [a + b for a, b in zip(adapter_sum, feats)]
                continue
            model = u.model
            c_in = model.config.in_channels
            if cond_only:
                cx, ctx = x[:, :c_in], cond.context[B:]
                added = {k: v[B:] for k, v in cond.added.items()} if cond.added else None
            else:
                cx, ctx, added = x_in[:, :c_in], cond.context, cond.added
            img = u.image if frames is None or u.image.shape[0] == 1 else u.image[frames]
            img = per_sample(img.to(device=cx.device, dtype=cx.dtype), cx.shape[0])
            down, mid = model(cx, t, encoder_hidden_states=ctx, controlnet_cond=img, conditioning_scale=1.0,
                              added_cond_kwargs=added, return_dict=False)
            res = list(down) + [mid]
            s = block_scales(len(res), u.mode, u.guess)
            res = [r * (scale * w) for r, w in zip(res, s)]
            if cond_only:
                res = [torch.cat([torch.zeros_like(r), r]) for r in res]
            if down_sum is None:
                down_sum, mid_sum = res[:-1], res[-1]
            else:
                down_sum = [a + b for a, b in zip(down_sum, res[:-1])]
                mid_sum = mid_sum + res[-1]
        return down_sum, mid_sum, adapter_sum

    def _adapter(self, u: PreparedControl, x):
        key = id(u)
        if key not in self._adapter_cache:
            img = u.image.to(device=x.device, dtype=x.dtype)
            self._adapter_cache[key] = [f for f in u.model(img)]
        return self._adapter_cache[key]

    def __call__(self, unet, x, t, cond, cfg_scale: float, use_cfg: bool):
        x_in = torch.cat([x, x]) if use_cfg else x
        down, mid, adapter = self.residuals(x, x_in, t, cond, use_cfg)
        self.i += 1
        out = unet(x_in, t, encoder_hidden_states=cond.context, added_cond_kwargs=cond.added,
                   down_block_additional_residuals=down, mid_block_additional_residual=mid,
                   down_intrablock_additional_residuals=[a.clone() for a in adapter] if adapter else None,
                   return_dict=False)[0]
        if not use_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + cfg_scale * (text - uncond)


def prepare_units(request, loaded_controls, width: int, height: int, *, mask=None,
                  models_dir=None, crop=None, pictures=None) -> list[PreparedControl]:
    """``request.controlnet`` with its loaded models -> ``PreparedControl``s at width x height.
    ``pictures``: per unit, the frames of the clip it names (each made into its own map: the
    unit's image is then (F, 3, H, W)) or None (its picture, one map for every frame).

    Args:
        loaded_controls: one ``(model, kind)`` per unit, in order (``ModelManager.load_control``).
        mask: the inpaint mask (PIL "L"), for the "inpaint" module.
        crop: "only masked" inpainting: ``((full_width, full_height), box)`` (``control_map``).
    """
    out = []
    for i, (unit, (model, kind)) in enumerate(zip(request.controlnet, loaded_controls)):
        if pictures is not None and pictures[i] is not None:  # one map per frame
            image = torch.cat([image_tensor(control_map(unit, width, height, models_dir=models_dir, picture=p))
                               for p in pictures[i]])
        else:
            image = image_tensor(control_map(unit, width, height, mask=mask, models_dir=models_dir, crop=crop))
        out.append(PreparedControl(model, kind, image, unit.weight, unit.guidance_start,
                                   unit.guidance_end, unit.control_mode, unit.guess_mode))
    return out
