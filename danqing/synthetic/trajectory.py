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
- **object**: the mean of the frames' object scores (``evaluate.score``).
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
    n = len(frames)
    head = [c for c in centres[:ENDS] if c is not None]
    tail = [c for c in centres[n - ENDS:] if c is not None]
    if not head or not tail:
        return ClipScore(False, False, None, None, identity, float(np.mean(objects)),
                         sum(c is not None for c in centres))
    dx, dy = (np.mean(tail, axis=0) - np.mean(head, axis=0)).tolist()
    axis, sign = AXIS[direction]
    along, across = (dx, dy)[axis] * sign, abs((dx, dy)[1 - axis])
    frames_apart = max(n - ENDS, 1)  # the two means are (n - ENDS) frames apart
    return ClipScore(bool(along >= MIN_TRAVEL and along > across),
                     bool(abs(along) >= MIN_TRAVEL and abs(along) > across), (round(dx, 4), round(dy, 4)),
                     round(along / frames_apart, 5), identity, float(np.mean(objects)),
                     sum(c is not None for c in centres))


def summarise_clips(scores: list[ClipScore]) -> dict:
    """The shares and means over clips: direction right, moving along the asked axis (either
    way), identity kept, mean object score, mean speed (of the clips whose object was tracked)."""
    speeds = [s.speed for s in scores if s.speed is not None]
    return {"clips": len(scores), "direction": float(np.mean([s.direction for s in scores])),
            "axis": float(np.mean([s.axis for s in scores])),
            "identity": float(np.mean([s.identity for s in scores])),
            "object": float(np.mean([s.object for s in scores])),
            "speed": float(np.mean(speeds)) if speeds else None}


__all__ = ["ClipScore", "MIN_TRAVEL", "score_clip", "summarise_clips"]
