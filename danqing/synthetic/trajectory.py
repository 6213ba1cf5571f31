"""Judging a clip of the moving shapes world (``synthetic.motion``): where the object goes, how
fast, whether it stays the same object, and whether each frame is a good picture of it.

Every frame is read by the still world's evaluator (``synthetic.evaluate.detect`` and
``score``). The tracked object in a frame is the detection of the asked colour and shape, or
the largest detection when there is none; its centroids make the trajectory.

- **direction**: the mean centroid of the last three frames minus that of the first three goes
  the asked way by at least ``MIN_TRAVEL`` of the picture, more along the asked axis than across it;
- **axis**: the same along the asked axis, either way (left for right still counts);
- **speed**: that displacement along the asked axis per frame (a share of the picture);
- **identity**: the largest object of every frame has the colour and shape of the first
  frame's (the object does not turn into another one, or vanish);
- **object**: the mean of the frames' object scores (``evaluate.score``);
- **jump**: the largest move of the tracked object from one frame to the next (a share of the
  picture): a clip that moves smoothly has small ones, frames drawn each on its own jump.

Clips of the other kinds (an arc, a growing, shrinking or recolouring object) are judged by
``score_change``: the asked change done (the arc's bulge, the area ratio, the colours at the two
ends), the object kept, each frame's object score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from danqing.synthetic.evaluate import detect, score
from danqing.synthetic.scenes import Spec

MIN_TRAVEL = 0.15   # share of the picture an object must travel to count as moving
ENDS = 3            # frames averaged at each end of the clip
AXIS = {"right": (0, 1), "left": (0, -1), "up": (1, -1), "down": (1, 1)}  # (axis: 0 = x, 1 = y; sign)


@dataclass(frozen=True)
class ClipScore:
    direction: bool
    axis: bool                                  # moves along the asked axis, either way (as direction, sign aside)
    displacement: tuple[float, float] | None   # (dx, dy) from the first frames to the last, 0..1 of the picture
    speed: float | None                         # displacement along the asked axis per frame
    identity: bool
    object: float                               # mean object score of the frames
    found: int                                  # frames in which an object was found
    jump: float | None = None                   # largest frame-to-frame move of the tracked object, 0..1 of the picture

    def to_dict(self) -> dict:
        return asdict(self)


def score_clip(frames, colour: str, shape: str, direction: str) -> ClipScore:
    """The scores of one clip (a list of pictures) that should show a ``colour`` ``shape``
    moving ``direction`` ("right", "left", "up", "down")."""
    spec = Spec(((shape, colour),))
    centres, mains = [], []
    objects = []
    for frame in frames:
        found = detect(frame)
        objects.append(score(frame, spec).object)
        mains.append((found[0].colour, found[0].shape) if found else None)
        asked = [d for d in found if (d.colour, d.shape) == (colour, shape)]
        track = asked[0] if asked else (found[0] if found else None)
        centres.append(None if track is None else (track.x, track.y))
    identity = mains[0] is not None and all(m == mains[0] for m in mains)
    tracked = [c for c in centres if c is not None]
    jump = (round(float(np.max(np.linalg.norm(np.diff(tracked, axis=0), axis=1))), 4) if len(tracked) > 1
            else None)
    n = len(frames)
    head = [c for c in centres[:ENDS] if c is not None]
    tail = [c for c in centres[n - ENDS:] if c is not None]
    if not head or not tail:
        return ClipScore(False, False, None, None, identity, float(np.mean(objects)),
                         sum(c is not None for c in centres), jump)
    dx, dy = (np.mean(tail, axis=0) - np.mean(head, axis=0)).tolist()
    axis, sign = AXIS[direction]
    along, across = (dx, dy)[axis] * sign, abs((dx, dy)[1 - axis])
    frames_apart = max(n - ENDS, 1)  # the two means are (n - ENDS) frames apart
    return ClipScore(bool(along >= MIN_TRAVEL and along > across),
                     bool(abs(along) >= MIN_TRAVEL and abs(along) > across), (round(dx, 4), round(dy, 4)),
                     round(along / frames_apart, 5), identity, float(np.mean(objects)),
                     sum(c is not None for c in centres), jump)


def summarise_clips(scores: list[ClipScore]) -> dict:
    """The shares and means over clips: direction right, moving along the asked axis (either
    way), identity kept, mean object score, mean speed and mean largest jump (of the clips whose
    object was tracked)."""
    speeds = [s.speed for s in scores if s.speed is not None]
    jumps = [s.jump for s in scores if s.jump is not None]
    return {"clips": len(scores), "direction": float(np.mean([s.direction for s in scores])),
            "axis": float(np.mean([s.axis for s in scores])),
            "identity": float(np.mean([s.identity for s in scores])),
            "object": float(np.mean([s.object for s in scores])),
            "speed": float(np.mean(speeds)) if speeds else None,
            "jump": float(np.mean(jumps)) if jumps else None}


MIN_BULGE = 0.06   # share of the picture the middle frames must leave the straight line by, for an arc
MIN_GROWTH = 1.4   # area ratio of the last frames to the first (or its inverse) for growing (shrinking)


@dataclass(frozen=True)
class ChangeScore:
    """How a clip of another kind than a straight line did (``score_change``)."""

    done: bool             # the asked change happened (the arc bulged and went the asked way, grew, shrank, turned)
    measure: float | None  # the bulge (arc), the area ratio last / first (grow, shrink), None (recolour)
    kept: bool             # it stayed the one object: its shape in every frame (and its colour, but recolouring)
    object: float          # mean object score of the frames, against the colour each frame should show

    def to_dict(self) -> dict:
        return asdict(self)


def _track(frames, colours: list[str], shape: str) -> list:
    """Each frame's detection of ``shape`` in that frame's colour, else its largest, else None."""
    out = []
    for frame, colour in zip(frames, colours):
        found = detect(frame)
        asked = [d for d in found if (d.colour, d.shape) == (colour, shape)]
        out.append(asked[0] if asked else (found[0] if found else None))
    return out


def score_change(frames, clip) -> ChangeScore:
    """The score of a clip of ``clip.kind`` "arc", "grow", "shrink" or "recolour"
    (``synthetic.motion.MotionClip``): for an arc, the direction (as ``score_clip``) and the
    middle frames' distance from the chord of the first and last frames' centres (at least
    ``MIN_BULGE``); growing and shrinking, the tracked object's area over the last ``ENDS``
    frames against the first (``MIN_GROWTH`` or more, or its inverse or less); recolouring, the
    object in the first frames in its colour and in the last ones in the new colour."""
    n = len(frames)
    wanted = [clip.scene_at(i * (clip.frames - 1) // max(n - 1, 1)).objects[0].colour for i in range(n)]
    track = _track(frames, wanted, clip.shape)
    objects = float(np.mean([score(f, Spec(((clip.shape, c),))).object for f, c in zip(frames, wanted)]))
    shapes_kept = all(d is not None and d.shape == clip.shape for d in track)
    head, tail = [d for d in track[:ENDS] if d], [d for d in track[n - ENDS:] if d]
    if not head or not tail:
        return ChangeScore(False, None, False, objects)
    if clip.kind == "arc":
        line = score_clip(frames, clip.colour, clip.shape, clip.direction)
        a = np.mean([(d.x, d.y) for d in head], axis=0)
        b = np.mean([(d.x, d.y) for d in tail], axis=0)
        mid = [np.array((d.x, d.y)) for d in track[n // 3: n - n // 3] if d]
        chord = b - a
        length = float(np.linalg.norm(chord)) or 1.0
        bulge = max((abs(chord[0] * (p - a)[1] - chord[1] * (p - a)[0]) / length for p in mid), default=0.0)
        return ChangeScore(bool(line.direction and bulge >= MIN_BULGE), round(float(bulge), 4),
                           shapes_kept and line.identity, objects)
    if clip.kind in ("grow", "shrink"):
        ratio = float(np.mean([d.area for d in tail]) / max(np.mean([d.area for d in head]), 1e-6))
        done = ratio >= MIN_GROWTH if clip.kind == "grow" else ratio <= 1 / MIN_GROWTH
        colours_kept = all(d is not None and d.colour == clip.colour for d in track)
        return ChangeScore(bool(done), round(ratio, 3), shapes_kept and colours_kept, objects)
    if clip.kind == "recolour":
        done = all(d.colour == clip.colour for d in head) and all(d.colour == clip.colour_2 for d in tail)
        return ChangeScore(bool(done), None, shapes_kept, objects)
    raise ValueError(f"no change score for a clip of kind {clip.kind!r}")


def summarise_changes(scores: list[ChangeScore]) -> dict:
    """The shares and means over clips of one kind: the change done, the object kept, the mean
    object score."""
    return {"clips": len(scores), "done": float(np.mean([s.done for s in scores])),
            "kept": float(np.mean([s.kept for s in scores])), "object": float(np.mean([s.object for s in scores]))}


__all__ = ["ChangeScore", "ClipScore", "MIN_BULGE", "MIN_GROWTH", "MIN_TRAVEL", "score_change", "score_clip",
           "summarise_changes", "summarise_clips"]
