"""A1111 prompt syntax, as pure functions (no torch).

Two stages, as in AUTOMATIC1111's ``modules/prompt_parser.py`` (stable-diffusion-webui >= 1.6):

1. ``prompt_schedule`` resolves prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]``
   and alternation ``[a|b]`` into the text used at each sampler step.
2. ``parse_attention`` turns one such text into (piece, weight) pairs: ``(x)`` x1.1, ``((x))``
   x1.21, ``(x:1.3)`` (negative weights too), ``[x]`` /1.1, and ``BREAK``.

A backslash escapes the next character: ``\\( \\) \\[ \\] \\: \\|`` are literal, ``\\\\`` is one
backslash, and any other backslash is dropped, so a backslash never reaches the tokenizer unless
it was escaped. A ``[...]`` holding ``:`` whose last part is not a number (``[note: text]``) is
not an edit: it stays text, as in A1111, and stage 2 reads its brackets as ``[x]``.

Where A1111 silently repairs a broken prompt (an unclosed bracket weighs the rest of the
prompt; an unparsable schedule turns into plain text), danqing refuses it with a
``PromptSyntaxError`` that names the position and how to write it. docs/prompts.md lists every
such difference beside A1111's behaviour. Brackets nest at most ``MAX_NESTING`` deep.

``when`` follows A1111 >= 1.6: a number with a decimal point is a fraction of the steps
(``0.5`` = half way), an integer is a step number; ``[a:b:10]`` uses ``a`` up to and including
step 10 and ``b`` after.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from danqing.errors import PromptSyntaxError

ROUND = 1.1  # A1111 "(x)" multiplier
SQUARE = 1 / 1.1  # A1111 "[x]" multiplier
MAX_NESTING = 100  # ( and [ levels; deeper prompts are refused (the parser recurses once a level)
_WHEN = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")  # A1111's SIGNED_NUMBER (lark common)


# ---------------------------------------------------------------------------------------------
# Stage 1: prompt editing and alternation
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    """Brackets that are kept in the text: ``( ... )`` or ``[ ... ]`` (emphasis)."""

    open: str
    body: tuple
    close: str


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``: ``before`` up to and including step ``when``, then ``after``."""

    before: tuple
    after: tuple
    when: float
    when_text: str


