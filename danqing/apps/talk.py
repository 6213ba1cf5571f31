"""The talking portrait (数字人, docs/apps.md "Talking portrait"): a photo and a line of text
(spoken by espeak-ng) or a sound file -> an MP4 whose mouth moves with the speech, the sound
muxed in, the parameters inside (the MP4's ``comment`` tag, as ``outputs/video.py`` writes
video) and in a JSON sidecar, so ``danqing app talk --from VIDEO`` makes it again.

Steps: 1. speech (``speech.speak`` or ``speech.read_audio``); 2. the viseme track at the frame
rate (``visemes``); 3. the face's 68 landmarks and the mouth rig (``talk_face``); 4. one frame
per track value; 5. the MP4 (H.264 + AAC), its audio padded with silence to the video's length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from danqing.apps import speech as speech_mod
from danqing.apps.talk_face import Landmarks68, MouthRig, make_rig, render_mouth
from danqing.apps.visemes import Track, frame_count, loudness_track, phone_track
from danqing.errors import InvalidRequest
from danqing.files import atomic_save, atomic_write_text
from danqing.outputs.video import add_h264_stream, read_video_parameters, sidecar
from danqing.pictures import load_image

MAX_SIDE = 2048  # a picture's longest side
APP = "talk"


@dataclass(frozen=True)
class TalkRequest:
    """One talking portrait; the same object is written into the MP4 and read back by ``--from``.

    Args:
        picture: the photo (a path, as the user gave it).
        text: the line to speak; or None with ``audio``.
        voice: "en" or "zh" (``speech.voices()``), for ``text``.
        audio: a sound file to move the mouth by (its loudness); or None with ``text``.
        fps: frames per second, 1-60.
        strength: how far the mouth opens, 0-2 (1 = a quarter of nose-to-chin at full openness).
    """

    picture: str
    text: str | None = None
    voice: str = "en"
    audio: str | None = None
    fps: int = 25
    strength: float = 1.0

    @classmethod
    def create(cls, **values) -> "TalkRequest":
        """A checked request; one line naming what is wrong otherwise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequest(unknown[0], f"unknown field; a talk request has: {', '.join(sorted(known))}")
        r = cls(**values)
        if (r.text is None) == (r.audio is None):
            raise InvalidRequest("text", "give either a line of text to speak or a sound file (--audio), not both")
        if r.text is not None:
            speech_mod.check_text(r.text)
        speech_mod.check_voice(r.voice)
        if not (isinstance(r.fps, int) and 1 <= r.fps <= 60):
            raise InvalidRequest("fps", f"must be a whole number from 1 to 60, got {r.fps!r}")
        if isinstance(r.strength, bool) or not isinstance(r.strength, (int, float)) or not 0.0 <= r.strength <= 2.0:
            raise InvalidRequest("strength", f"must be from 0 to 2, got {r.strength!r}")
        return r

    def replace(self, **values) -> "TalkRequest":
        return TalkRequest.create(**{**asdict(self), **values})


@dataclass
class TalkResult:
    """What a run made: the frames (RGB uint8), the track, the speech, the rig and the files."""

    request: TalkRequest
    frames: list[np.ndarray]
    track: Track
    speech: speech_mod.Speech
    rig: MouthRig
    parameters: str
    paths: list[Path] = field(default_factory=list)


def request_from_parameters(text: str) -> TalkRequest:
    """The request inside a talking portrait's parameters (``read_video_parameters``)."""
    data = json.loads(text)
    if data.get("app") != APP or not isinstance(data.get("request"), dict):
        raise InvalidRequest("from", "not a talking portrait's parameters (no \"app\": \"talk\" request inside)")
    return TalkRequest.create(**data["request"])


def read_request(video: Path) -> TalkRequest:
    """The request of a talking-portrait MP4 danqing wrote (from the file or its sidecar)."""
    return request_from_parameters(read_video_parameters(video))


def load_picture(path: str | Path) -> np.ndarray:
    """The photo as RGB uint8 with even sides (H.264's 4:2:0 needs them: an odd last row or
    column is left out), refused over ``MAX_SIDE``."""
    image = load_image(path, "picture")
    if max(image.size) > MAX_SIDE:
        raise InvalidRequest("picture", f"{path}: {image.width}x{image.height}; the longest side may be {MAX_SIDE} px")
    a = np.asarray(image)
    return np.ascontiguousarray(a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2])


def make_speech(request: TalkRequest) -> speech_mod.Speech:
    """Step 1: the request's speech, checked against ``speech.MAX_SECONDS``."""
    s = speech_mod.speak(request.text, request.voice) if request.text is not None else speech_mod.read_audio(Path(request.audio))
    if s.seconds > speech_mod.MAX_SECONDS:
        raise InvalidRequest("text", f"{s.seconds:.1f} s of speech; the limit is {speech_mod.MAX_SECONDS:g} s")
    return s


