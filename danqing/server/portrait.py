"""The portrait studio over HTTP (``danqing app portrait``; docs/api.md, "Portrait studio"):
people added from photos (base64, checked and prepared at once: the verdict of each photo is the
answer), the style templates, and portrait jobs (``server/portrait_request.py``) queued like any
job, their pictures served as files of the job (``server/media.py``). A person's LoRA is a job of
the training queue (``server/train.py``, ``"person": NAME``).

A person is a name (``check_new_name``); photos are written under a temporary folder with names
of the server's own (``photo-01.jpg``, ... or the client's base name when it is a plain one) and
read from there only; nothing of a refused request is kept.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Optional

from fastapi import APIRouter
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from danqing.errors import InvalidRequest
from danqing.models.names import check_new_name
from danqing.server.media import queue
from danqing.server.portrait_request import PortraitJob
from danqing.server.security import decode_base64
from danqing.server.state import ServerState

MAX_PHOTOS = 30
PHOTO_MAGIC = ((b"\xff\xd8", ".jpg"), (b"\x89PNG", ".png"), (b"RIFF", ".webp"), (b"BM", ".bmp"))
NAME = PathParam(max_length=64, description="a person's name")


class PersonSubmit(BaseModel):
    """The body of ``POST /api/v1/portrait/people``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., max_length=200)
    photos: list[str] = Field(..., min_length=1, max_length=MAX_PHOTOS, description="base64 photos (JPEG, PNG, WebP, BMP)")
    photo_names: Optional[list[str]] = Field(None, max_length=MAX_PHOTOS, description="their file names, for the table")
    trigger: Optional[str] = Field(None, max_length=64, description="default dq_NAME")
    size: int = Field(512, ge=64, le=2048, description="side of the training crops")
    min_photos: int = Field(3, ge=1, le=MAX_PHOTOS)
    replace: bool = False


def shown_name(name: object, i: int, suffix: str) -> str:
    """A photo's name in the verdict table: the client's base name when it is a plain file name
    (letters, digits, ``._-``, a known suffix), else ``photo-NN``; never a path."""
    base = Path(str(name)).name if isinstance(name, str) else ""
    if re.fullmatch(r"[\w\-. ]{1,80}", base) and Path(base).suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"):
        return f"{i + 1:02d}-{base}"
    return f"photo-{i + 1:02d}{suffix}"


def add_person(state: ServerState, name: object, photos: list[bytes], *, names: list | None = None,
               trigger: str | None = None, size: int = 512, min_photos: int = 3, replace: bool = False) -> dict:
    """Photos of one person -> ``HOME/people/NAME/`` (``portrait add``'s work): every photo's
    verdict, and the person when enough were accepted (else InvalidRequest naming ``photos``
    with the first reasons, and nothing written)."""
    from danqing.apps.portrait import IngestPolicy, ingest
    from danqing.apps.portrait_people import PEOPLE, prepare_person
    from danqing.faces import load_backend

    name = check_new_name(name, "name", "person")
    home = Path(state.settings.home)
    if (home / PEOPLE / name).exists() and not replace:
        raise InvalidRequest("name", f"person {name!r} exists; choose another name or replace it")
    faces = load_backend("dlib", models_dir=state.registry.models_dir)
    with tempfile.TemporaryDirectory(prefix="danqing-photos-") as tmp:
        paths = []
        for i, data in enumerate(photos):
            suffix = next((s for magic, s in PHOTO_MAGIC if data.startswith(magic)), ".jpg")
            path = Path(tmp) / shown_name(names[i] if names and i < len(names) else None, i, suffix)
            path.write_bytes(data)
            paths.append(path)
        report = ingest(paths, faces, IngestPolicy(min_photos=min_photos))
        verdicts = [{"photo": v.path.name, "accepted": v.accepted, "reason": v.reason or "ok"} for v in report.verdicts]
        try:
            folder = prepare_person(home, name, report, trigger=trigger, size=size, overwrite=replace)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.field, str(exc).split(": ", 1)[-1]) from None
    return {"name": name, "folder": str(folder), "accepted": len(report.accepted), "verdicts": verdicts,
            "contact_sheet": f"/api/v1/portrait/people/{name}/contact-sheet"}


