"""GenerationRequest: typed, frozen, validated at construction, JSON round-trip.

The same object is validated, run, written into the PNG and read back, so an image reproduces
from its file. Field names follow A1111 where it has one (``cfg_scale``, ``subseed``, ...).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from danqing.errors import InvalidRequest

MAX_SEED = 2**32 - 1
SIZE_MIN, SIZE_MAX = 64, 4096


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

    # -- validation: one clear line per field ---------------------------------------------
    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if not 1 <= v <= 150:
            raise ValueError(f"must be between 1 and 150, got {v}")
        return v

    @field_validator("cfg_scale")
    @classmethod
    def _cfg(cls, v: float) -> float:
        if not 1.0 <= v <= 30.0:
            raise ValueError(f"must be between 1 and 30, got {v:g}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _size(cls, v: int) -> int:
        if v % 8 or not SIZE_MIN <= v <= SIZE_MAX:
            raise ValueError(f"must be a multiple of 8 between {SIZE_MIN} and {SIZE_MAX}, got {v}")
        return v

    @field_validator("seed", "subseed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not -1 <= v <= MAX_SEED:
            raise ValueError(f"must be -1 (random) or between 0 and {MAX_SEED}, got {v}")
        return v

    @field_validator("subseed_strength")
    @classmethod
    def _strength(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be between 0 and 1, got {v:g}")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int) -> int:
        if not 1 <= v <= 64:
            raise ValueError(f"must be between 1 and 64, got {v}")
        return v

    @field_validator("batch_count")
    @classmethod
    def _count(cls, v: int) -> int:
        if not 1 <= v <= 1000:
            raise ValueError(f"must be between 1 and 1000, got {v}")
        return v

    @field_validator("clip_skip")
    @classmethod
    def _clip_skip(cls, v: int) -> int:
        if not 1 <= v <= 12:
            raise ValueError(f"must be between 1 and 12, got {v}")
        return v

    @model_validator(mode="after")
    def _names(self) -> "GenerationRequest":
        from danqing.conditioning.prompt_parser import parse_attention, prompt_schedule
        from danqing.sampling.samplers import get_sampler, resolve_schedule

        get_sampler(self.sampler)
        resolve_schedule(self.sampler, self.schedule)
        for field_name in ("prompt", "negative_prompt"):
            text = getattr(self, field_name)
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
            raise _one_line(exc) from None

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


def _one_line(exc: ValidationError) -> InvalidRequest:
    """Turn pydantic's multi-line report into our one-line typed error (first problem)."""
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or "request"
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, InvalidRequest):
        return ctx_error
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(GenerationRequest.model_fields)
        return InvalidRequest(field, f"unknown field; allowed fields: {allowed}")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be")
    return InvalidRequest(field, msg)
