"""The job API for the talking portrait (``danqing app talk``): a photo (base64) and a line of
text or a sound file (base64) queued as a job; the MP4 with its sound served as a file of the job
(``server/media.py``; docs/api.md, "Talk jobs").

The uploads are kept under the inputs folder only once the request's other fields have passed.
"""

from __future__ import annotations

from fastapi import APIRouter

from danqing.apps.talk import TalkRequest
from danqing.server.bodies import strict_body
from danqing.server.media import kept_uploads, queue
from danqing.server.security import decode_base64
from danqing.server.state import ServerState
from danqing.server.talk_request import TalkJob

AUDIO_SUFFIXES = ((b"RIFF", ".wav"), (b"ID3", ".mp3"), (b"fLaC", ".flac"), (b"OggS", ".ogg"))


TalkJobSubmit = strict_body(
    "TalkJobSubmit", TalkRequest,
    "The body of ``POST /api/v1/talk/jobs``: ``TalkRequest``'s fields, the photo and (instead of "
    "text) a sound file as base64.")


def prepare_talk(state: ServerState, fields: dict, picture: bytes, audio: bytes | None) -> TalkJob:
    """Checked fields + uploads -> a queued-ready ``TalkJob`` (uploads kept only if all is well)."""
    TalkRequest.create(**{**fields, "picture": "upload", "audio": "upload" if audio is not None else None})
    with kept_uploads(state) as keep:
        kept = {"picture": str(keep(picture, "talk", (), ".png"))}
        if audio is not None:
            kept["audio"] = str(keep(audio, "talk", AUDIO_SUFFIXES, ".wav"))
        job = TalkJob(**{**fields, "audio": None, **kept})
        job.library_request()
        return job


def talk_router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["talk"])

    @r.post("/talk/jobs", status_code=202, summary="Submit a talking portrait (base64 photo + text or base64 sound)")
    def submit(body: TalkJobSubmit) -> dict:
        picture = decode_base64(body.picture, "picture", state.limits)
        audio = decode_base64(body.audio, "audio", state.limits) if body.audio is not None else None
        fields = body.model_dump(exclude={"picture", "audio"})
        return queue(state, prepare_talk(state, fields, picture, audio))

    return r
