"""Style templates of the portrait studio, as data: one TOML file per style.

danqing's own are in ``danqing/data/styles/portrait/``; a user adds or replaces one by putting
``NAME.toml`` in ``styles/portrait/`` under the home (the user's file wins over danqing's of the
same name). A template holds a prompt with ``{trigger}`` (the person's trigger word), a negative
prompt, an optional style LoRA and its weight, the person-LoRA weight, size, sampler, schedule,
steps and CFG; ``style_requests`` turns a template and a person into ``GenerationRequest``s.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from danqing.errors import DanqingError, InvalidRequest
from danqing.models.names import NEW_NAME, within
from danqing.request import GenerationRequest

USER_FOLDER = Path("styles") / "portrait"


class PortraitStyle(BaseModel):
    """One style template (a TOML file; its name is the file's stem)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    title: str = ""
    prompt: str
    negative: str = ""
    style_lora: str | None = None
    style_lora_weight: float = Field(0.5, ge=0.0, le=2.0)
    person_lora_weight: float = Field(0.9, ge=0.0, le=2.0)
    width: int = 512
    height: int = 512
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    steps: int = 25
    cfg: float = 7.0
    source: str = Field("danqing", exclude=True)

    @field_validator("prompt")
    @classmethod
    def _has_trigger(cls, v: str) -> str:
        if "{trigger}" not in v:
            raise ValueError("the prompt needs {trigger} where the person's trigger word goes")
        return v

    @field_validator("style_lora")
    @classmethod
    def _lora_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "<>:/\\")):
            raise ValueError("the name of a LoRA in models/lora/ (no path, no '<', '>' or ':')")
        return v


def _parse(path: Path, source: str) -> PortraitStyle:
    """One template file, or ``InvalidRequest`` naming the file and what is wrong."""
    name = path.stem
    if not NEW_NAME.fullmatch(name):
        raise InvalidRequest("style", f"{path}: a style file's name is letters, digits, '-' or '_' (.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        style = PortraitStyle(name=name, source=source, **data)
        style_requests(style, "x", n=1)  # sampler, size, steps and CFG as the engine checks them
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest("style", f"{path}: not valid TOML ({exc})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "file"
        raise InvalidRequest("style", f"{path}: {where}: {err['msg']}") from None
    except (DanqingError, TypeError) as exc:
        raise InvalidRequest("style", f"{path}: {exc}") from None
    return style


def style_files(home: str | Path | None = None) -> dict[str, tuple[Path, str]]:
    """name -> (file, "danqing" or "user"): danqing's templates, then the user's (which win)."""
    out: dict[str, tuple[Path, str]] = {}
    bundled = resources.files("danqing").joinpath("data/styles/portrait")
    for f in sorted(bundled.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".toml"):
            out[f.name[:-5]] = (Path(str(f)), "danqing")
    if home is not None:
        folder = Path(home) / USER_FOLDER
        if folder.is_dir():
            for f in sorted(within(folder.glob("*.toml"), folder)):
                out[f.stem] = (f, "user")
    return out


def load_styles(home: str | Path | None = None) -> dict[str, PortraitStyle]:
    """Every style template by name (see the module), each validated.

    Raises:
        InvalidRequest: a template file that is not valid (the file and the problem are named).
    """
    return {name: _parse(path, source) for name, (path, source) in style_files(home).items()}


def get_style(name: object, home: str | Path | None = None) -> PortraitStyle:
    """The template called ``name``; an unknown name gets one line listing the styles."""
    files = style_files(home)
    if not isinstance(name, str) or name not in files:
        shown = str(name)[:120]
        raise InvalidRequest("style", f"unknown style {shown!r}; styles: {', '.join(files)}")
    return _parse(*files[name])


def style_prompt(style: PortraitStyle, trigger: str, person_lora: str | None = None) -> str:
    """The template's prompt with the trigger word, the person LoRA and the style LoRA tags."""
    prompt = style.prompt.replace("{trigger}", trigger)
    if person_lora:
        prompt += f" <lora:{person_lora}:{style.person_lora_weight:g}>"
    if style.style_lora:
        prompt += f" <lora:{style.style_lora}:{style.style_lora_weight:g}>"
    return prompt


def style_requests(style: PortraitStyle, trigger: str, *, n: int = 4, person_lora: str | None = None,
                   model: str | None = None, seed: int = -1) -> list[GenerationRequest]:
    """``n`` one-picture requests of ``style`` for the person with ``trigger`` (seeds ``seed``,
    ``seed + 1``, ...; -1: each random), with the person's LoRA at the style's weight.

    Args:
        style: the template.
        trigger: the person's trigger word (``Person.trigger``).
        n: how many pictures (each its own request, so a queue can run and rank them one by one).
        person_lora: the person's LoRA in models/lora/ (None: the template alone, a baseline).
        model: the checkpoint (None: the settings' default).
        seed: the first seed.
    """
    if not 1 <= n <= 100:
        raise InvalidRequest("n", f"{n}: between 1 and 100 pictures per style")
    prompt = style_prompt(style, trigger, person_lora)
    return [GenerationRequest(prompt=prompt, negative_prompt=style.negative, model=model, sampler=style.sampler,
                              schedule=style.schedule, steps=style.steps, cfg_scale=style.cfg, width=style.width,
                              height=style.height, seed=-1 if seed == -1 else seed + i)
            for i in range(n)]