def person_view(state: ServerState, name: object) -> dict:
    from danqing.apps.portrait_people import load_person
    from danqing.apps.portrait_train import training_pictures

    p = load_person(state.settings.home, name)
    return {"name": p.name, "trigger": p.trigger, "size": p.info.get("size"), "training_pictures": len(training_pictures(p)),
            "accepted": p.info.get("accepted", []), "rejected": p.info.get("rejected", []),
            "contact_sheet": f"/api/v1/portrait/people/{p.name}/contact-sheet"}


def prepare_portrait(state: ServerState, fields: dict) -> PortraitJob:
    """Network fields -> a checked ``PortraitJob``: a prepared person, a style, a LoRA and a model
    of this server's (by name), the work limits of its requests."""
    from danqing.apps.portrait_people import load_person
    from danqing.apps.portrait_styles import get_style, style_requests

    job = PortraitJob(**fields, home=str(state.settings.home))
    person = load_person(state.settings.home, job.person)
    style = get_style(job.style, state.settings.home)
    if job.keep is not None and job.keep > job.n:
        raise InvalidRequest("keep", f"{job.keep}: between 1 and the number of pictures ({job.n})")
    if job.lora is not None:
        state.model_name("lora", job.lora, "lora")
    for request in style_requests(style, person.trigger, n=1, person_lora=job.lora, model=job.model, seed=job.seed):
        if job.portrait_steps is not None:
            request = request.replace(steps=job.portrait_steps)
        state.prepare_request(request.model_dump(exclude_defaults=True))
    return job


class PortraitJobSubmit(BaseModel):
    """The body of ``POST /api/v1/portrait/jobs``: ``PortraitJob``'s fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    person: str = Field(..., max_length=200)
    style: str = Field("ink-sketch", max_length=200)
    n: int = Field(4, ge=1, le=32)
    keep: Optional[int] = Field(None, ge=1, le=32)
    lora: Optional[str] = Field(None, max_length=200)
    model: Optional[str] = Field(None, max_length=1024)
    seed: int = -1
    steps: Optional[int] = Field(None, ge=1, le=150, description="override the style's steps")
    fuse: Optional[float] = Field(None, ge=0, le=1, description="face-fusion strength; default: no fusion")
    fuse_method: str = Field("seamless", pattern="^(seamless|alpha)$")


def portrait_router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/api/v1/portrait", tags=["portrait"])

    @r.get("/people", summary="The people added (names)")
    def people() -> list[str]:
        from danqing.apps.portrait_people import people as names

        return names(state.settings.home)

    @r.post("/people", status_code=201, summary="Add a person from photos (base64): each photo's verdict")
    def add(body: PersonSubmit) -> dict:
        photos = [decode_base64(p, f"photos.{i}", state.limits) for i, p in enumerate(body.photos)]
        return add_person(state, body.name, photos, names=body.photo_names, trigger=body.trigger, size=body.size,
                          min_photos=body.min_photos, replace=body.replace)

    @r.get("/people/{name}", summary="A person: trigger, crops, each photo's verdict")
    def person(name: str = NAME) -> dict:
        return person_view(state, name)

    @r.get("/people/{name}/contact-sheet", summary="The person's contact sheet (PNG): accepted and rejected photos")
    def sheet(name: str = NAME):
        from fastapi.responses import FileResponse

        from danqing.apps.portrait_people import load_person

        return FileResponse(load_person(state.settings.home, name).folder / "contact-sheet.png", media_type="image/png")

    @r.get("/styles", summary="The style templates (danqing's and HOME/styles/portrait/)")
    def styles() -> list[dict]:
        from danqing.apps.portrait_styles import load_styles

        return [{"name": s.name, "title": s.title, "width": s.width, "height": s.height, "source": s.source}
                for s in load_styles(state.settings.home).values()]

    @r.post("/jobs", status_code=202, summary="Make portraits of a person in a style (a job; pictures ranked)")
    def submit(body: PortraitJobSubmit) -> dict:
        fields = body.model_dump()
        fields["portrait_steps"] = fields.pop("steps")
        return queue(state, prepare_portrait(state, fields))

    return r
