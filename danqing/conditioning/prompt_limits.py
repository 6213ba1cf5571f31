"""Cheap checks of a prompt's shape, run before the prompt parser (pure functions, no torch).

``prompt_parser`` parses brackets recursively, a few Python frames per level: a prompt nested a
thousand ``(`` or ``[a:`` deep would exhaust Python's recursion limit. ``nesting_depth`` finds the
depth with one loop and no recursion, so such a prompt is refused with a one-line
``InvalidRequest`` before the parser sees it. ``check_prompt`` adds a length bound and refuses
text that is not valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"`` in a JSON string).
"""

from __future__ import annotations

import re

from danqing.conditioning.prompt_parser import MAX_NESTING
from danqing.errors import InvalidRequest

# Deepest bracket nesting any prompt may have: the parser's own bound (far below what its
# recursion can take, far above what a prompt needs: A1111 users rarely nest more than three or
# four levels).
PARSER_MAX_DEPTH = MAX_NESTING
OPENERS, CLOSERS = "([", ")]"
_BRACKETS = re.compile(r"\\.|[()\[\]]", re.S)  # an escape pair, or one bracket


def nesting_depth(text: str) -> tuple[int, int]:
    """The deepest bracket nesting of ``text`` and where it is first reached.

    Counts ``(`` and ``[`` (emphasis, prompt editing ``[a:b:when]``, alternation ``[a|b]``) the
    way the A1111 parser reads them: a backslash escapes the next character; a closer without an
    opener counts nothing (the parser reports it).

    Args:
        text: the prompt.

    Returns:
        (depth, position): the maximum depth and the index of the opener that reached it
        (-1 when the text has no brackets).
    """
    depth = best = 0
    where = -1
    for m in _BRACKETS.finditer(text):  # only escapes and brackets: one C-speed scan of the text
        c = m.group()
        if c in OPENERS:
            depth += 1
            if depth > best:
                best, where = depth, m.start()
        elif c in CLOSERS and depth:
            depth -= 1
    return best, where


def lone_surrogate(text: str) -> int:
    """Index of the first lone UTF-16 surrogate (U+D800-U+DFFF) in ``text``; -1 when none.
    Such a string cannot be written as UTF-8 (to a PNG, a database, a JSON answer)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return -1


def check_prompt(text: str, field: str, *, max_chars: int | None = None, max_depth: int = PARSER_MAX_DEPTH) -> str:
    """Refuse a prompt that is too long, nested too deeply or not valid Unicode.

    Args:
        text: the prompt (any prompt-like field: prompt, negative prompt, hires prompt, ...).
        field: the request field named in the error.
        max_chars: the most characters allowed; None = no bound on length.
        max_depth: the deepest bracket nesting allowed (at most ``PARSER_MAX_DEPTH``).

    Returns:
        ``text`` unchanged.

    Raises:
        InvalidRequest: naming ``field`` and the limit.
    """
    if max_chars is not None and len(text) > max_chars:
        raise InvalidRequest(field, f"{len(text)} characters is more than the limit of {max_chars} "
                                    f"(max_prompt_chars)")
    bad = lone_surrogate(text)
    if bad >= 0:
        raise InvalidRequest(field, f"character {bad} is a lone UTF-16 surrogate (U+{ord(text[bad]):04X}); "
                                    "prompts must be valid Unicode text")
    depth, where = nesting_depth(text)
    limit = min(max_depth, PARSER_MAX_DEPTH)
    if depth > limit:
        raise InvalidRequest(field, f"brackets nested {depth} deep (reached at position {where}) is more than the "
                                    f"limit of {limit} (max_prompt_depth); escape literal brackets as \\( \\[")
    return text
