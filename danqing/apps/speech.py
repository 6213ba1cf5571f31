"""Speech for the talking portrait (docs/apps.md, "Talking portrait"): a line of text spoken by
espeak-ng with the time of every phoneme, or a sound file the user gives and its loudness.

Text is spoken through espeak-ng's C library (``libespeak-ng.so.1``, installed with Debian's
``espeak-ng``) called with ctypes: one synthesis gives both the samples and a phoneme event per
phoneme (``espeakEVENT_PHONEME``, with ``espeakINITIALIZE_PHONEME_IPA`` the phoneme's IPA name
and the sample where it starts), so the timings belong to exactly the audio that is played. The
command line cannot give them: ``espeak-ng --pho`` writes timings only for MBROLA voices, and
speaking phoneme by phoneme would lose the coarticulation. Each line is spoken in a new
interpreter (``_WORKER``), so no state of the library is shared between lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from danqing.errors import InvalidRequest, ModelNotFound

INSTALL = "apt-get install espeak-ng"
MAX_TEXT = 500  # characters of one line
MAX_SECONDS = 40.0  # of speech, spoken or given


@lru_cache(maxsize=1)
def table() -> dict:
    """``data/visemes.json``: the voices, visemes, phoneme table and loudness bands."""
    return json.loads(resources.files("danqing").joinpath("data/visemes.json").read_text(encoding="utf-8"))


def voices() -> dict[str, str]:
    """danqing voice name -> what it is ("en", "zh")."""
    return {k: v["about"] for k, v in table()["voices"].items()}


@dataclass(frozen=True)
class Phone:
    """One phoneme: its IPA name as espeak-ng gives it ("" for a pause) and its span in seconds."""

    name: str
    start: float
    end: float


@dataclass(frozen=True)
class Speech:
    """Mono 16-bit audio and, for spoken text, its phonemes.

    Attributes:
        samples: (N,) int16.
        rate: samples per second.
        phones: the phonemes in order (empty for a sound file the user gave).
    """

    samples: np.ndarray
    rate: int
    phones: tuple[Phone, ...] = ()

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


# Runs in a fresh interpreter per line (``python -I -c``, the standard library only): espeak-ng keeps
# its synthesis state in process globals, so two lines spoken in one process differ by a few
# samples (and re-initialising it in-process hangs); a new process speaks a line exactly as the
# ``espeak-ng`` command does, which is what makes ``--from`` re-create a video bit for bit.
# Reads {"voice", "text"} on stdin; writes one JSON line {"rate", "events": [[sample, name]...]}
# and then the int16 samples.
_WORKER = r"""
import ctypes, ctypes.util, json, sys
job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
lib = ctypes.CDLL(ctypes.util.find_library("espeak-ng"))
class Event(ctypes.Structure):  # espeak_EVENT (speak_lib.h); id: the union whose string[8] is a phoneme name
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]
CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))
audio, events = bytearray(), []
def collect(wav, count, event_list):
    if count > 0:
        audio.extend(ctypes.string_at(wav, 2 * count))
    i = 0
    while event_list[i].type != 0:  # espeakEVENT_LIST_TERMINATED
        e = event_list[i]
        if e.type == 7:  # espeakEVENT_PHONEME
            events.append([e.sample, e.id.split(b"\0", 1)[0].decode("utf-8", "replace")])
        i += 1
    return 0
callback = CALLBACK(collect)
lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
rate = lib.espeak_Initialize(2, 0, None, 0x1 | 0x2)  # synchronous; phoneme events, IPA names
if rate <= 0:
    sys.exit("espeak-ng did not start")
lib.espeak_SetSynthCallback(callback)
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
if lib.espeak_SetVoiceByName(job["voice"].encode()) != 0:
    sys.exit("espeak-ng has no voice " + job["voice"])
text = job["text"].encode("utf-8")
lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                             ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
lib.espeak_Synth(text, len(text) + 1, 0, 0, 0, 1, None, None)  # espeakCHARS_UTF8
sys.stdout.buffer.write(json.dumps({"rate": rate, "events": events}).encode() + b"\n" + bytes(audio))
"""


def espeak_available() -> bool:
    """Whether espeak-ng's library can be found."""
    return ctypes.util.find_library("espeak-ng") is not None


