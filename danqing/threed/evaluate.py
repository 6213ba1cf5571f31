"""Scoring turntables with the shapes world's evaluator (danqing/synthetic/evaluate.py): in how
many views is there exactly one object, of the asked shape and colour?"""

from __future__ import annotations

from danqing.synthetic.evaluate import detect


def view_ok(picture, shape: str, colour: str) -> bool:
    """Exactly one object in ``picture``, and it is a ``colour`` ``shape`` (a ball seen from any
    side is a "circle")."""
    found = detect(picture)
    return len(found) == 1 and found[0].shape == shape and found[0].colour == colour


def turntable_score(frames: list, shape: str, colour: str) -> float:
    """The fraction of ``frames`` (PIL pictures) that ``view_ok`` accepts."""
    return sum(view_ok(f, shape, colour) for f in frames) / len(frames)
