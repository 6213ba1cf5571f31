"""Prompts from a file: one request per line (A1111's "Prompts from file or textbox" script).

A line is either a plain prompt, or (when it holds ``--``) A1111's option syntax, read with
``shlex`` as A1111 reads it::

    --prompt "a red circle" --negative_prompt "blurry" --steps 20 --seed 5 --sampler_name "Euler a"

``--prompt`` and ``--negative_prompt`` take every word up to the next ``--option``; the other
tags (``PROMPT_TAGS``) take one value. Blank lines are skipped. With a base prompt, a line's
prompt goes at its start or end, joined with a space (A1111's "Insert prompts at the" start/end);
seeds: the base seed for every line, or (``iterate_seed``) the base seed plus
``batch_size x batch_count`` for each next line, as A1111 does.
"""

from __future__ import annotations

import random
import shlex
from dataclasses import dataclass

from danqing.conditioning.styles import apply_styles
from danqing.errors import InvalidRequest
from danqing.request import MAX_SEED, GenerationRequest
from danqing.sampling.samplers import samplers

MAX_LINES = 1000


def _bool(text: str) -> bool:
    return text == "true"  # A1111's process_boolean_tag


# A1111's prompt_tags: tag -> (request field, reader). None: accepted only as an A1111 no-op here.
PROMPT_TAGS: dict[str, tuple[str | None, type | object]] = {
    "sd_model": ("model", str),
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "styles": ("styles", str),
    "seed": ("seed", int),
    "subseed_strength": ("subseed_strength", float),
    "subseed": ("subseed", int),
    "sampler_name": ("sampler", str),
    "batch_size": ("batch_size", int),
    "n_iter": ("batch_count", int),
    "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float),
    "width": ("width", int),
    "height": ("height", int),
    "restore_faces": ("restore_faces", _bool),
    "do_not_save_samples": (None, _bool),
    "do_not_save_grid": (None, _bool),
}
# A1111 tags danqing cannot honour (a line naming them is refused, never half-applied)
UNSUPPORTED_TAGS = ("outpath_samples", "outpath_grids", "prompt_for_display", "seed_resize_from_h",
                    "seed_resize_from_w", "sampler_index", "tiling")


def parse_line(line: str, lineno: int = 1) -> dict:
    """One line -> request fields (plus ``styles``, a comma list of style names)."""
    if "--" not in line:
        return {"prompt": line}
    where = f"line {lineno}"
    try:
        args = shlex.split(line)
    except ValueError as exc:
        raise InvalidRequest(where, f"cannot read the options ({exc})") from None
    out: dict = {}
    pos = 0
    while pos < len(args):
        arg = args[pos]
        if not arg.startswith("--"):
            raise InvalidRequest(where, f"{arg!r} must start with \"--\" (e.g. --prompt \"...\" --steps 20)")
        tag = arg[2:]
        if pos + 1 >= len(args):
            raise InvalidRequest(where, f"{arg} has no value")
        if tag in ("prompt", "negative_prompt"):
            words = [args[pos + 1]]
            pos += 2
            while pos < len(args) and not args[pos].startswith("--"):
                words.append(args[pos])
                pos += 1
            out[tag] = " ".join(words)
            continue
        if tag not in PROMPT_TAGS:
            why = "is not supported by danqing" if tag in UNSUPPORTED_TAGS else "is not an option"
            raise InvalidRequest(where, f"{arg} {why}; options: {', '.join('--' + t for t in PROMPT_TAGS)}")
        name, read = PROMPT_TAGS[tag]
        value = args[pos + 1]
        try:
            parsed = read(value)
        except ValueError:
            raise InvalidRequest(where, f"{arg} {value!r} is not a {getattr(read, '__name__', 'value')}") from None
        if tag == "sampler_name":
            parsed = {n.casefold(): n for n in samplers()}.get(value.casefold(), value)
        if name is not None:
            out[name] = parsed
        pos += 2
    return out


def read_lines(text: str) -> list[tuple[int, dict]]:
    """(line number, fields) of every non-blank line."""
    lines = [(i + 1, s.strip()) for i, s in enumerate(text.splitlines())]
    lines = [(n, s) for n, s in lines if s]
    if len(lines) > MAX_LINES:
        raise InvalidRequest("prompts", f"{len(lines)} lines is more than the limit of {MAX_LINES}")
    return [(n, parse_line(s, n)) for n, s in lines]


@dataclass(frozen=True)
class LineJob:
    """One line's request (styles applied) and its line number."""

    lineno: int
    request: GenerationRequest


def plan_lines(base: GenerationRequest, text: str, *, styles: dict | None = None, position: str = "start",
               iterate_seed: bool = False, same_seed: bool = False) -> list[LineJob]:
    """Every line's request, validated before anything runs.

    Args:
        base: the request each line starts from (its prompt joined with the line's).
        text: the file's text.
        styles: the style library, for ``--styles`` (comma list of names).
        position: "start" or "end": where a line's prompt goes relative to the base prompt.
        iterate_seed: A1111's "Iterate seed every line".
        same_seed: A1111's "Use same random seed for all lines" (a random base seed drawn once).
    """
    if position not in ("start", "end"):
        raise InvalidRequest("position", f"must be start or end, got {position!r}")
    if (iterate_seed or same_seed) and base.seed == -1:
        base = base.replace(seed=random.randint(0, MAX_SEED - 1000))
    seed = base.seed
    jobs = []
    for lineno, fields in read_lines(text):
        f = base.model_dump()
        f["seed"] = seed
        names = fields.pop("styles", "")
        for key in ("prompt", "negative_prompt"):
            line_text = fields.pop(key, None)
            if line_text and base.model_dump()[key]:
                line_text = f"{line_text} {f[key]}" if position == "start" else f"{f[key]} {line_text}"
            if line_text is not None:
                f[key] = line_text
        f.update(fields)
        try:
            request = GenerationRequest.create(**f)
            if names:
                p, n = apply_styles(request.prompt, request.negative_prompt,
                                    [s.strip() for s in names.split(",") if s.strip()], styles or {})
                request = request.replace(prompt=p, negative_prompt=n)
        except InvalidRequest as exc:
            raise InvalidRequest(f"line {lineno}", str(exc)) from None
        jobs.append(LineJob(lineno, request))
        if iterate_seed:
            seed = seed + base.batch_size * base.batch_count
    if not jobs:
        raise InvalidRequest("prompts", "no prompt lines (every line is blank)")
    return jobs
