"""Creative text's fonts: CJK words drawn with an installed CJK font (found by fontconfig or in
the system font folders), and words a font cannot draw refused naming the characters."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need

from danqing.apps import control_projects as cp
from danqing.errors import InvalidRequest


def _cjk_font():
    fonts = [f for f in cp.cjk_fonts() if not cp.missing_glyphs(f, "丹青")]
    need(bool(fonts), "a CJK font", "Debian: apt-get install fonts-wqy-microhei; .ci/run installs it")
    return fonts[0]


def _runs(on: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a 1-D array, as (start, end) exclusive."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_cjk_word_is_drawn_with_a_cjk_font():
    """"丹青" with no font given: DejaVu lacks both characters, so an installed CJK font draws
    them: ink, in two glyphs side by side (two runs of inked columns, one in each half)."""
    font = _cjk_font()
    assert cp.missing_glyphs(font, "丹青 OK") == []
    assert cp.choose_font("丹青") in cp.cjk_fonts()
    mask = np.asarray(cp.word_mask("丹青", 128)) > 127
    assert 0.05 < mask.mean() < 0.6
    runs = _runs(mask.any(axis=0))
    assert len(runs) == 2, runs
    (a0, a1), (b0, b1) = runs
    assert a1 <= 64 <= b0 and min(a1 - a0, b1 - b0) > 30  # one glyph per half, each a real width
    explicit = np.asarray(cp.word_mask("丹青", 128, font=font)) > 127
    assert explicit.mean() > 0.05  # the same font named explicitly


def test_missing_glyphs_are_named():
    dejavu = cp.find_font("DejaVuSans-Bold.ttf")
    assert cp.missing_glyphs(dejavu, "OK 丹x青") == ["丹", "青"]
    with pytest.raises(InvalidRequest, match=r"font: DejaVuSans-Bold.ttf has no glyph for '丹青'; give a font that "
                                             r"covers the word \((e\.g\. /|Debian)"):
        cp.word_mask("OK丹青", 64, font="DejaVuSans-Bold.ttf")


def test_no_cjk_font_says_what_to_install(monkeypatch):
    monkeypatch.setattr(cp, "cjk_fonts", lambda: [])
    with pytest.raises(InvalidRequest, match=r"no installed font has a glyph for '丹青' \(tried DejaVuSans-Bold.ttf\); "
                                             r"Debian/Ubuntu: apt-get install fonts-wqy-microhei"):
        cp.word_mask("A丹青", 64)
    with pytest.raises(InvalidRequest, match="has no glyph for '丹'.*apt-get install fonts-wqy-microhei"):
        cp.word_mask("丹", 64, font="DejaVuSans-Bold.ttf")
    assert np.asarray(cp.word_mask("OK", 64)).max() == 255  # Latin needs no CJK font
