"""Optical flow for video-to-video restyling (OpenCV's Farnebäck flow): blending each restyled
frame with the previous one warped along the input clip's motion, and the warping error that
measures flicker.

The flow is measured on the *input* clip (its motion is what the restyled clip should keep):
for frame t, ``flow[y, x]`` is where pixel (x, y) of frame t was in frame t - 1. Where warping
frame t - 1 along it does not reproduce frame t of the input (occlusions, objects appearing, the
flow wrong), the pixel is left out: the ``reliable`` mask.

* ``flow_blend`` (Lai et al. 2018, "Learning Blind Video Temporal Consistency", and
  Rerender-A-Video's pixel fusion, in their simplest form): out'_t = (1 - a m) out_t +
  a m warp(out'_{t-1}), frame after frame, m the reliable mask times where the two restyled
  frames already roughly agree (blending frames that draw an object in two places shows both).
* ``warping_error`` (the same papers' E_warp): the mean over t of the mean |out_t -
  warp(out_{t-1})| over reliable pixels, in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

RELIABLE = 24 / 255  # largest mean channel error of the input's own warp for a pixel to count
AGREE = 64 / 255  # largest difference of two restyled frames (warped) that flow_blend evens out


@dataclass(frozen=True)
class Flow:
    """One frame's backward flow to the previous frame and where it is reliable.

    Attributes:
        flow: (H, W, 2) float32, pixel displacement (dx, dy) from frame t to frame t - 1.
        reliable: (H, W) float32 in {0, 1}.
    """

    flow: np.ndarray
    reliable: np.ndarray


def _rgb(frame) -> np.ndarray:
    return np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame, dtype=np.uint8)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image`` (frame t - 1, (H, W, C)) resampled at x + flow: frame t's view of it."""
    import cv2

    h, w = flow.shape[:2]
    xx, yy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def clip_flows(frames) -> list[Flow]:
    """The backward flow of every frame after the first of the input clip (F - 1 of them)."""
    import cv2

    rgb = [_rgb(f) for f in frames]
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]
    out = []
    for t in range(1, len(rgb)):
        # pyramid of 3 levels, window 15: the defaults of OpenCV's sample; motion of a few pixels
        flow = cv2.calcOpticalFlowFarneback(gray[t], gray[t - 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        err = np.abs(warp(rgb[t - 1], flow).astype(np.float32) - rgb[t].astype(np.float32)).mean(-1) / 255
        out.append(Flow(flow, (err < RELIABLE).astype(np.float32)))
    return out


def flow_blend(frames: list[Image.Image], flows: list[Flow], strength: float) -> list[Image.Image]:
    """Each restyled frame blended with the previous (already blended) one warped along the
    input's flow, by ``strength`` (0-1) where the flow is reliable."""
    out = [_rgb(frames[0]).astype(np.float32)]
    for frame, f in zip(frames[1:], flows):
        current, previous = _rgb(frame).astype(np.float32), warp(out[-1], f.flow)
        # where the restyled frames disagree by much (an object drawn elsewhere), blending would
        # show both: ghosts; only agreeing pixels are evened out
        agree = (np.abs(current - previous).mean(-1) / 255 < AGREE).astype(np.float32)
        weight = strength * (f.reliable * agree)[..., None]
        out.append((1 - weight) * current + weight * previous)
    return [Image.fromarray(np.round(a).clip(0, 255).astype(np.uint8)) for a in out]


def warping_error(frames, flows: list[Flow]) -> float:
    """Mean flow-compensated frame-to-frame difference of a clip, in [0, 1] (lower: less flicker)."""
    errors = []
    for t, f in enumerate(flows, start=1):
        diff = np.abs(_rgb(frames[t]).astype(np.float32) - warp(_rgb(frames[t - 1]).astype(np.float32), f.flow))
        errors.append(float((diff.mean(-1) * f.reliable).sum() / max(f.reliable.sum(), 1.0) / 255))
    return float(np.mean(errors)) if errors else 0.0
