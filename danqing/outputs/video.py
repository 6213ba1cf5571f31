"""Video files: MP4 (H.264, PyAV), GIF and animated WebP (Pillow), PNG frames; the generation
parameters inside the file where the format has a place for text and always in a JSON sidecar
(``NAME.EXT.json``); reading them back, and reading videos within limits.

Every file is written atomically (``danqing.files``): a reader never sees half a video. The
parameters are one JSON object (``{"request": {...}, "model_hash": ..., ...}``):

* MP4: the container's ``comment`` tag (``ffprobe -show_format`` lists it);
* GIF: the comment extension; PNG frames: each frame's ``parameters`` text chunk;
* animated WebP: the sidecar only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from danqing.errors import InvalidRequest
from danqing.files import atomic_save, atomic_write_text

# suffix -> what it writes
FORMATS = {".mp4": "MP4 (H.264)", ".gif": "GIF", ".webp": "animated WebP", ".png": "PNG frames (NAME-000.png, ...)"}
SIDECAR = ".json"
# what an input video may be, checked from its headers before any frame is decoded
MAX_INPUT_BYTES = 512 * 1024 * 1024
MAX_INPUT_SIDE = 4096
MAX_INPUT_FRAMES = 1000
MAX_INPUT_FPS = 240


def check_video_out(path: Path) -> Path:
    """``path`` if its extension is a video format danqing writes; else one line listing them."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        shown = path.suffix or "no extension"
        raise InvalidRequest("out", f"{str(path)!r}: cannot write a video as {shown}; use one of "
                                    + ", ".join(f"{s} ({w})" for s, w in FORMATS.items()))
    return path


def clip_paths(path: Path, clips: int) -> list[Path]:
    """The file of each clip: NAME.EXT, NAME-1.EXT, NAME-2.EXT, ..."""
    path = Path(path)
    return [path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(clips)]


def is_video(path: Path) -> bool:
    """Whether ``danqing info`` reads ``path`` as a video: an MP4 or GIF, or a file with a
    danqing video sidecar beside it (animated WebP, PNG frames)."""
    path = Path(path)
    return path.suffix.lower() in (".mp4", ".gif") or sidecar(path).is_file()


def sidecar(path: Path) -> Path:
    """``NAME.EXT.json`` beside a video file."""
    return Path(path).with_name(Path(path).name + SIDECAR)


def frame_paths(path: Path, frames: int) -> list[Path]:
    """PNG frames: NAME-000.png, NAME-001.png, ..."""
    path = Path(path)
    return [path.with_name(f"{path.stem}-{i:03d}{path.suffix}") for i in range(frames)]


def planned_files(path: Path, clips: int, frames: int) -> list[Path]:
    """Every file a save of ``clips`` clips of ``frames`` frames to ``path`` writes."""
    out = []
    for p in clip_paths(check_video_out(path), clips):
        out += frame_paths(p, frames) if p.suffix.lower() == ".png" else [p]
        out.append(sidecar(p))
    return out


def add_h264_stream(container, fps: int, width: int, height: int):
    """The one H.264 stream of every MP4 danqing writes, set up so the same frames give the same
    file. Measured on an AMD EPYC machine, encoding identical frames again and again:

    - x264's SIMD paths read memory they never wrote: with the heap scribbled between encodes,
      20 encodes of 8 frames of 64x64 gave up to four different bitstreams (``asm=0``: plain C);
    - on its C paths with frame threads, 8 encodes of 18 frames of 512x512 gave six (one thread).

    With both, 30 of 30 and 60 of 60 were one file. The price: 108 frames of 512x512 take 1.8 s
    on 2 cores instead of 0.35 s, small beside sampling them.
    """
    stream = container.add_stream("libx264", rate=Fraction(fps))
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "18", "x264-params": "asm=0"}
    stream.codec_context.thread_count = 1
    return stream


