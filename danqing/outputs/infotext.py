"""A1111 infotext: the ``parameters`` text that A1111, ComfyUI importers and civitai read.

Format (A1111 ``create_infotext`` / ``parse_generation_parameters``)::

    <prompt, possibly several lines>
    Negative prompt: <negative, possibly several lines>      (omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

Values containing ``,`` ``:`` ``"`` or a newline are written as JSON strings; keys without a
value are dropped.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"


def _value(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    text = str(v)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """Write an infotext; ``params`` in order, None/"" values dropped, 7.0 written as 7."""
    line = ", ".join(f"{k}: {_value(v)}" for k, v in params.items() if v is not None and v != "")
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Read an infotext back into (prompt, negative prompt, {key: value string}).

    The last line counts as parameters only when it holds at least 3 ``key: value`` pairs (A1111's
    rule); otherwise it is part of the prompt. Quoted values are unquoted.
    """
    lines = text.strip("\n").split("\n")
    params: dict[str, str] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        for key, value in _PARAM.findall(lines.pop()):
            value = value.strip()
            if value[:1] == '"' and value[-1:] == '"':
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            params[key.strip()] = value
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith(NEGATIVE) and target is prompt_lines:
            target = negative_lines
            line = line[len(NEGATIVE):].lstrip(" ")
        target.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def split_legacy_sampler(name: str, known_samplers: Iterable[str], known_schedules: Iterable[str]) -> tuple[str, str | None]:
    """Pre-1.9 A1111 names carry the schedule: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras")."""
    samplers = list(known_samplers)
    if name in samplers:
        return name, None
    for schedule in known_schedules:
        suffix = " " + schedule
        if name.endswith(suffix) and name[: -len(suffix)] in samplers:
            return name[: -len(suffix)], schedule
    return name, None


def short_hash(sha256_hex: str) -> str:
    """A1111's short model hash: the first 10 hex characters of the file's sha256."""
    return sha256_hex[:10]
