"""Styled portraits of a person: a style template's requests through ``Studio.generate``, then
face fusion and ranking (``portrait_people.fuse_and_rank``); each kept picture carries its
generation infotext plus its rank and identity score.

The person's LoRA is any LoRA in ``models/lora/`` the user names (trained, e.g., with
``danqing train lora`` on ``people/NAME/train/``); without one the pictures are the style's
prompts alone (a baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from danqing.apps.portrait_people import Person, Ranked, fuse_and_rank
from danqing.apps.portrait_styles import PortraitStyle, style_requests
from danqing.errors import InvalidRequest
from danqing.faces.backend import FaceBackend
from danqing.outputs.infotext import format_infotext, parse_infotext


@dataclass
class Portrait:
    """One kept picture: its ranking, its seed and its infotext (generation + ranking fields)."""

    ranked: Ranked
    seed: int
    infotext: str


def with_fields(infotext: str, fields: dict[str, str]) -> str:
    """An infotext with ``fields`` added to its parameters line (a bare fields line when empty)."""
    if not infotext:
        return ", ".join(f"{k}: {v}" for k, v in fields.items())
    prompt, negative, params = parse_infotext(infotext)
    return format_infotext(prompt, negative, {**params, **fields})


def make_portraits(studio, person: Person, style: PortraitStyle, backend: FaceBackend, *, n: int = 4,
                   keep: int | None = None, person_lora: str | None = None, model: str | None = None,
                   seed: int = -1, steps: int | None = None, fuse: float | None = None,
                   method: str = "seamless", on_picture=None) -> list[Portrait]:
    """``n`` pictures of ``person`` in ``style``, fused (optionally) and ranked; the best ``keep``.

    Args:
        studio: a ``Studio`` (or the server's ``QueuedStudio``).
        person, style, backend: who, how, and the face backend that scores them.
        n, keep: pictures made and kept (``keep`` None: all, ranked).
        person_lora: the person's LoRA name in models/lora/ (None: the style alone).
        model: the checkpoint (None: the settings' default); seed: the first seed (-1: random).
        steps: overrides the style's steps (e.g. a quick look).
        fuse, method: face-fusion strength (None: no fusion) and method (``fuse_face``).
        on_picture: called as ``on_picture(i, n)`` after each picture is generated.
    """
    keep = n if keep is None else keep
    if not 1 <= keep <= n:
        raise InvalidRequest("keep", f"{keep}: between 1 and the number of pictures ({n})")
    requests = style_requests(style, person.trigger, n=n, person_lora=person_lora, model=model, seed=seed)
    if steps is not None:
        requests = [r.replace(steps=steps) for r in requests]
    pictures, seeds, texts = [], [], []
    for i, request in enumerate(requests):
        result = studio.generate(request)
        pictures.append(np.asarray(result.images[0].convert("RGB")))
        seeds.append(result.seeds[0])
        texts.append(result.infotexts[0])
        if on_picture is not None:
            on_picture(i + 1, n)
    ranked = fuse_and_rank(pictures, person, backend, keep=keep, fuse=fuse, method=method)
    out = []
    for rank, item in enumerate(ranked, 1):
        fields = {"Portrait style": style.name, "Portrait person": person.name,
                  **item.metadata(rank, n, backend)}
        if item.fused:
            fields["Face fusion"] = f"{fuse:g} {method}"
        out.append(Portrait(item, seeds[item.index], with_fields(texts[item.index], fields)))
    return out