def save_video(frames: list[Image.Image], path: Path, fps: int, parameters: str) -> list[Path]:
    """Write one clip in the format of ``path``'s extension, with its JSON sidecar.

    Args:
        frames: RGB pictures of one size (even sides for MP4: H.264's 4:2:0 needs them).
        fps: frames per second.
        parameters: the JSON text of the generation parameters.

    Returns:
        the files written (the video, or its PNG frames, then the sidecar).
    """
    path = check_video_out(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        written = [_save_png(f, p, parameters) for f, p in zip(frames, frame_paths(path, len(frames)))]
    elif suffix == ".mp4":
        written = [atomic_save(path, lambda tmp: _write_mp4(frames, tmp, fps, parameters))]
    else:
        duration = round(1000 / fps)  # ms per frame (GIF stores 10 ms units)
        extra = {"comment": parameters.encode("utf-8")} if suffix == ".gif" else {"lossless": True}
        fmt = "GIF" if suffix == ".gif" else "WEBP"
        written = [atomic_save(path, lambda tmp: frames[0].save(tmp, format=fmt, save_all=True,
                                                                append_images=frames[1:], duration=duration,
                                                                loop=0, **extra))]
    written.append(atomic_write_text(sidecar(path), parameters))
    return written


def _save_png(frame: Image.Image, path: Path, parameters: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return atomic_save(path, lambda tmp: frame.save(tmp, format="PNG", pnginfo=info))


def _write_mp4(frames: list[Image.Image], path: Path, fps: int, parameters: str) -> None:
    import av  # lazy: PyAV loads FFmpeg's libraries

    with av.open(str(path), mode="w", format="mp4") as container:
        container.metadata["comment"] = parameters
        stream = add_h264_stream(container, fps, *frames[0].size)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@dataclass(frozen=True)
class VideoInfo:
    """What a video's headers say: frames, size and frames per second."""

    frames: int
    width: int
    height: int
    fps: float


def probe_video(path: Path) -> VideoInfo:
    """A video's frame count, size and rate from its headers, checked against the input limits
    (bytes, side, frames, fps) before anything is decoded; one line naming the limit otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest("video", f"{path}: no such file")
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise InvalidRequest("video", f"{path}: {size} bytes, over the limit of {MAX_INPUT_BYTES} bytes")
    if path.suffix.lower() in (".gif", ".webp", ".png"):
        try:
            with Image.open(path) as im:
                w, h = im.size
                _check_limits(path, [("width", w, MAX_INPUT_SIDE), ("height", h, MAX_INPUT_SIDE)])
                im.load()  # WebP reports a frame's duration once that frame is read
                duration = im.info.get("duration")  # ms per frame; read before n_frames seeks
                n = getattr(im, "n_frames", 1)
                fps = 1000 / duration if duration else 0.0
        except (OSError, ValueError) as exc:
            raise InvalidRequest("video", f"{path}: cannot be decoded ({exc})") from None
    else:
        import av

        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise InvalidRequest("video", f"{path}: holds no video stream")
                stream = container.streams.video[0]
                n, w, h = stream.frames, stream.width, stream.height
                fps = float(stream.average_rate or 0)
        except av.FFmpegError as exc:
            raise InvalidRequest("video", f"{path}: cannot be decoded ({exc})") from None
    _check_limits(path, [("width", w, MAX_INPUT_SIDE), ("height", h, MAX_INPUT_SIDE), ("frames", n, MAX_INPUT_FRAMES),
                         ("fps", fps, MAX_INPUT_FPS)])
    return VideoInfo(int(n), int(w), int(h), fps)


def _check_limits(path: Path, checks: list[tuple[str, float, float]]) -> None:
    for what, value, limit in checks:
        if value > limit:
            raise InvalidRequest("video", f"{path}: {what} {value:g} is over the limit of {limit}")


def read_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video as (H, W, 3) uint8 RGB, its headers checked first (``probe_video``)."""
    info = probe_video(path)
    if Path(path).suffix.lower() in (".gif", ".webp", ".png"):
        out = []
        with Image.open(path) as im:
            for i in range(info.frames):
                im.seek(i)
                out.append(np.asarray(im.convert("RGB")))
        return out
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def read_video_parameters(path: Path) -> str:
    """The JSON parameters of a video danqing wrote: from inside the file (MP4 comment, GIF
    comment, PNG frame text), else from its sidecar; one line when there are none."""
    path = Path(path)
    probe_video(path)
    text = None
    suffix = path.suffix.lower()
    if suffix == ".mp4" or suffix not in FORMATS:
        import av

        with av.open(str(path)) as container:
            text = container.metadata.get("comment")
    else:
        with Image.open(path) as im:
            text = im.info.get("comment") if suffix == ".gif" else im.info.get("parameters")
        text = text.decode("utf-8") if isinstance(text, bytes) else text
    if not text and sidecar(path).is_file():
        text = sidecar(path).read_text(encoding="utf-8")
    try:
        if text and isinstance(json.loads(text), dict):
            return text
    except ValueError:
        pass
    raise InvalidRequest("video", f"{path}: holds no danqing generation parameters (and no {sidecar(path).name} beside it)")