def make_track(s: speech_mod.Speech, fps: int) -> Track:
    """Step 2: phonemes -> visemes when there are phonemes, else loudness bands."""
    if s.phones:
        return phone_track(s.phones, s.seconds, fps)
    frames = frame_count(s.seconds, fps)
    return loudness_track(speech_mod.loudness_db(s.samples, s.rate, fps, frames), fps)


def talk(request: TalkRequest, out: Path | None = None, *, landmarks: Landmarks68 | None = None) -> TalkResult:
    """Make a talking portrait, and write it to ``out`` (an .mp4) when given.

    Args:
        request: what to make (``TalkRequest.create``).
        out: the MP4 to write (with ``OUT.json`` beside it); never overwritten.
        landmarks: a loaded ``Landmarks68`` to reuse (default: loaded here).
    """
    if out is not None:
        out = check_talk_out(out)
    picture = load_picture(request.picture)  # 0. the photo, before the slower steps
    s = make_speech(request)  # 1. speech
    track = make_track(s, request.fps)  # 2. visemes at the frame rate
    landmarks = landmarks or Landmarks68()  # 3. the face
    points = landmarks(picture)
    if points is None:
        raise InvalidRequest("picture", f"{request.picture}: no face found (a clear, frontal face is needed)")
    k = float(request.strength)
    opening, width = k * track.open, 1.0 + k * (track.width - 1.0)  # (F,) each
    rig = make_rig(picture, points, max_open=max(1.0, float(opening.max())),
                   widths=(min(0.7, float(width.min())), max(1.15, float(width.max()))))
    frames = [render_mouth(picture, rig, o, w) for o, w in zip(opening, width)]  # 4. the frames
    parameters = json.dumps({
        "app": APP, "request": asdict(request),
        "picture_sha256": hashlib.sha256(picture.tobytes()).hexdigest()[:16],
        "frames": len(frames), "seconds": round(len(frames) / request.fps, 4),
        "speech": "espeak-ng " + request.voice if request.text is not None else "sound file (loudness bands)",
        "landmarks": landmarks.version, "mouth": "piecewise-affine warp of dlib's 68 landmarks (no learned model)",
    }, ensure_ascii=False)
    result = TalkResult(request, frames, track, s, rig, parameters)
    if out is not None:  # 5. the file
        result.paths = write_talk_mp4(frames, s, out, request.fps, parameters)
    return result


def check_talk_out(path: Path) -> Path:
    """``path`` if it is a new .mp4 (the only format that carries the sound); one line otherwise."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise InvalidRequest("out", f"{str(path)!r}: a talking portrait is written as NAME.mp4 (H.264 video with AAC sound)")
    for p in (path, sidecar(path)):
        if p.exists():
            raise InvalidRequest("out", f"{p} already exists; danqing never overwrites, pick another name")
    return path


def padded_audio(samples: np.ndarray, rate: int, frames: int, fps: int) -> np.ndarray:
    """The samples cut or padded with silence to exactly ``frames / fps`` seconds."""
    n = int(round(frames * rate / fps))
    out = np.zeros(n, np.int16)
    out[: min(n, len(samples))] = samples[:n]
    return out


def write_talk_mp4(frames: list[np.ndarray], s: speech_mod.Speech, path: Path, fps: int, parameters: str) -> list[Path]:
    """The MP4 (H.264 video, AAC mono sound as long as the video) and its JSON sidecar, each
    written atomically. Returns both paths."""
    audio = padded_audio(s.samples, s.rate, len(frames), fps)
    written = [atomic_save(path, lambda tmp: _write(frames, audio, s.rate, tmp, fps, parameters))]
    written.append(atomic_write_text(sidecar(path), parameters))
    return written


def _write(frames: list[np.ndarray], audio: np.ndarray, rate: int, path: Path, fps: int, parameters: str) -> None:
    import av  # lazy: PyAV loads FFmpeg's libraries

    with av.open(str(path), mode="w", format="mp4") as container:
        container.metadata["comment"] = parameters
        video = add_h264_stream(container, fps, frames[0].shape[1], frames[0].shape[0])
        sound = container.add_stream("aac", rate=rate, layout="mono")
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        step = 1024  # AAC's frame size
        for start in range(0, len(audio), step):
            chunk = audio[start:start + step]
            f = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            f.rate, f.pts = rate, start
            container.mux(sound.encode(f))
        container.mux(sound.encode())


def read_sound(path: Path) -> tuple[int, int]:
    """(decoded samples, rate) of an MP4's first audio stream (its encoder's priming removed)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return sum(f.samples for f in container.decode(stream)), stream.rate