@dataclass(frozen=True)
class _Alternate:
    """``[a|b|c]``: option (step - 1) % n at 1-based step ``step``."""

    options: tuple


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.depth = 0  # brackets open around self.i

    def error(self, what: str, pos: int) -> PromptSyntaxError:
        return PromptSyntaxError(what.format(pos=pos))

    def enter(self, pos: int) -> None:
        """One more bracket level; refused past MAX_NESTING so that recursion stays shallow."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"brackets nest more than {MAX_NESTING} deep at position {{pos}}; "
                             f"at most {MAX_NESTING} nested '(' and '[' are allowed", pos)

    def seq(self, context: str) -> tuple:
        """Nodes until the end of this context: ')' for 'paren'; ':' '|' ']' for 'bracket'."""
        nodes: list = []
        buf: list[str] = []

        def flush():
            if buf:
                nodes.append("".join(buf))
                buf.clear()

        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == "\\":
                buf.append(s[self.i : self.i + 2])  # escapes stay for the attention parser
                self.i += 2
            elif c == "(":
                flush()
                start = self.i
                self.enter(start)
                self.i += 1
                body = self.seq("paren")
                if self.i >= len(s):
                    raise self.error("unbalanced '(' at position {pos}: it is never closed; close it with ')' or escape a literal bracket as \\(", start)
                self.i += 1
                self.depth -= 1
                nodes.append(_Group("(", body, ")"))
            elif c == ")":
                if context == "paren":
                    flush()
                    return tuple(nodes)
                raise self.error("unbalanced ')' at position {pos}: no '(' before it; escape a literal bracket as \\)", self.i)
            elif c == "[":
                flush()
                nodes.append(self.bracket())
            elif c in ":|]" and context == "bracket":
                flush()
                return tuple(nodes)
            elif c == "]":
                raise self.error("unbalanced ']' at position {pos}: no '[' before it; escape a literal bracket as \\]", self.i)
            else:
                buf.append(c)
                self.i += 1
        flush()
        return tuple(nodes)

    def bracket(self):
        s = self.s
        start = self.i
        self.enter(start)
        self.i += 1
        parts, seps = [self.seq("bracket")], []
        while True:
            if self.i >= len(s):
                raise self.error("unbalanced '[' at position {pos}: it is never closed; close it with ']' or escape a literal bracket as \\[", start)
            c = s[self.i]
            self.i += 1
            if c == "]":
                break
            seps.append(c)
            parts.append(self.seq("bracket"))
        self.depth -= 1
        if not seps:
            return _Group("[", parts[0], "]")
        if all(sep == "|" for sep in seps):
            return _Alternate(tuple(parts))
        when_text = "".join(p for p in parts[-1] if isinstance(p, str)).strip()
        if len(parts[-1]) != 1 or not _WHEN.fullmatch(when_text):
            # Not an edit ("[note: text]"): the brackets and separators stay text, as in A1111.
            body = list(parts[0])
            for sep, part in zip(seps, parts[1:]):
                body += [sep, *part]
            return _Group("[", tuple(body), "]")
        if "|" in seps or len(seps) > 2:
            raise self.error(
                "the '[...]' at position {pos} mixes ':' and '|' or has more than two ':'; write [from:to:when], [to:when], [from::when] or [a|b]",
                start,
            )
        when = float(when_text)
        if not math.isfinite(when):
            raise self.error(f"prompt editing at position {{pos}}: 'when' {when_text!r} is too large; write a step number or a fraction", start)
        before, after = (parts[0], parts[1]) if len(seps) == 2 else ((), parts[0])
        return _Edit(before, after, when, when_text)


def _when_step(edit: _Edit, steps: int, offset: int = 0) -> int:
    """A1111 >= 1.6: "0.5" (has a '.') is a fraction of steps; "10" is step 10; capped at steps.

    ``offset``: a hires pass's first-pass steps (A1111's ``int_offset``): the timeline goes on
    from the first pass, so "25" after a 20-step first pass is hires step 5 and "1.5" is half
    way through the hires pass (fractions are shifted by 1 in the same way)."""
    v = (edit.when - (1.0 if offset else 0.0)) * steps if "." in edit.when_text else edit.when - offset
    return min(steps, int(v))


def _collect_steps(nodes: tuple, steps: int, out: set[int], offset: int = 0) -> None:
    for n in nodes:
        if isinstance(n, _Group):
            _collect_steps(n.body, steps, out, offset)
        elif isinstance(n, _Edit):
            w = _when_step(n, steps, offset)
            if w >= 1:
                out.add(w)
            _collect_steps(n.before, steps, out, offset)
            _collect_steps(n.after, steps, out, offset)
        elif isinstance(n, _Alternate):
            out.update(range(1, steps + 1))
            for o in n.options:
                _collect_steps(o, steps, out, offset)


def _render(nodes: tuple, step: int, steps: int, offset: int = 0) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif isinstance(n, _Group):
            out.append(n.open + _render(n.body, step, steps, offset) + n.close)
        elif isinstance(n, _Edit):
            out.append(_render(n.before if step <= _when_step(n, steps, offset) else n.after, step, steps, offset))
        else:
            out.append(_render(n.options[(step - 1) % len(n.options)], step, steps, offset))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """The text of ``prompt`` at each sampler step (A1111 ``get_learned_conditioning_prompt_schedules``).

    Args:
        prompt: A1111 prompt text.
        steps: number of sampler steps (>= 1); with ``hires_steps``, the first pass's.
        hires_steps: the schedule of a hires fix's second pass of this many steps, on one
            timeline with the first pass (A1111 >= 1.6): an integer ``when`` counts from the
            start of the first pass, a fraction between 1 and 2 falls inside the hires pass,
            one of at most 1 (or a step within the first pass) is over before it starts.

    Returns:
        [(end_at_step, text), ...]: ``text`` applies up to and including 1-based step
        ``end_at_step``; the last entry ends at ``steps``. Consecutive equal texts are merged.
        Example: ``prompt_schedule("a [cat:dog:10]", 20) == [(10, "a cat"), (20, "a dog")]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    offset = 0
    if hires_steps is not None:
        if hires_steps < 1:
            raise ValueError(f"hires_steps must be >= 1, got {hires_steps}")
        offset, steps = steps, hires_steps
    parser = _Parser(prompt)
    nodes = parser.seq("top")
    points: set[int] = {steps}
    _collect_steps(nodes, steps, points, offset)
    schedule: list[tuple[int, str]] = []
    for t in sorted(points):
        text = _render(nodes, t, steps, offset)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (t, text)
        else:
            schedule.append((t, text))
    return schedule


