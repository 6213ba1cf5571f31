"""Prompt travel: a video prompt whose text changes from frame to frame.

The syntax is the one AnimateDiff users write in A1111 (sd-webui-animatediff) and ComfyUI
(batch prompt schedules): optional head lines, then keyframe lines ``FRAME: text``, then
optional tail lines::

    a red circle, plain white background
    0: on the left
    15: on the right

Keyframe k's prompt is ``head, text, tail`` (the parts that are not empty, joined by ", ").
Each keyframe prompt is conditioned on its own (A1111 syntax, prompt editing, embeddings); frame
f's text context is the linear interpolation of the two keyframes around it, as the extension
interpolates the conditioning. Frames before the first keyframe take the first's context, frames
after the last the last's (the extension wraps around to the first for looping clips; danqing
holds, so a clip that travels from left to right does not drift back). The negative prompt is
the same for every frame. ``<lora:...>`` tags change weights, which cannot travel: anywhere in
the prompt they apply to the whole clip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from danqing.errors import InvalidRequest
from danqing.sampling.loop import Conditioning

KEYFRAME = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")


def parse_travel(prompt: str, frames: int) -> list[tuple[int, str]] | None:
    """The keyframes ``[(frame, prompt), ...]`` of a travel prompt, in frame order; None when no
    line of ``prompt`` is a keyframe line (an ordinary prompt).

    Raises:
        InvalidRequest: a keyframe at or past ``frames``, a frame given twice, or head / tail
            lines between keyframe lines.
    """
    lines = prompt.splitlines()
    marks = [i for i, line in enumerate(lines) if KEYFRAME.match(line)]
    if not marks:
        return None
    first, last = marks[0], marks[-1]
    between = [line for line in lines[first:last + 1] if not KEYFRAME.match(line) and line.strip()]
    if between:
        raise InvalidRequest("prompt", f"prompt travel: {between[0].strip()!r} stands between keyframe lines; "
                                       "write head lines before the first 'FRAME: text' line and tail lines after "
                                       "the last")
    head = ", ".join(s for s in (line.strip().rstrip(",") for line in lines[:first]) if s)
    tail = ", ".join(s for s in (line.strip().rstrip(",") for line in lines[last + 1:]) if s)
    out: dict[int, str] = {}
    for i in marks:
        m = KEYFRAME.match(lines[i])
        frame, text = int(m.group(1)), m.group(2).rstrip(",")
        if frame >= frames:
            raise InvalidRequest("prompt", f"prompt travel: keyframe {frame} is past the clip's last frame "
                                           f"({frames - 1}); keyframes are 0-{frames - 1}")
        if frame in out:
            raise InvalidRequest("prompt", f"prompt travel: keyframe {frame} is given twice")
        out[frame] = ", ".join(s for s in (head, text, tail) if s)
    return sorted(out.items())


def frame_weights(keys: list[int], frames: int) -> list[tuple[int, int, float]]:
    """For each frame, ``(a, b, w)``: its context is ``(1 - w) * keyframe a + w * keyframe b``
    (indices into ``keys``, the keyframes' frame numbers in order); held before the first
    keyframe and after the last."""
    out = []
    for f in range(frames):
        if f <= keys[0]:
            out.append((0, 0, 0.0))
        elif f >= keys[-1]:
            out.append((len(keys) - 1, len(keys) - 1, 0.0))
        else:
            b = next(i for i, k in enumerate(keys) if k >= f)
            a = b - 1
            out.append((a, b, (f - keys[a]) / (keys[b] - keys[a])))
    return out


@dataclass(frozen=True)
class TravelSchedule:
    """Per-step conditioning of a travel prompt: ``.at(step)`` gives a ``Conditioning`` whose
    context is per frame, (2B or B, F, T, D), which the video denoisers read frame by frame
    (``sampling.video.frame_context``).

    Attributes:
        schedules: one ``ConditioningSchedule`` per keyframe prompt, in frame order, their
            contexts of one token length.
        weights: ``frame_weights`` of the keyframes.
    """

    schedules: tuple
    weights: tuple

    def at(self, step: int) -> Conditioning:
        conds = [s.at(step) for s in self.schedules]
        frames = [(1 - w) * conds[a].context + w * conds[b].context for a, b, w in self.weights]
        return Conditioning(torch.stack(frames, dim=1), conds[0].added)


def build_travel(encoder, request, keyframes: list[tuple[int, str]], *, batch: int, build) -> TravelSchedule:
    """The ``TravelSchedule`` of ``keyframes`` (``parse_travel``): each keyframe prompt through
    ``build`` (``conditioning.schedule.build_conditioning``) as the request's prompt, the
    shorter contexts padded with the empty prompt's chunks (A1111 pads the same way)."""
    schedules = [build(encoder, request.replace(prompt=text), batch=batch) for _, text in keyframes]
    longest = max(c.context.shape[1] for s in schedules for c in s.conds)
    empty = encoder.encode("", negative=False).hidden  # (1, 77, D): one chunk
    negative = encoder.encode("", negative=True).hidden  # SDXL's empty negative is zeros

    def pad(cond: Conditioning) -> Conditioning:
        missing = (longest - cond.context.shape[1]) // empty.shape[1]
        if missing == 0:
            return cond
        rows = [empty] * cond.context.shape[0]
        if cond.context.shape[0] == 2 * batch:  # CFG: [negative x B; prompt x B]
            rows = [negative] * batch + [empty] * batch
        fill = torch.cat(rows).to(cond.context).repeat(1, missing, 1)
        return Conditioning(torch.cat([cond.context, fill], dim=1), cond.added)

    schedules = [type(s)(s.ends, [pad(c) for c in s.conds]) for s in schedules]
    return TravelSchedule(tuple(schedules), tuple(frame_weights([k for k, _ in keyframes], request.frames)))


__all__ = ["TravelSchedule", "build_travel", "frame_weights", "parse_travel"]