def check_voice(voice: str) -> str:
    """``voice`` if danqing knows it; else one line listing the voices."""
    if voice not in table()["voices"]:
        raise InvalidRequest("voice", f"unknown voice {voice!r}; choose one of: {', '.join(table()['voices'])}")
    return voice


def check_text(text: str) -> str:
    """``text`` if it is a line danqing can speak (not empty, at most ``MAX_TEXT`` characters)."""
    if not text or not text.strip():
        raise InvalidRequest("text", "give a line of text to speak")
    if len(text) > MAX_TEXT:
        raise InvalidRequest("text", f"{len(text)} characters; one line is at most {MAX_TEXT}")
    return text


def speak(text: str, voice: str = "en") -> Speech:
    """``text`` spoken by espeak-ng, with the start of every phoneme.

    Args:
        text: one line (UTF-8; Chinese characters for "zh").
        voice: a key of ``voices()``: "en" or "zh".

    Returns:
        the speech; each phone ends where the next starts (the last at the end of the audio).
    """
    check_text(text)
    espeak_voice = table()["voices"][check_voice(voice)]["espeak"]
    if not espeak_available():
        raise ModelNotFound(f"speaking text needs espeak-ng ({INSTALL})")
    job = json.dumps({"voice": espeak_voice, "text": text}).encode("utf-8")
    done = subprocess.run([sys.executable, "-I", "-c", _WORKER], input=job, capture_output=True, timeout=120)
    if done.returncode != 0:
        raise ModelNotFound(f"espeak-ng failed ({done.stderr.decode(errors='replace').strip()[-200:]}); "
                            f"reinstall it ({INSTALL})")
    head, _, body = done.stdout.partition(b"\n")
    info = json.loads(head)
    samples = np.frombuffer(body, np.int16).copy()
    return Speech(samples, int(info["rate"]), phones_from_events([tuple(e) for e in info["events"]], len(samples),
                                                                 int(info["rate"])))


def phones_from_events(events: list[tuple[int, str]], total: int, rate: int) -> tuple[Phone, ...]:
    """Phoneme events (start sample, name) -> phones with ends (the next start; the last ends at
    ``total`` samples). Events at the same sample keep the last one (espeak-ng sends an empty
    word-boundary event before a word's first phoneme)."""
    starts: dict[int, str] = {}
    for sample, name in sorted(events, key=lambda e: e[0]):
        starts[min(max(sample, 0), total)] = name
    keys = sorted(starts)
    return tuple(Phone(starts[a], a / rate, b / rate) for a, b in zip(keys, keys[1:] + [total]) if b > a)


def read_audio(path: Path) -> Speech:
    """A sound file (WAV, or anything FFmpeg decodes) as mono 16-bit samples at its own rate;
    one line when it cannot be read or is longer than ``MAX_SECONDS``."""
    import av  # lazy: PyAV loads FFmpeg's libraries

    path = Path(path)
    if not path.is_file():
        raise InvalidRequest("audio", f"{path}: no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InvalidRequest("audio", f"{path}: holds no audio stream")
            stream = container.streams.audio[0]
            rate = stream.rate or 16000
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            parts = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                if sum(len(p) for p in parts) > MAX_SECONDS * rate:
                    raise InvalidRequest("audio", f"{path}: longer than the limit of {MAX_SECONDS:g} s")
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise InvalidRequest("audio", f"{path}: cannot be decoded ({exc})") from None
    samples = np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)
    if len(samples) == 0:
        raise InvalidRequest("audio", f"{path}: holds no sound")
    return Speech(samples, int(rate))


def loudness_db(samples: np.ndarray, rate: int, fps: float, frames: int) -> np.ndarray:
    """(frames,) RMS loudness of each video frame's span of audio, in dB below the loudest frame
    (0 = the loudest; silence -120)."""
    x = np.asarray(samples, np.float64) / 32768.0
    edges = np.round(np.arange(frames + 1) * rate / fps).astype(int)
    rms = np.array([np.sqrt(np.mean(x[a:b] ** 2)) if b > a and a < len(x) else 0.0
                    for a, b in zip(edges[:-1], edges[1:])])
    db = 20 * np.log10(np.maximum(rms, 1e-6))
    return np.maximum(db - db.max(), -120.0) if frames else db
