"""The job store's form of a talking portrait (``server/talk.py``): ``TalkRequest``'s fields with
the uploads as paths of the inputs folder, in the shape the queue reads (prompt, one clip, no steps)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict

from danqing.apps.talk import TalkRequest


class TalkJob(BaseModel):
    """A queued talking portrait: the fields of ``TalkRequest`` with the uploads kept as paths
    of the inputs folder (what the job store holds)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    picture: str
    text: Optional[str] = None
    voice: str = "en"
    audio: Optional[str] = None
    fps: int = 25
    strength: float = 1.0
    batch_size: int = 1  # the job queue's view: one clip, no sampling steps
    batch_count: int = 1
    steps: int = 0
    init_image: None = None

    @property
    def prompt(self) -> str:
        return self.text or ""

    def to_json(self) -> str:
        return self.model_dump_json()

    def library_request(self) -> TalkRequest:
        return TalkRequest.create(picture=self.picture, text=self.text, voice=self.voice, audio=self.audio,
                                  fps=self.fps, strength=self.strength)
