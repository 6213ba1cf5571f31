"""A request's prompt as the user wrote it -> the prompt that is generated: styles, then
wildcards and dynamic prompts (docs/apps.md, "Workflow tools").

Styles come first (``{prompt}`` is A1111's style placeholder, so it is consumed before braces
are read as variants, and a style may hold wildcards); then the template is drawn with the
request's seed. The request keeps the drawn prompt, which is what the picture's infotext shows;
the template goes into the infotext as ``Template`` / ``Negative Template`` (the keys the
sd-dynamic-prompts extension writes), which readers of the infotext ignore.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from danqing.conditioning.styles import Style, apply_styles, read_styles, styles_path
from danqing.conditioning.wildcards import has_dynamic, resolve_dynamic, wildcards_folder
from danqing.request import MAX_SEED, GenerationRequest


@dataclass(frozen=True)
class Prompting:
    """Where styles and wildcards are read from: ``HOME/styles.csv`` and ``HOME/wildcards/``."""

    home: Path
    styles: dict[str, Style] = field(default_factory=dict)

    @classmethod
    def at(cls, home: Path) -> "Prompting":
        return cls(Path(home), read_styles(styles_path(home)))

    @property
    def wildcards(self) -> Path:
        return wildcards_folder(self.home)


def expand_request(request: GenerationRequest, prompting: Prompting, styles: tuple[str, ...] | list[str] = (),
                   *, dynamic: bool = True) -> tuple[GenerationRequest, dict[str, str]]:
    """The request with its styles applied and its dynamic prompts drawn.

    A random seed (-1) is drawn here first, since the draw depends on it.

    Returns:
        (the request to run, the infotext pairs to add: ``Template`` and ``Negative Template``
        when a template was drawn, else none).
    """
    prompt, negative = apply_styles(request.prompt, request.negative_prompt, list(styles), prompting.styles)
    extra: dict[str, str] = {}
    changes: dict = {}
    if dynamic and (has_dynamic(prompt) or has_dynamic(negative)):
        seed = request.seed if request.seed != -1 else random.randint(0, MAX_SEED - 1000)
        changes["seed"] = seed
        drawn = resolve_dynamic(prompt, seed, prompting.wildcards, field="prompt")
        drawn_negative = resolve_dynamic(negative, seed, prompting.wildcards, field="negative_prompt")
        if drawn != prompt:
            extra["Template"] = prompt
        if drawn_negative != negative:
            extra["Negative Template"] = negative
        prompt, negative = drawn, drawn_negative
    if prompt != request.prompt:
        changes["prompt"] = prompt
    if negative != request.negative_prompt:
        changes["negative_prompt"] = negative
    return (request.replace(**changes) if changes else request), extra
