"""Visemes: the mouth shape over time, from phonemes (spoken text) or from loudness (a sound file),
smoothed and sampled at the video's frame rate. The table is data (``data/visemes.json``); these
are pure functions of it.

A track is two (F,) arrays: ``open`` (0 closed .. 1 widest) and ``width`` (mouth width relative
to rest). Phonemes give a step function (each phone's viseme over its span) that is shifted
earlier by ``lead_ms`` (the lips move before the sound is heard), smoothed by a Gaussian of
``smoothing_ms`` and averaged over each frame's span.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from danqing.apps.speech import Phone, table

_STRIP = "ː.ˑ̩ʰ"  # length, retroflex (espeak's "s."), syllabic and aspiration marks
_GRID = 1000  # the step function is built on a 1 ms grid


@dataclass(frozen=True)
class Track:
    """Mouth shape per video frame: ``open`` and ``width``, (F,) float arrays."""

    open: np.ndarray
    width: np.ndarray
    fps: float

    @property
    def frames(self) -> int:
        return len(self.open)


def viseme_of(phone: str, data: dict | None = None) -> str | None:
    """The viseme of an espeak-ng IPA phoneme name: the name itself, then without length and
    retroflex marks, then its first character; None when the table knows none of them."""
    phonemes = (data or table())["phonemes"]
    for key in (phone, "".join(c for c in phone if c not in _STRIP), phone[:1]):
        if key in phonemes:
            return phonemes[key]
    return None


def shape_of(phone: str, data: dict | None = None) -> tuple[float, float]:
    """(open, width) of a phoneme; an unknown one is half open (a vowel-like sound, not silence)."""
    data = data or table()
    name = viseme_of(phone, data)
    v = data["visemes"][name] if name is not None else {"open": 0.5, "width": 1.0}
    return float(v["open"]), float(v["width"])


def frame_count(seconds: float, fps: float) -> int:
    """Frames that cover ``seconds`` of sound: ceil(seconds * fps), at least one."""
    return max(1, int(np.ceil(seconds * fps - 1e-9)))


def smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian filter of ``sigma`` samples, the ends continued by their edge values."""
    if sigma <= 0:
        return np.asarray(x, np.float64)
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(np.asarray(x, np.float64), sigma, mode="nearest")


def _per_frame(grid: np.ndarray, fps: float, frames: int) -> np.ndarray:
    """Mean of a 1 ms grid over each frame's span [f / fps, (f + 1) / fps)."""
    edges = np.round(np.arange(frames + 1) * _GRID / fps).astype(int)
    padded = np.concatenate([grid, np.full(max(0, edges[-1] - len(grid)), grid[-1] if len(grid) else 0.0)])
    return np.array([padded[a:max(b, a + 1)].mean() for a, b in zip(edges[:-1], edges[1:])])


def phone_track(phones: tuple[Phone, ...] | list[Phone], seconds: float, fps: float, data: dict | None = None) -> Track:
    """The mouth track of spoken phonemes.

    Args:
        phones: the phonemes with their spans (``speech.speak``).
        seconds: length of the audio; the track has ``frame_count(seconds, fps)`` frames.
        fps: the video's frames per second.
        data: the viseme table (default ``data/visemes.json``).
    """
    data = data or table()
    n = int(round(seconds * _GRID)) + 1
    rest = data["visemes"]["rest"]
    opening, width = np.full(n, float(rest["open"])), np.full(n, float(rest["width"]))
    lead = data.get("lead_ms", 0) / 1000
    for p in phones:
        a, b = (int(round(max(t - lead, 0) * _GRID)) for t in (p.start, p.end))
        opening[a:b], width[a:b] = shape_of(p.name, data)
    sigma = data["smoothing_ms"] * _GRID / 1000
    frames = frame_count(seconds, fps)
    return Track(_per_frame(smooth(opening, sigma), fps, frames), _per_frame(smooth(width, sigma), fps, frames), fps)


def loudness_track(db: np.ndarray, fps: float, data: dict | None = None) -> Track:
    """The mouth track of a sound file: each frame's loudness (dB below the loudest frame,
    ``speech.loudness_db``) through the table's loudness bands, interpolated linearly, then
    smoothed; the width stays at rest."""
    data = data or table()
    bands = np.asarray(data["loudness_bands"], np.float64)  # (K, 2): dB, openness
    opening = np.interp(np.asarray(db, np.float64), bands[:, 0], bands[:, 1])
    opening = smooth(opening, data["smoothing_ms"] / 1000 * fps)
    return Track(opening, np.ones_like(opening), fps)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equal-length series (0 when either is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0
