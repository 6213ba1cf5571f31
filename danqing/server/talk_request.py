"""The job store's form of a talking portrait (``server/talk.py``): ``TalkRequest``'s fields with
the uploads as paths of the inputs folder, in the shape the queue reads (prompt, one clip, no steps)."""

from __future__ import annotations

from danqing.apps.talk import TalkRequest
from danqing.server.bodies import QueuedBody, strict_body


class _QueueView(QueuedBody):
    @property
    def prompt(self) -> str:
        return self.text or ""

    def library_request(self) -> TalkRequest:
        return TalkRequest.create(**self.model_dump(exclude=set(QueuedBody.model_fields)))


TalkJob = strict_body(
    "TalkJob", TalkRequest,
    "A queued talking portrait: the fields of ``TalkRequest`` with the uploads kept as paths of the "
    "inputs folder (what the job store holds).", base=_QueueView)
