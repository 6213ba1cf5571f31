"""Wildcards and dynamic prompts (the syntax of the sd-dynamic-prompts extension for A1111).

A template is resolved into a plain prompt before the request is made, with a random generator
seeded by the request's seed, so the same seed always draws the same prompt:

- ``__name__``: one line of ``HOME/wildcards/name.txt`` (``__folder/name__`` for
  ``wildcards/folder/name.txt``). Blank lines and lines starting with ``#`` are skipped; a line
  may itself hold wildcards and variants, resolved in turn (at most ``MAX_DEPTH`` deep).
- ``{a|b|c}``: one of the variants; ``{2$$a|b|c}`` two different ones joined with ``", "``;
  ``{1-3$$a|b|c}`` between one and three; ``{2$$ and $$a|b|c}`` joined with ``" and "``.
  Variants may be empty and may hold their own variants and wildcards.
- ``\\{``, ``\\}``, ``\\|`` and ``\\_`` are kept as they are (with the backslash): the prompt
  parser then reads them as the literal characters (docs/prompts.md).

The syntax does not clash with A1111's prompt syntax: braces mean nothing there, and a ``|``
splits variants only outside ``(...)`` and ``[...]`` of the variant, so ``{[cat|dog]|bird}``
keeps the alternation ``[cat|dog]`` as one variant.

Names are looked up among the ``.txt`` files found inside the wildcards folder (symlinks that
lead out of it are not listed), never opened as a path built from the prompt.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from danqing.errors import InvalidRequest
from danqing.models.names import within

WILDCARDS_DIR = "wildcards"
MAX_DEPTH = 20  # nested wildcards/variants: a wildcard file that names itself stops here
WILDCARD = re.compile(r"__([\w\-/.]+?)__")
_COUNT = re.compile(r"\s*(\d+)?\s*(?:-\s*(\d+)?\s*)?\$\$")
_OPEN, _CLOSE = "([", ")]"


def wildcards_folder(home: Path) -> Path:
    """Where the wildcard files live: ``HOME/wildcards``."""
    return Path(home) / WILDCARDS_DIR


def wildcard_files(folder: Path) -> dict[str, Path]:
    """``{name: file}`` of every ``.txt`` file under ``folder`` (nested: ``folder/name``), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    files = within(sorted(folder.rglob("*.txt")), folder)
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in files if p.is_file()}


def wildcard_lines(path: Path) -> list[str]:
    """The choices of a wildcard file: its lines, stripped, without blanks and ``#`` comments."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def has_dynamic(text: str) -> bool:
    """Whether ``text`` holds a wildcard or an (unescaped) variant brace."""
    return bool(WILDCARD.search(text)) or bool(re.search(r"(?<!\\)[{}]", text))


def resolve_dynamic(text: str, seed: int, folder: Path | None, *, field: str = "prompt") -> str:
    """The prompt a template draws with ``seed`` (see the module docstring).

    Args:
        text: the template.
        seed: the request's seed (a resolved one, not -1).
        folder: the wildcards folder (None: wildcards are refused).
        field: the request field, for errors.

    Raises:
        InvalidRequest: an unknown wildcard (listing the known ones), an empty wildcard file,
            unbalanced braces, a bad ``N$$`` count, or nesting deeper than ``MAX_DEPTH``.
    """
    return _Resolver(random.Random(seed), folder, field).expand(text, 0)


class _Resolver:
    """One resolution: the generator and the files read so far (never shared between requests)."""

    def __init__(self, rng: random.Random, folder: Path | None, field: str):
        self.rng, self.folder, self.field = rng, folder, field
        self.files: dict[str, Path] | None = None
        self.lines: dict[str, list[str]] = {}

    def error(self, message: str) -> InvalidRequest:
        return InvalidRequest(self.field, message)

    def expand(self, text: str, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise self.error(f"wildcards and variants nested more than {MAX_DEPTH} deep (does a wildcard file "
                             f"name itself?)")
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c == "\\":
                out.append(text[i:i + 2])
                i += 2
            elif c == "{":
                end = self.closing(text, i)
                out.append(self.variants(text[i + 1:end], depth))
                i = end + 1
            elif c == "}":
                raise self.error(f"unbalanced '}}' at position {i}: no '{{' opens it; escape a literal brace as \\}}")
            elif text.startswith("__", i) and (m := WILDCARD.match(text, i)):
                out.append(self.expand(self.rng.choice(self.wildcard(m.group(1))), depth + 1))
                i = m.end()
            else:
                out.append(c)
                i += 1
        return "".join(out)

    def closing(self, text: str, start: int) -> int:
        depth, i = 0, start
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return i
            i += 1
        raise self.error(f"unbalanced '{{' at position {start}: it is never closed; close it with '}}' or escape a "
                         f"literal brace as \\{{")

    def variants(self, body: str, depth: int) -> str:
        count, sep = (1, 1), ", "
        m = _COUNT.match(body)
        if m and (m.group(1) or m.group(2)):
            lo = int(m.group(1) or 1)
            hi = int(m.group(2)) if m.group(2) else (lo if "-" not in m.group(0) else None)
            body = body[m.end():]
            if "$$" in body:
                sep, body = body.split("$$", 1)
            count = (lo, hi)
        options = split_top(body)
        lo, hi = count
        hi = len(options) if hi is None else hi
        if lo > hi:
            raise self.error(f"variant count {lo}-{hi}: the first number must not exceed the second")
        k = min(self.rng.randint(lo, hi) if lo != hi else lo, len(options))
        chosen = self.rng.sample(options, k) if k != 1 else [self.rng.choice(options)]
        return sep.join(self.expand(o, depth + 1) for o in chosen)

    def wildcard(self, name: str) -> list[str]:
        if name in self.lines:
            return self.lines[name]
        if self.files is None:
            self.files = wildcard_files(self.folder) if self.folder is not None else {}
        path = self.files.get(name)
        if path is None:
            shown = name if len(name) <= 120 else name[:120] + "..."
            known = ", ".join(f"__{k}__" for k in self.files) or "none"
            raise self.error(f"unknown wildcard __{shown}__: give the name of a .txt file in the wildcards folder "
                             f"({WILDCARDS_DIR}/ in the danqing home); known: {known}")
        lines = wildcard_lines(path)
        if not lines:
            raise self.error(f"wildcard __{name}__: its file has no lines to choose from")
        self.lines[name] = lines
        return lines


def split_top(body: str) -> list[str]:
    """The variants of a ``{...}`` body: split at ``|`` outside nested ``{}``, ``()`` and ``[]``
    (escaped characters never split)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            i += 2
            continue
        if c == "{" or c in _OPEN:
            depth += 1
        elif c == "}" or c in _CLOSE:
            depth = max(0, depth - 1)
        elif c == "|" and depth == 0:
            parts.append(body[start:i])
            start = i + 1
        i += 1
    parts.append(body[start:])
    return parts
