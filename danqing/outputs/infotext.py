"""A1111 infotext: the ``parameters`` text that A1111, ComfyUI importers and civitai read.

Format (A1111 ``create_infotext`` / ``parse_generation_parameters``)::

    <prompt, possibly several lines>
    Negative prompt: <negative, possibly several lines>      (omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

Values containing ``,`` ``:`` ``"`` or a newline are written as JSON strings; keys without a
value are dropped. Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

# A1111's re_param: "Key: value" pairs, the value either a JSON string or anything up to a comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"
MIN_PAIRS = 3  # A1111: a last line with fewer "key: value" pairs is still prompt text


def _value(v: object) -> str:
    """One parameter value as A1111 writes it: 7.0 -> "7", quoted when it would break the line."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    text = str(v)
    if any(c in text for c in ',:"\n\r'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """Write an infotext; ``params`` in order, None/"" values dropped, 7.0 written as 7.

    The ``Negative prompt:`` line is omitted when the negative prompt is empty, and so is the
    parameter line when no parameter has a value.
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    pairs = [f"{k}: {_value(v)}" for k, v in params.items() if v is not None and v != ""]
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            unquoted = json.loads(value)
        except ValueError:
            return value
        if isinstance(unquoted, str):
            return unquoted
    return value


def parse_params_line(line: str) -> dict[str, str]:
    """``{key: value}`` of one ``Key: value, Key: "quoted, value"`` line (values as strings)."""
    return {key.strip(): _unquote(value.strip()) for key, value in _PARAM.findall(line)}


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Read an infotext back into (prompt, negative prompt, {key: value string}).

    The last line counts as parameters only when it holds at least 3 ``key: value`` pairs (A1111's
    rule); otherwise it is part of the prompt. Quoted values are unquoted. The negative prompt is
    every line from the first ``Negative prompt:`` line up to the parameter line.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n").split("\n")
    params: dict[str, str] = {}
    if len(_PARAM.findall(lines[-1])) >= MIN_PAIRS:
        params = parse_params_line(lines.pop())
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if target is prompt_lines and line.startswith(NEGATIVE):
            target = negative_lines
            line = line[len(NEGATIVE):].lstrip(" ")
        target.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def split_legacy_sampler(name: str, known_samplers: Iterable[str], known_schedules: Iterable[str]) -> tuple[str, str | None]:
    """Pre-1.9 A1111 names carry the schedule: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras").

    A known sampler name is returned as is with no schedule; an unknown name is split only when
    its prefix is a known sampler and its suffix a known schedule (case-insensitively, returning the
    known spellings); anything else comes back unchanged as ``(name, None)``.
    """
    samplers = {s.casefold(): s for s in known_samplers}
    key = name.strip().casefold()
    if key in samplers:
        return samplers[key], None
    # Longest schedule first, so "SGM Uniform" wins over "Uniform" when both would fit.
    for schedule in sorted(known_schedules, key=len, reverse=True):
        suffix = " " + schedule.casefold()
        if key.endswith(suffix):
            prefix = key[: -len(suffix)].rstrip()
            if prefix in samplers:
                return samplers[prefix], schedule
    return name, None


def short_hash(sha256_hex: str) -> str:
    """A1111's short model hash: the first 10 hex characters of the file's sha256 (lower case)."""
    return sha256_hex.strip().lower()[:10]
