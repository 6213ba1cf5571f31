"""GenerationRequest: typed, frozen, validated at construction, JSON round-trip.

The same object is validated, run, written into the PNG and read back, so an image reproduces
from its file. Field names follow A1111 where it has one (``cfg_scale``, ``subseed``, ...).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from danqing.conditioning.prompt_limits import check_prompt
from danqing.conditioning.prompt_parser import parse_attention, prompt_schedule
from danqing.conditioning.regions import Regions, check_request
from danqing.errors import InvalidRequest
from danqing.preprocess import preprocessor_names
from danqing.sampling.flow import DISTILLED_CFG_SCALE, FLOW_FAMILIES
from danqing.sampling.samplers import get_sampler, resolve_schedule

MAX_SEED = 2**32 - 1
SIZE_MIN, SIZE_MAX = 64, 4096


# Closed ranges of the numeric fields: field -> (low, high, what is allowed, in words). One
# validator per model reads it; the message says what was wrong and what is allowed.
RANGES: dict[str, tuple[float, float, str]] = {
    # ControlNet / T2I-Adapter unit
    "weight": (0.0, 2.0, "between 0 and 2"),
    "guidance_start": (0.0, 1.0, "a fraction of the steps between 0 and 1"),
    "guidance_end": (0.0, 1.0, "a fraction of the steps between 0 and 1"),
    "processor_res": (64, 4096, "between 64 and 4096 pixels"),
    # generation request
    "steps": (1, 150, "between 1 and 150"),
    "cfg_scale": (1.0, 30.0, "between 1 and 30"),
    "seed": (-1, MAX_SEED, f"-1 (random) or between 0 and {MAX_SEED}"),
    "subseed": (-1, MAX_SEED, f"-1 (random) or between 0 and {MAX_SEED}"),
    "subseed_strength": (0.0, 1.0, "between 0 and 1"),
    "batch_size": (1, 64, "between 1 and 64"),
    "batch_count": (1, 1000, "between 1 and 1000"),
    "clip_skip": (1, 12, "between 1 and 12"),
    "denoising_strength": (0.0, 1.0, "between 0 and 1"),
    "image_cfg_scale": (0.0, 30.0, "between 0 and 30"),
    "mask_blur": (0, 64, "between 0 and 64 pixels"),
    "inpaint_full_res_padding": (0, 1024, "between 0 and 1024 pixels"),
    "hr_scale": (1.0, 8.0, "between 1 and 8"),
    "hr_second_pass_steps": (0, 150, "between 0 (same as steps) and 150"),
    "p2p_features": (0.0, 1.0, "a fraction of the steps between 0 and 1"),
    "null_text_iterations": (0, 100, "between 0 (plain DDIM inversion) and 100"),
    "ip_adapter_weight": (0.0, 2.0, "between 0 (no effect) and 2"),
    "deepcache_interval": (0, 10, "between 0 (off) and 10 (1 = off; N = the whole UNet every N evaluations)"),
    "tome_ratio": (0.0, 0.75, "between 0 (off) and 0.75"),
    # video request
    "frames": (1, 128, "between 1 and 128"),
    "fps": (1, 60, "between 1 and 60 frames per second"),
    "context_overlap": (0, 31, "between 0 and 31 frames (less than the motion module's window)"),
    "flow_blend": (0.0, 1.0, "between 0 (off) and 1"),
    "motion_bucket_id": (0, 1023, "between 0 and 1023 (Stable Video Diffusion's default is 127: more is more motion)"),
    "noise_aug_strength": (0.0, 1.0, "between 0 and 1 (Stable Video Diffusion's default is 0.02)"),
    "min_cfg_scale": (0.0, 30.0, "between 0 and 30 (the first frame's CFG scale; cfg_scale is the last's)"),
}


FLOW_RANGES = {"distilled_cfg_scale": (0.0, 30.0, "between 0 and 30 (FLUX's default is 3.5)"),
               "shift": (0.01, 100.0, "between 0.01 and 100 (SD3 uses 3)")}


def in_range(v, info) -> float:
    """The field validator of every ``RANGES`` field: ``v`` if inside its range, else the one line."""
    low, high, allowed = RANGES[info.field_name]
    if not low <= v <= high:
        raise ValueError(f"must be {allowed}, got {v:g}" if isinstance(v, float) else f"must be {allowed}, got {v}")
    return v


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

    _ranges = field_validator("weight", "guidance_start", "guidance_end", "processor_res")(in_range)

    @field_validator("module")
    @classmethod
    def _module(cls, v: str) -> str:
        if v not in preprocessor_names():
            raise ValueError(f"unknown preprocessor {v!r}; available: {', '.join(preprocessor_names())}")
        return v

    @model_validator(mode="after")
    def _window(self) -> "ControlUnit":
        if self.guidance_start > self.guidance_end:
            raise InvalidRequest("controlnet.guidance_start", f"must not be after guidance_end "
                                 f"({self.guidance_start:g} > {self.guidance_end:g})")
        return self


class GenerationRequest(BaseModel):
    """One txt2img job. Construct with keywords; invalid values raise ``InvalidRequest``.

    Args:
        prompt: A1111 prompt syntax (weights, editing, alternation, BREAK).
        negative_prompt: replaces the unconditional branch of CFG.
        model: checkpoint name, short hash or path; None = the settings' default model.
        vae: VAE name or path overriding the checkpoint's; None = the checkpoint's own.
        sampler: A1111 sampler name (see ``danqing.sampling.samplers.samplers()``).
        schedule: A1111 schedule type ("Automatic" = the sampler's default).
        steps: sampling steps, 1-150.
        cfg_scale: classifier-free guidance weight, 1-30 (1 = no guidance).
        seed: -1 = random (the result reports the one used); image i of a batch uses seed + i.
        subseed, subseed_strength: A1111 variation seed, slerped into the noise.
        width, height: pixels, multiples of 8, 64-4096.
        batch_size: images per forward pass; batch_count: passes (A1111 n_iter).
        clip_skip: 1 = last CLIP layer, 2 = penultimate (A1111 semantics).
        rng: where initial noise is drawn: "cpu" (same on every device, the default) or "gpu".

    img2img / inpaint (A1111's img2img fields; docs/editing.md):
        init_image: path of the picture to start from; None = txt2img.
        mask: path of the inpaint mask (white = repaint; transparency counts as white).
        denoising_strength: 0-1, how far the picture is noised before denoising (img2img,
            inpaint, and hires fix's second pass); 0 returns the init image.
        resize_mode: how the init image is fitted to width x height.
        mask_blur: pixels of feathering at the mask's edge (inside the mask).
        inpainting_fill: what the masked area starts from: "original", "fill" (painted from its
            surroundings), "latent noise", "latent nothing".
        inpaint_full_res: "only masked": inpaint a crop around the mask at full width x height.
        inpaint_full_res_padding: pixels of context around the mask's box for "only masked".
        inpainting_mask_invert: repaint the black part of the mask instead.
        image_cfg_scale: instruct-pix2pix models only: how closely the edit follows the init
            picture (A1111's "Image CFG Scale"; ``cfg_scale`` then weighs the instruction).

    hires fix (txt2img only): enable_hr, hr_scale or hr_resize_x/y (target size), hr_upscaler
        ("Latent", "Latent (nearest)", ..., "Lanczos", "Nearest" or an installed upscaler),
        hr_second_pass_steps (0 = steps), hr_sampler_name, hr_prompt, hr_negative_prompt
        (None = the first pass's).

    face restoration (A1111's "Restore faces"): restore_faces runs a face-restoration model
        (GFPGAN) over every face of every image; face_restoration_model names an installed one
        (models/face_restore/, models/GFPGAN/; None = the first installed, by name).

    refiner (txt2img): refiner_checkpoint (a checkpoint of the same latent space, usually an SDXL
        refiner) takes the base model's latents when refiner_switch_at (0-1) of the schedule is
        done and denoises the rest.

    Prompt-to-Prompt (Hertz et al. 2022; docs/editing.md):
        p2p_source: the prompt being edited; set, ``prompt`` is its edit and the image is the
            picture of ``p2p_source`` at this seed with its attention maps kept (a word swapped,
            words added, or ``p2p_reweight``). With ``init_image`` the picture is a real image:
            it is null-text inverted with ``p2p_source`` as its caption (DDIM only), then edited.
        p2p_cross: (start, end) fractions of the steps in which the edited prompt's
            cross-attention maps are taken from the source's.
        p2p_self: (start, end) fractions of the steps in which self-attention maps are taken
            from the source's (only at 16x16 or fewer tokens, as in the paper).
        p2p_reweight: (word, factor) pairs: scale the attention paid to a word of ``prompt``.
        p2p_local_blend: confine the edit to where the edited words attend (the paper's local
            blending); elsewhere the picture follows the source.
        p2p_features: fraction of the first steps in which the edit's finest-resolution UNet
            features (the first ResNet's output) are the source's: keeps the layout where the
            model's attention maps do not (small models); 0 = attention only, as the paper.
        null_text_iterations: optimisation steps per sampler step of null-text inversion.

    IP-Adapter image prompt (Ye et al. 2023; docs/customise.md):
        ip_adapter_image: paths of the pictures that condition the image beside the prompt.
        ip_adapter: the adapter file in ``models/ipadapter/`` (None = the only one installed).
        ip_adapter_weight: its scale, 0 (no effect) to 2.
        ip_adapter_encoder: the CLIP vision encoder folder in ``models/clip_vision/`` (None =
            the only one installed).
    Speed options that change the picture a little (docs/sampling.md, SD1/SD2/SDXL UNets):
        deepcache_interval: DeepCache: the whole UNet every N model evaluations, the shallow
            branch on kept deep features between; 0 or 1 = off; 2 is the usual strength at 20 steps.
        tome_ratio: ToMe token merging: the fraction of tokens merged before self-attention in
            the highest-resolution attention layers (``tomesd``); 0 = off; 0.5 is tomesd's default.
    ControlNet (Zhang et al. 2023) and T2I-Adapter (docs/control.md):
        controlnet: units (``ControlUnit``: model, image,
            preprocessor, weight, guidance start/end, control mode, resize mode, pixel perfect,
            guess mode), applied together with txt2img, img2img and inpaint.
    Regional prompting (Regional Prompter's Attention mode; docs/prompts.md):
        regions: ``Regions`` (Columns / Rows by ratios, or Mask pictures; base and common
            prompts); the prompt's ``BREAK`` parts are then the regions' prompts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    model: str | None = None
    vae: str | None = None
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    rng: Literal["cpu", "gpu"] = "cpu"
    # img2img / inpaint
    init_image: str | None = None
    mask: str | None = None
    denoising_strength: float = 0.75
    resize_mode: Literal["just resize", "crop and resize", "resize and fill", "latent upscale"] = "just resize"
    mask_blur: int = 4
    inpainting_fill: Literal["fill", "original", "latent noise", "latent nothing"] = "original"
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    image_cfg_scale: float = 1.5
    # hires fix
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    # face restoration (A1111's restore_faces and face_restoration_model)
    restore_faces: bool = False
    face_restoration_model: str | None = None
    # SDXL refiner hand-off (A1111's names)
    refiner_checkpoint: str | None = None
    refiner_switch_at: float = 0.8
    # Prompt-to-Prompt and null-text inversion
    p2p_source: str | None = None
    p2p_cross: tuple[float, float] = (0.0, 0.8)
    p2p_self: tuple[float, float] = (0.0, 0.4)
    p2p_reweight: tuple[tuple[str, float], ...] = ()
    p2p_local_blend: bool = False
    p2p_features: float = 0.0
    null_text_iterations: int = 10
    # IP-Adapter image prompt (docs/customise.md)
    ip_adapter: str | None = None
    ip_adapter_image: tuple[str, ...] = ()
    ip_adapter_weight: float = 1.0
    ip_adapter_encoder: str | None = None
    # ControlNet / T2I-Adapter units (run by danqing/conditioning/control.py; docs/control.md)
    controlnet: tuple[ControlUnit, ...] = ()
    # regional prompting (Regional Prompter's settings; conditioning/regions.py, docs/prompts.md)
    regions: Regions | None = None
    # flow-matching families (SD3, FLUX; docs/models.md): Forge's "Distilled CFG Scale" (FLUX's guidance
    # embedding; None = 3.5), "Shift" (None = the model's), text encoder files (beside a transformer-only file)
    distilled_cfg_scale: float | None = None
    shift: float | None = None
    text_encoders: tuple[str, ...] = ()
    # speed options that change the picture a little (customise/speedups.py, docs/sampling.md):
    # DeepCache (the whole UNet every N evaluations; 0/1 = off) and ToMe token merging
    deepcache_interval: int = 0
    tome_ratio: float = 0.0

    # -- validation: one clear line per field ---------------------------------------------
    _ranges = field_validator("steps", "cfg_scale", "seed", "subseed", "subseed_strength", "batch_size", "batch_count",
                              "clip_skip", "denoising_strength", "image_cfg_scale", "mask_blur",
                              "inpaint_full_res_padding", "hr_scale", "hr_second_pass_steps", "p2p_features",
                              "null_text_iterations", "ip_adapter_weight", "deepcache_interval",
                              "tome_ratio")(in_range)

    @field_validator("distilled_cfg_scale", "shift")
    @classmethod
    def _flow_numbers(cls, v: float | None, info) -> float | None:
        low, high, allowed = FLOW_RANGES[info.field_name]
        if v is not None and not low <= v <= high:
            raise ValueError(f"must be {allowed}, got {v:g}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _size(cls, v: int) -> int:
        if v % 8 or not SIZE_MIN <= v <= SIZE_MAX:
            raise ValueError(f"must be a multiple of 8 between {SIZE_MIN} and {SIZE_MAX}, got {v}")
        return v

    @field_validator("hr_resize_x", "hr_resize_y")
    @classmethod
    def _hr_size(cls, v: int) -> int:
        if v and (v % 8 or not SIZE_MIN <= v <= SIZE_MAX):
            raise ValueError(f"must be 0 (use hr_scale) or a multiple of 8 between {SIZE_MIN} and {SIZE_MAX}, got {v}")
        return v

    @field_validator("p2p_cross", "p2p_self")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"must be (start, end) fractions of the steps with 0 <= start <= end <= 1, got {v}")
        return v

    @field_validator("refiner_switch_at")
    @classmethod
    def _switch(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"must be a fraction of the schedule strictly between 0 and 1, got {v:g}")
        return v

    @field_validator("p2p_reweight")
    @classmethod
    def _reweight(cls, v: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        for word, factor in v:
            if not word.strip():
                raise ValueError("a reweighted word must not be empty")
            if not -10.0 <= factor <= 10.0:
                raise ValueError(f"the factor of {word!r} must be between -10 and 10, got {factor:g}")
        return v

    @model_validator(mode="after")
    def _p2p(self) -> "GenerationRequest":
        if self.p2p_source is None:
            if self.p2p_reweight:
                raise InvalidRequest("p2p_reweight", "reweighting is a Prompt-to-Prompt edit; set p2p_source "
                                     "(the same prompt to reweight words of one picture)")
            return self
        for name, bad in (("mask", self.mask is not None), ("enable_hr", self.enable_hr),
                          ("subseed_strength", self.subseed_strength > 0)):
            if bad:
                raise InvalidRequest(name, "is not available with Prompt-to-Prompt (p2p_source)")
        if self.init_image is not None:
            if self.sampler != "DDIM":
                raise InvalidRequest("sampler", f"editing a real image (init_image with p2p_source) runs null-text "
                                     f"inversion, which needs the DDIM sampler; got {self.sampler!r}")
            if self.batch_size != 1 or self.batch_count != 1:
                raise InvalidRequest("batch_size", "editing a real image makes one picture; use batch_size and "
                                     "batch_count 1")
        return self

    @model_validator(mode="after")
    def _refiner(self) -> "GenerationRequest":
        if self.refiner_checkpoint is None:
            return self
        for name, bad in (("init_image", self.init_image is not None), ("enable_hr", self.enable_hr),
                          ("p2p_source", self.p2p_source is not None)):
            if bad:
                raise InvalidRequest(name, "the refiner runs after txt2img only (not with img2img, hires fix or "
                                     "Prompt-to-Prompt yet); unset refiner_checkpoint or this field")
        return self

    @model_validator(mode="after")
    def _ip_adapter(self) -> "GenerationRequest":
        if not self.ip_adapter_image:
            if self.ip_adapter is not None:
                raise InvalidRequest("ip_adapter_image", "an IP-Adapter needs at least one picture (ip_adapter_image)")
            return self
        if self.p2p_source is not None:
            raise InvalidRequest("ip_adapter_image", "an image prompt (IP-Adapter) cannot be combined with "
                                 "Prompt-to-Prompt (p2p_source) yet; both install attention processors")
        if any(not p.strip() for p in self.ip_adapter_image):
            raise InvalidRequest("ip_adapter_image", "a picture path must not be empty")
        return self

    @model_validator(mode="after")
    def _control(self) -> "GenerationRequest":
        if not self.controlnet:
            return self
        if len(self.controlnet) > 8:
            raise InvalidRequest("controlnet", f"at most 8 units, got {len(self.controlnet)}")
        if self.p2p_source is not None:
            raise InvalidRequest("p2p_source", "is not available with ControlNet yet (txt2img, hires fix, img2img and "
                                 "inpaint are); unset it or the controlnet units")
        return self

    @model_validator(mode="after")
    def _regions(self) -> "GenerationRequest":
        if self.regions is None:
            return self
        for name, bad in (("p2p_source", self.p2p_source is not None), ("ip_adapter_image", bool(self.ip_adapter_image)),
                          ("refiner_checkpoint", self.refiner_checkpoint is not None)):
            if bad:
                raise InvalidRequest(name, "is not available with regional prompting (regions) yet")
        check_request(self.prompt, self.negative_prompt, self.regions)
        if self.hr_prompt is not None or self.hr_negative_prompt is not None:
            check_request(self.prompt if self.hr_prompt is None else self.hr_prompt,
                          self.negative_prompt if self.hr_negative_prompt is None else self.hr_negative_prompt,
                          self.regions, "hr_prompt")
        return self

    @model_validator(mode="after")
    def _editing(self) -> "GenerationRequest":
        if self.mask is not None and self.init_image is None:
            raise InvalidRequest("mask", "a mask needs an init_image to inpaint")
        if self.enable_hr and self.init_image is not None:
            raise InvalidRequest("enable_hr", "hires fix is a txt2img option; for img2img set width/height to the size you want")
        if self.hr_sampler_name is not None:
            try:
                get_sampler(self.hr_sampler_name)
            except InvalidRequest as exc:
                raise InvalidRequest("hr_sampler_name", str(exc).split(": ", 1)[-1]) from None
        return self

    @property
    def hr_size(self) -> tuple[int, int]:
        """(width, height) of hires fix's second pass: hr_resize_x/y, else size * hr_scale
        rounded down to a multiple of 8 (one of the two given: the other keeps the ratio)."""
        x, y = self.hr_resize_x, self.hr_resize_y
        if x and y:
            return x, y
        if x:
            return x, max(8, int(x * self.height / self.width) // 8 * 8)
        if y:
            return max(8, int(y * self.width / self.height) // 8 * 8), y
        return int(self.width * self.hr_scale) // 8 * 8, int(self.height * self.hr_scale) // 8 * 8

    @model_validator(mode="after")
    def _names(self) -> "GenerationRequest":
        get_sampler(self.sampler)
        resolve_schedule(self.sampler, self.schedule)
        for field_name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt", "p2p_source"):
            text = getattr(self, field_name)
            if text is None:
                continue
            check_prompt(text, field_name)  # bracket depth: the recursive parser's bound
            try:
                for _, part in prompt_schedule(text, self.steps):
                    parse_attention(part)
            except InvalidRequest:
                raise
            except ValueError as exc:  # PromptSyntaxError
                raise InvalidRequest(field_name, str(exc)) from None
        return self

    # -- construction helpers ----------------------------------------------------------------
    @classmethod
    def create(cls, **fields: Any) -> "GenerationRequest":
        """Like ``GenerationRequest(**fields)`` but raises ``InvalidRequest`` with one line."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise _one_line(exc, cls) from None

    def replace(self, **changes: Any) -> "GenerationRequest":
        """A validated copy with some fields changed."""
        return type(self).create(**{**self.model_dump(), **changes})

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> "GenerationRequest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest("request", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        if not isinstance(data, dict):
            raise InvalidRequest("request", "must be a JSON object of request fields")
        return cls.create(**data)


def _one_line(exc: ValidationError, model: type[BaseModel] | None = None) -> InvalidRequest:
    """Turn pydantic's multi-line report into our one-line typed error (first problem)."""
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or "request"
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, InvalidRequest):
        return ctx_error
    if err["type"] == "extra_forbidden":
        allowed = ", ".join((model or GenerationRequest).model_fields)
        return InvalidRequest(field, f"unknown field; allowed fields: {allowed}")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be")
    return InvalidRequest(field, msg)


# What the flow-matching families do not take (yet): request field -> (is it set?, what it is).
# One table, read by ``for_family``; the CLIP-UNet families take everything.
FLOW_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "enable_hr": (lambda r: r.enable_hr, "hires fix"),
    "controlnet": (lambda r: bool(r.controlnet), "ControlNet / T2I-Adapter units"),
    "ip_adapter_image": (lambda r: bool(r.ip_adapter_image), "an IP-Adapter image prompt"),
    "regions": (lambda r: r.regions is not None, "regional prompting"),
    "p2p_source": (lambda r: r.p2p_source is not None, "Prompt-to-Prompt"),
    "refiner_checkpoint": (lambda r: r.refiner_checkpoint is not None, "a refiner"),
}
FLUX_SIZE_MULTIPLE = 16  # 8x VAE, then 2x2 packing


def for_family(request: "GenerationRequest", family: str) -> "GenerationRequest":
    """The request checked against its model's family (one-line ``InvalidRequest`` for an option the
    family does not take), what the family leaves open filled in (FLUX: ``distilled_cfg_scale``)."""
    flow = family in FLOW_FAMILIES
    if not flow:
        for name, what in (("distilled_cfg_scale", "Distilled CFG Scale is FLUX's guidance embedding"), ("shift",
                           "Shift is the timestep shift of flow-matching models (SD3, FLUX)")):
            if getattr(request, name) is not None:
                raise InvalidRequest(name, f"{what}; the model is {family}: leave it unset")
        return request
    for name, (is_set, what) in FLOW_UNSUPPORTED.items():
        if is_set(request):
            raise InvalidRequest(name, f"{what} is not available for {family} models yet; unset it")
    get_sampler(request.sampler, flow=True)
    resolve_schedule(request.sampler, request.schedule, flow=True)
    if request.hr_sampler_name is not None:
        get_sampler(request.hr_sampler_name, flow=True)
    if family != "flux":
        if request.distilled_cfg_scale is not None:
            raise InvalidRequest("distilled_cfg_scale", "Distilled CFG Scale is FLUX's guidance embedding; the model "
                                 "is sd3 (it takes cfg_scale): leave it unset")
        return request
    if request.clip_skip != 1:
        raise InvalidRequest("clip_skip", "FLUX reads only CLIP-L's pooled output, so clip skip does not apply; "
                             "use clip_skip 1")
    for name in ("width", "height"):
        if getattr(request, name) % FLUX_SIZE_MULTIPLE:
            raise InvalidRequest(name, f"FLUX needs a multiple of {FLUX_SIZE_MULTIPLE}, got {getattr(request, name)}")
    return request.replace(distilled_cfg_scale=DISTILLED_CFG_SCALE) if request.distilled_cfg_scale is None else request
