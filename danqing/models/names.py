"""Names at the edge: the one resolver for every model a server request names.

A server request names checkpoints, VAEs, refiners, LoRA/LyCORIS tags, embeddings, ControlNets,
IP-Adapters and their image encoders, upscalers and face-restoration models. Each is looked up
*by name* among the files installed in its own folder of ``models/`` (the same listing the server
shows), never opened as a path: the client's string is only ever compared with the names of that
listing. So an absolute path, a ``../`` path, a backslash, a symlink that leads out of its folder
and a name that is simply not installed all get one answer (``refusal``), whether or not a file
of that name exists anywhere else: the message is no existence oracle.

A symlink inside a kind's folder that resolves outside it is not listed and not resolvable in
names-only mode (the folder itself may be a symlink: keep models on another disk by linking the
whole ``models/checkpoints`` folder). The CLI, run by the user, may still take paths
(``Registry.find`` without ``names_only``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from danqing.errors import InvalidRequest

MAX_SHOWN = 120  # characters of a refused name echoed back
NEW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Named:
    """One installed model as a client may name it.

    Attributes:
        name: the canonical name (what listings show and the request carries once resolved).
        path: the file or folder; None for a model built into danqing.
        aliases: other names that select it (its file name with suffix, its base name).
    """

    name: str
    path: Path | None = None
    aliases: tuple[str, ...] = ()


def inside(path: Path, root: Path) -> bool:
    """``path`` lies inside ``root`` once every symlink of both is followed."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except (OSError, ValueError):
        return False


def within(paths: Iterable[Path], root: Path) -> list[Path]:
    """The ``paths`` that stay inside ``root`` (symlinks followed), in order."""
    return [p for p in paths if inside(p, root)]


def strip_title(name: str) -> str:
    """An A1111 title ``"name [hash]"`` -> ``"name"``; other strings unchanged."""
    if name.endswith("]") and " [" in name:
        return name.rsplit(" [", 1)[0]
    return name


def refusal(field: str, what: str, folder: str, name: object, available: Iterable[str]) -> InvalidRequest:
    """The one answer for a name that does not select an installed model.

    Args:
        field: the request field (``model``, ``prompt``, ``controlnet.0.model``, ...).
        what: what the field names ("checkpoint", "LoRA", ...).
        folder: its folder under ``models/`` ("checkpoints", "lora", ...).
        name: what the client sent (echoed, shortened; the message depends on nothing else).
        available: the installed names.
    """
    shown = str(name)
    if len(shown) > MAX_SHOWN:
        shown = shown[:MAX_SHOWN] + "..."
    names = ", ".join(available) or "none"
    return InvalidRequest(field, f"unknown {what} {shown!r}: give the name of a model installed in models/{folder}/ "
                                 f"(names only, never paths); installed: {names}")


def resolve(name: object, candidates: Iterable[Named], *, field: str, what: str, folder: str,
            sha256: Callable[[Named], str] | None = None) -> Named:
    """The installed model a client's name selects, compared with the listing only.

    Args:
        name: the client's string: a name, a file name, an A1111 title ``"name [hash]"`` or
            (with ``sha256``) a short or full hash of 8-64 hex digits.
        candidates: the installed models of that kind (already limited to their folder).
        field, what, folder: for the refusal (see ``refusal``).
        sha256: the hash of a candidate, when the kind is addressed by hash too.

    Raises:
        InvalidRequest: anything else, with one message per field (``refusal``).
    """
    candidates = list(candidates)
    if isinstance(name, str) and 0 < len(name) <= 1024:
        for wanted in dict.fromkeys((name, strip_title(name))):  # "x [fp16]" may be a file's own name
            for c in candidates:
                if wanted == c.name or wanted in c.aliases:
                    return c
        q = name.strip("[] ").lower()
        if sha256 is not None and 8 <= len(q) <= 64 and all(ch in "0123456789abcdef" for ch in q):
            for c in candidates:
                if c.path is not None and sha256(c).startswith(q):
                    return c
    raise refusal(field, what, folder, name, [c.name for c in candidates])


def check_new_name(name: object, field: str, what: str) -> str:
    """A name for something danqing creates (a person of the portrait studio, ...): 1-64
    letters, digits, ``-`` and ``_``, starting with a letter or digit, so that it is one file
    name inside its folder. Returns the name; raises ``InvalidRequest`` otherwise."""
    if isinstance(name, str) and NEW_NAME.fullmatch(name):
        return name
    shown = str(name)[:MAX_SHOWN]
    raise InvalidRequest(field, f"{shown!r} is not a usable {what} name: use 1-64 letters, digits, '-' or '_', "
                                f"starting with a letter or digit")
