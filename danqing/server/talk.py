"""The job API for the talking portrait (``danqing app talk``): a photo (base64) and a line of
text or a sound file (base64) queued as a job; the MP4 with its sound served as a file of the job
(``server/media.py``; docs/api.md, "Talk jobs").

The uploads are kept under the inputs folder only once the request's other fields have passed.
"""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import Optional

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from danqing.apps.talk import TalkRequest
from danqing.files import atomic_write_bytes
from danqing.server.media import queue
from danqing.server.security import decode_base64
from danqing.server.state import ServerState
from danqing.server.talk_request import TalkJob

AUDIO_SUFFIXES = ((b"RIFF", ".wav"), (b"ID3", ".mp3"), (b"fLaC", ".flac"), (b"OggS", ".ogg"))


class TalkJobSubmit(BaseModel):
    """The body of ``POST /api/v1/talk/jobs``: the photo and, instead of text, a sound file, as base64."""

    model_config = ConfigDict(extra="forbid", strict=True)

    picture: str
    text: Optional[str] = None
    voice: str = "en"
    audio: Optional[str] = None
    fps: int = 25
    strength: float = 1.0


def keep_upload(state: ServerState, data: bytes, suffix: str) -> Path:
    path = state.inputs_dir / date.today().isoformat() / f"{uuid.uuid4().hex}-talk{suffix}"
    atomic_write_bytes(path, data)
    return path


def prepare_talk(state: ServerState, fields: dict, picture: bytes, audio: bytes | None) -> TalkJob:
    """Checked fields + uploads -> a queued-ready ``TalkJob`` (uploads kept only if all is well)."""
    TalkRequest.create(**{**fields, "picture": "upload", "audio": "upload" if audio is not None else None})
    kept = [keep_upload(state, picture, ".png")]
    try:
        if audio is not None:
            kept.append(keep_upload(state, audio, next((s for m, s in AUDIO_SUFFIXES if audio.startswith(m)), ".wav")))
        job = TalkJob(**{**fields, "picture": str(kept[0]), "audio": str(kept[1]) if audio is not None else None})
        job.library_request()
        return job
    except BaseException:
        for p in kept:
            p.unlink(missing_ok=True)
        raise


def talk_router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["talk"])

    @r.post("/talk/jobs", status_code=202, summary="Submit a talking portrait (base64 photo + text or base64 sound)")
    def submit(body: TalkJobSubmit) -> dict:
        picture = decode_base64(body.picture, "picture", state.limits)
        audio = decode_base64(body.audio, "audio", state.limits) if body.audio is not None else None
        fields = body.model_dump(exclude={"picture", "audio"})
        return queue(state, prepare_talk(state, fields, picture, audio))

    return r
