"""JSON bodies of the job API derived from the library's request types, so that a field is
declared in one place (the library) and the server's body follows it."""

from __future__ import annotations

import dataclasses
import sys
import typing

from pydantic import BaseModel, ConfigDict, create_model


class StrictBody(BaseModel):
    """A JSON body that takes its fields' exact types and no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)


class QueuedBody(StrictBody):
    """A job the queue runs that is not a sampling request (talk, comic): what the queue reads of
    every request, as one clip or action with no sampling steps and no init image."""

    batch_size: int = 1
    batch_count: int = 1
    steps: int = 0
    init_image: None = None

    def to_json(self) -> str:
        return self.model_dump_json()


def strict_body(name: str, library_type: type, doc: str, *, drop: tuple[str, ...] = (),
                base: type[BaseModel] = StrictBody) -> type[BaseModel]:
    """A JSON body with the fields of a library request (a dataclass) and their defaults, so the
    library type stays the one place a field is declared. ``drop`` leaves fields out; ``base``
    adds fields and methods of the server's own (it derives from ``StrictBody``)."""
    hints = typing.get_type_hints(library_type)
    spec = {f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(library_type) if f.name not in drop}
    return create_model(name, __base__=base, __doc__=doc, __module__=sys._getframe(1).f_globals["__name__"], **spec)
