"""ControlNet (Zhang et al. 2023) and T2I-Adapter (Mou et al. 2023) inside our denoising loop.

A request carries ``ControlUnit``s (sd-webui-controlnet's "units"): which model, which picture,
how strongly and when. At run time each unit becomes a ``PreparedControl`` (model + image tensor)
and ``ControlDenoise`` replaces the loop's ``denoise``: every ControlNet is run on the (scaled)
latents, its 12+1 residuals are weighted, summed over units (diffusers' ``MultiControlNetModel``
sums them the same way) and handed to the UNet as ``down_block_additional_residuals`` /
``mid_block_additional_residual``; T2I-Adapter features go in as
``down_intrablock_additional_residuals``. The models are diffusers' ``ControlNetModel`` and
``T2IAdapter``; only the weighting is ours.

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from danqing.errors import IncompatibleModel, InvalidRequest

if TYPE_CHECKING:
    import torch

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
SOFT_BASE = 0.825  # sd-webui-controlnet hook.py: control_scales = [w * 0.825 ** (12 - i) for i in range(13)]
T2I_SOFT = (0.25, 0.62, 0.825, 1.0)  # sd-webui-controlnet's soft weights for the 4 T2I-Adapter levels


class ControlUnit(BaseModel):
    """One ControlNet / T2I-Adapter unit (sd-webui-controlnet's field names where it has one).

    Args:
        model: ControlNet or T2I-Adapter name in ``models/controlnet/`` (a diffusers folder, or a
            ControlNet 1.0/1.1 ``.safetensors``/``.pth`` single file), a short hash or a path.
        image: path of the control picture (a photo to preprocess, or an already made map).
        module: preprocessor run on ``image`` first ("none" = the picture is the map;
            ``danqing.preprocess.preprocessors()`` lists them).
        weight: 0-2, multiplies the residuals (A1111 "Control Weight").
        guidance_start, guidance_end: fractions of the steps between which the unit acts.
        control_mode: "Balanced", "My prompt is more important" (residuals fade towards the
            high-resolution blocks, 0.825 ** (12 - k)), "ControlNet is more important" (the same
            fading, and the control only on CFG's conditional half).
        resize_mode: how the control picture is fitted to the output size (A1111's labels).
        pixel_perfect: choose the preprocessor resolution from the output size (ignores
            ``processor_res``).
        processor_res: the short side the preprocessor works at.
        threshold_a, threshold_b: the preprocessor's two parameters (canny: low/high threshold);
            None = its default.
        guess_mode: diffusers' guess mode: conditional half only, residuals scaled by
            ``logspace(-1, 0)`` from the first block to the mid block.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    image: str
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: Literal["Balanced", "My prompt is more important", "ControlNet is more important"] = "Balanced"
    resize_mode: Literal["Just Resize", "Crop and Resize", "Resize and Fill"] = "Crop and Resize"
    pixel_perfect: bool = False
    processor_res: int = 512
    threshold_a: float | None = None
    threshold_b: float | None = None
    guess_mode: bool = False

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not 0.0 <= v <= 2.0:
            raise ValueError(f"must be between 0 and 2, got {v:g}")
        return v

    @field_validator("guidance_start", "guidance_end")
    @classmethod
    def _frac(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be a fraction of the steps between 0 and 1, got {v:g}")
        return v

    @field_validator("processor_res")
    @classmethod
    def _res(cls, v: int) -> int:
        if not 64 <= v <= 4096:
            raise ValueError(f"must be between 64 and 4096 pixels, got {v}")
        return v

    @field_validator("module")
    @classmethod
    def _module(cls, v: str) -> str:
        from danqing.preprocess import preprocessor_names

        if v not in preprocessor_names():
            raise ValueError(f"unknown preprocessor {v!r}; available: {', '.join(preprocessor_names())}")
        return v

    @model_validator(mode="after")
    def _window(self) -> "ControlUnit":
        if self.guidance_start > self.guidance_end:
            raise InvalidRequest("controlnet.guidance_start", f"must not be after guidance_end "
                                 f"({self.guidance_start:g} > {self.guidance_end:g})")
        return self


def control_types() -> dict:
    """``data/control.json``: control type -> {"module": preprocessor, "model": ControlNet name}."""
    import json
    from importlib import resources

    return json.loads(resources.files("danqing").joinpath("data/control.json").read_text(encoding="utf-8"))["types"]


def a1111_module(name: str, field: str = "module") -> str:
    """An sd-webui-controlnet module name ("canny", "lineart_realistic", "depth_midas", ...) ->
    danqing's preprocessor (``data/control.json``'s ``a1111_modules``; our own names pass)."""
    import json
    from importlib import resources

    from danqing.preprocess import preprocessor_names

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
_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def control_family(config) -> str:
    """The base family a ControlNet / adapter config belongs to, from its cross-attention width
    (768 SD1, 1024 SD2, 2048 SDXL) or, for T2I-Adapters, the adapter type."""
    if "adapter_type" in config:  # T2I-Adapter: no text side; SDXL adapters are "full_adapter_xl"
        return "sdxl" if config["adapter_type"] == "full_adapter_xl" else "sd1/sd2"
    dim = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return _DIM_FAMILY.get(dim, f"custom (cross-attention {dim})")


def unet_family(unet_config, family: str) -> str:
    dim = unet_config.get("cross_attention_dim")
    return family if _DIM_FAMILY.get(dim) == family or family == "sdxl" and dim == 2048 else f"custom (cross-attention {dim})"


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


# -- loading --------------------------------------------------------------------------------------
def is_adapter_folder(path: Path) -> bool:
    import json

    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") in ("T2IAdapter", "MultiAdapter")


LDM_HINT_KEYS = ("input_hint_block.0.weight", "control_model.input_hint_block.0.weight")


def load_control_model(entry):
    """A ControlNet or T2I-Adapter from a registry entry, on the CPU in float32.

    Folders: diffusers ``ControlNetModel`` / ``T2IAdapter`` (local files only). Single files:
    ControlNet 1.0 (``control_model.`` prefix) and 1.1 (no prefix) ``.pth``/``.safetensors``
    in the original layout, converted with diffusers' ``convert_controlnet_checkpoint`` into a
    config of the family its weights show; or a file in diffusers' key layout with a
    ``<stem>.json`` config beside it (how danqing ships its own). Pickles are read with
    ``weights_only=True``.

    Returns:
        (model, kind) with kind "controlnet" or "t2i".
    """
    import json

    from danqing.errors import CorruptModel

    path = Path(entry.path)
    if path.is_dir():
        if is_adapter_folder(path):
            from diffusers import T2IAdapter

            return T2IAdapter.from_pretrained(path, local_files_only=True).float().eval(), "t2i"
        from diffusers import ControlNetModel

        try:
            return ControlNetModel.from_pretrained(path, local_files_only=True).float().eval(), "controlnet"
        except (OSError, ValueError) as exc:
            raise CorruptModel(f"{path}: not a diffusers ControlNet folder ({str(exc).splitlines()[0][:200]})") from None

    from diffusers import ControlNetModel

    from danqing.models.single_file import _assign, read_state_dict

    sd, meta = read_state_dict(path)
    sidecar = path.with_suffix(".json")
    if "config" in meta:
        config = json.loads(meta["config"])
    elif sidecar.is_file():
        config = json.loads(sidecar.read_text())
    else:
        config = ldm_controlnet_config(sd, path)
    if config.get("_class_name") == "T2IAdapter":
        from diffusers import T2IAdapter

        model = T2IAdapter.from_config(config)
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model.eval(), "t2i"
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    sd = convert_controlnet_checkpoint(sd, config)
    import accelerate

    with accelerate.init_empty_weights():
        model = ControlNetModel.from_config(config)
    _assign(model, sd, "ControlNet", path)
    return model.float().eval(), "controlnet"


def ldm_controlnet_config(sd: dict, path: Path) -> dict:
    """The diffusers ControlNet config of an original-layout ControlNet file, from the bundled
    UNet config of the family its weights show (cross-attention width; SDXL's label embedding)."""
    from danqing.errors import CorruptModel
    from danqing.models.families import load_family_config

    prefix = "control_model." if any(k.startswith("control_model.") for k in sd) else ""
    if f"{prefix}input_hint_block.0.weight" not in sd:
        raise CorruptModel(f"{path}: not a ControlNet (no input_hint_block weights) and no {path.stem}.json config beside it")
    k = next((k for k in sd if k.startswith(f"{prefix}input_blocks") and k.endswith("attn2.to_k.weight")), None)
    dim = sd[k].shape[1] if k else None
    family = "sdxl" if f"{prefix}label_emb.0.0.weight" in sd else _DIM_FAMILY.get(dim)
    if family is None:
        raise CorruptModel(f"{path}: a ControlNet of cross-attention width {dim}, which no bundled family has "
                           f"(768 SD1, 1024 SD2, 2048 SDXL); put its diffusers config as {path.stem}.json beside it")
    unet = load_family_config(family)["unet"]
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block",
            "flip_sin_to_cos", "freq_shift", "norm_num_groups", "norm_eps", "upcast_attention")
    config = {k: unet[k] for k in keys if k in unet}
    config["conditioning_channels"] = int(sd[f"{prefix}input_hint_block.0.weight"].shape[1])
    if family == "sdxl" and f"{prefix}input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight" not in sd:
        config["down_block_types"] = ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    return config


def controlnet_to_ldm(state_dict: dict, config: dict, prefix: str = "") -> dict:
    """diffusers ControlNetModel -> the original ControlNet layout (lllyasviel's ``cldm``):
    the UNet encoder in openaimodel names, ``input_hint_block.{0,2,...}``, ``zero_convs.i.0``,
    ``middle_block_out.0``; ``prefix`` "control_model." gives ControlNet 1.0's files. The inverse
    of diffusers' ``convert_controlnet_checkpoint`` (a test round-trips through it)."""
    from danqing.models.single_file import _map_key, _unet_prefix_map

    up = [t.replace("Down", "Up") for t in reversed(config["down_block_types"])]
    pairs = _unet_prefix_map({**config, "up_block_types": up})
    n_hint = len({k.split(".")[2] for k in state_dict if k.startswith("controlnet_cond_embedding.blocks.")})
    out = {}
    for k, v in state_dict.items():
        if k.startswith("controlnet_cond_embedding."):
            rest = k[len("controlnet_cond_embedding."):]
            if rest.startswith("conv_in."):
                name = "input_hint_block.0." + rest[len("conv_in."):]
            elif rest.startswith("conv_out."):
                name = f"input_hint_block.{2 * (n_hint + 1)}." + rest[len("conv_out."):]
            else:
                _, j, tail = rest.split(".", 2)
                name = f"input_hint_block.{2 * (int(j) + 1)}.{tail}"
        elif k.startswith("controlnet_down_blocks."):
            _, i, tail = k.split(".", 2)
            name = f"zero_convs.{i}.0.{tail}"
        elif k.startswith("controlnet_mid_block."):
            name = "middle_block_out.0." + k[len("controlnet_mid_block."):]
        else:
            name = _map_key(k, pairs)
        out[prefix + name] = v
    return out


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
    from PIL import Image

    return picture.crop(box).resize((width, height), Image.LANCZOS)


def control_map(unit: ControlUnit, width: int, height: int, *, mask=None, models_dir=None, crop=None):
    """The unit's picture, preprocessed and fitted to width x height: an RGB PIL image, or for
    the "inpaint" module a (H, W, 3) float array with -1 under ``mask``. An OpenPose unit may
    give a pose JSON file instead of a picture.

    Args:
        crop: "only masked" inpainting: ``((full_width, full_height), box)``: the map is made and
            fitted (its resize mode) to the full init picture's size, then cut to ``box`` and
            resized to width x height (``crop_to``), as the init picture is; ``mask`` is then at
            the full size.
    """
    from danqing.editing.images import load_image, resize_image
    from danqing.preprocess import run_preprocessor

    if crop is not None:
        (full_w, full_h), box = crop
        if unit.module == "inpaint":  # crop picture and mask, then mark the mask (no -1 smeared by resizing)
            import numpy as np

            from danqing.preprocess import inpaint_condition

            pic = crop_to(resize_image(load_image(unit.image, "controlnet.image"), full_w, full_h,
                                       request_resize_mode(unit.resize_mode)), box, width, height)
            m = None if mask is None else np.asarray(crop_to(mask.convert("L"), box, width, height), np.float32) / 255
            return inpaint_condition(pic, m)
        return crop_to(control_map(unit, full_w, full_h, mask=mask, models_dir=models_dir), box, width, height)
    mode = request_resize_mode(unit.resize_mode)
    if unit.module == "openpose" and str(unit.image).lower().endswith(".json"):
        from danqing.preprocess.models import render_pose_json

        return resize_image(render_pose_json(unit.image), width, height, mode)
    img = load_image(unit.image, "controlnet.image")
    res = (pixel_perfect_resolution(img.width, img.height, width, height, unit.resize_mode)
           if unit.pixel_perfect else unit.processor_res)
    if unit.module == "inpaint":
        import numpy as np

        from danqing.preprocess import inpaint_condition

        fitted = resize_image(img, width, height, mode)
        m = None if mask is None else np.asarray(resize_image(mask.convert("L"), width, height, mode), np.float32) / 255
        return inpaint_condition(fitted, m)
    out = run_preprocessor(unit.module, img, resolution=res, a=unit.threshold_a, b=unit.threshold_b,
                           models_dir=models_dir)
    return resize_image(out.convert("RGB"), width, height, mode)


def image_tensor(picture) -> "torch.Tensor":
    """RGB PIL (or float array) -> (1, 3, H, W) float32 in [0, 1] (diffusers' control image
    processor: ``do_normalize=False``)."""
    import numpy as np
    import torch

    a = picture if isinstance(picture, np.ndarray) else np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]


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

    def residuals(self, x, x_in, t, cond, use_cfg: bool):
        """Summed (down residuals, mid residual, adapter features) at this evaluation, each
        already batched like ``x_in``; None where no unit of that kind acts."""
        import torch

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
                feats = [f.expand(B, -1, -1, -1) * w for f, w in zip(feats, s)]
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
            img = u.image.to(device=cx.device, dtype=cx.dtype).expand(cx.shape[0], -1, -1, -1)
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
        import torch

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
                  models_dir=None, crop=None) -> list[PreparedControl]:
    """``request.controlnet`` with its loaded models -> ``PreparedControl``s at width x height.

    Args:
        loaded_controls: one ``(model, kind)`` per unit, in order (``ModelManager.load_control``).
        mask: the inpaint mask (PIL "L"), for the "inpaint" module.
        crop: "only masked" inpainting: ``((full_width, full_height), box)`` (``control_map``).
    """
    out = []
    for unit, (model, kind) in zip(request.controlnet, loaded_controls):
        pic = control_map(unit, width, height, mask=mask, models_dir=models_dir, crop=crop)
        out.append(PreparedControl(model, kind, image_tensor(pic), unit.weight, unit.guidance_start,
                                   unit.guidance_end, unit.control_mode, unit.guess_mode))
    return out