# ---------------------------------------------------------------------------------------------
# Stage 2: emphasis weights
# ---------------------------------------------------------------------------------------------
_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\:]                          # an escaped bracket, backslash or colon: literal
    | \\                                   # any other backslash is dropped (A1111)
    | \( | \[                              # openers
    | :\s*([+-]?[.\d]+)\s*\)               # ":1.3)" closes a weighted group
    | \) | \]                              # closers
    | [^\\()\[\]:]+                        # plain text
    | :                                    # a colon that is just text
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(piece, weight) pairs of one prompt text (A1111 ``parse_prompt_attention``).

    ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:w)`` multiplies by w (w may be
    negative); nested groups multiply. ``BREAK`` yields ("BREAK", -1.0). Neighbouring pieces of
    equal weight are merged (never into a BREAK). ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\:`` ``\\\\``
    are literal characters; any other backslash is dropped.
    Example: ``parse_attention("an (important) word") ==
    [("an ", 1.0), ("important", 1.1), (" word", 1.0)]``.
    """
    res: list[list] = []  # [piece, weight, is_break]
    round_open: list[tuple[int, int]] = []  # (index in res, position in text)
    square_open: list[tuple[int, int]] = []

    def multiply(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        pos = m.start()
        if tok.startswith("\\"):
            if len(tok) == 2:
                res.append([tok[1], 1.0, False])
        elif tok == "(":
            round_open.append((len(res), pos))
        elif tok == "[":
            square_open.append((len(res), pos))
        elif weight is not None:
            if not round_open:
                raise PromptSyntaxError(f"unbalanced ')' at position {m.end() - 1}: no '(' before it; escape a literal bracket as \\)")
            try:
                w = float(weight)
            except ValueError:
                raise PromptSyntaxError(f"weight {weight!r} at position {pos + 1} is not a number; write (word:1.2)") from None
            multiply(round_open.pop()[0], w)
        elif tok == ")":
            if not round_open:
                raise PromptSyntaxError(f"unbalanced ')' at position {pos}: no '(' before it; escape a literal bracket as \\)")
            multiply(round_open.pop()[0], ROUND)
        elif tok == "]":
            if not square_open:
                raise PromptSyntaxError(f"unbalanced ']' at position {pos}: no '[' before it; escape a literal bracket as \\]")
            multiply(square_open.pop()[0], SQUARE)
        else:
            parts = _BREAK.split(tok)
            for k, part in enumerate(parts):
                if k > 0:
                    res.append(["BREAK", -1.0, True])
                res.append([part, 1.0, False])
    for opened, what in ((round_open, "("), (square_open, "[")):
        if opened:
            close = ")" if what == "(" else "]"
            raise PromptSyntaxError(
                f"unbalanced '{what}' at position {opened[-1][1]}: it is never closed; close it with '{close}' or escape a literal bracket as \\{what}"
            )
    res = [r for r in res if r[0] != "" or r[2]]
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for piece, w, is_break in res[1:]:
        if w == merged[-1][1] and not is_break and not merged[-1][2]:
            merged[-1][0] += piece
        else:
            merged.append([piece, w, is_break])
    return [(p, w) for p, w, _ in merged]


# ---------------------------------------------------------------------------------------------
# Extra networks: <lora:name:0.8>
# ---------------------------------------------------------------------------------------------
_EXTRA = re.compile(r"<(\w+):([^>]+)>")


def strip_extra_networks(prompt: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """Remove A1111 extra-network tags (``<lora:name:0.8>``) and return them in order.

    Returns:
        (prompt without the tags, [(network type, [args...]), ...])
    """
    found: list[tuple[str, list[str]]] = []

    def take(m: re.Match) -> str:
        found.append((m.group(1), m.group(2).split(":")))
        return ""

    return _EXTRA.sub(take, prompt), found
