"""Prompt styles: A1111's ``styles.csv``, read, written and applied as A1111 does.

The file (``HOME/styles.csv``, where A1111 keeps it in its root folder) is a CSV with the header
``name,prompt,negative_prompt``, UTF-8 with a byte-order mark (A1111 writes ``utf-8-sig``;
files without the mark read the same). Rows whose name starts with ``#`` are comments; a file of
A1111's old two-column format (``name,text``) reads too.

Applying a style (A1111 ``modules/styles.py``: ``merge_prompts``): a style prompt holding the
placeholder ``{prompt}`` has it replaced by the prompt; one without it is appended to the prompt
with ``", "`` (empty parts dropped). The negative prompt is merged the same way with the style's
negative prompt. Several styles apply in the order given, each to the result of the one before.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from danqing.errors import InvalidRequest
from danqing.files import atomic_write_text

STYLES_FILE = "styles.csv"
FIELDS = ("name", "prompt", "negative_prompt")  # A1111's column order
PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    """One row of ``styles.csv``."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


def styles_path(home: Path) -> Path:
    """Where the styles live: ``HOME/styles.csv``."""
    return Path(home) / STYLES_FILE


def parse_styles(text: str) -> dict[str, Style]:
    """The styles of a ``styles.csv`` text, by name, in file order (a later row of the same name
    wins, as in A1111)."""
    text = text.lstrip("\ufeff")
    styles: dict[str, Style] = {}
    for row in csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True):
        name = row.get("name")
        if not name or name.startswith("#"):
            continue
        prompt = row.get("prompt", row.get("text")) or ""
        styles[name] = Style(name, prompt, row.get("negative_prompt") or "")
    return styles


def read_styles(path: Path) -> dict[str, Style]:
    """The styles of a ``styles.csv`` file; a missing file has none."""
    path = Path(path)
    if not path.is_file():
        return {}
    return parse_styles(path.read_text(encoding="utf-8-sig"))


def format_styles(styles: list[Style] | dict[str, Style]) -> str:
    """A ``styles.csv`` text as A1111 writes it (header, every field as ``csv`` quotes it,
    ``\\r\\n`` line ends; the byte-order mark is added by ``write_styles``)."""
    rows = styles.values() if isinstance(styles, dict) else styles
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    for s in rows:
        writer.writerow({"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt})
    return buf.getvalue()


def write_styles(path: Path, styles: list[Style] | dict[str, Style], *, overwrite: bool = True) -> Path:
    """Write ``styles.csv`` atomically, UTF-8 with a byte-order mark (A1111's ``utf-8-sig``)."""
    return atomic_write_text(Path(path), "\ufeff" + format_styles(styles), overwrite=overwrite)


def merge_prompt(style_prompt: str, prompt: str) -> str:
    """A1111's ``merge_prompts``: substitute ``{prompt}``, else append with ``", "``."""
    if PLACEHOLDER in style_prompt:
        return style_prompt.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, names: list[str] | tuple[str, ...],
                 styles: dict[str, Style], *, field: str = "styles") -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles applied in order.

    Raises:
        InvalidRequest: a name that is not a style, listing the known ones.
    """
    for name in names:
        style = styles.get(name)
        if style is None:
            raise unknown_style(name, styles, field=field)
        prompt = merge_prompt(style.prompt, prompt)
        negative_prompt = merge_prompt(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def unknown_style(name: str, styles: dict[str, Style], *, field: str = "styles") -> InvalidRequest:
    shown = name if len(name) <= 120 else name[:120] + "..."
    known = ", ".join(styles) or f"none (add rows to {STYLES_FILE} in the danqing home)"
    return InvalidRequest(field, f"unknown style {shown!r}; known styles: {known}")
