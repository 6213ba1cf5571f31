"""The job API for the comic (``danqing app comic``): a named project, its storyboard (TOML text)
and an action -- draft, re-roll one panel, render -- queued as a job; what the action made
(contact sheet, pages, PDF, CBZ) served as files of the job (``server/media.py``) and, by name,
from the project (docs/api.md, "Comic jobs").

A project is a name (``danqing.models.names.check_new_name``), kept under
``outputs/comics/NAME/``; a file of it is named by its place in the project (``page-1.png``,
``draft/panel-03.png``) and looked up in the project's listing, never opened as a path. A
storyboard is checked whole before anything is queued: its TOML (line and column), its fields,
every panel's request as the job API checks one (names of installed models only, pictures only
from this server, the work limits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from danqing.apps.comic import panel_request, parse_storyboard
from danqing.apps.comic_expand import lm_folder
from danqing.errors import InvalidRequest
from danqing.models.names import check_new_name, inside
from danqing.server.comic_request import STORYBOARD, ComicJob, comics_dir
from danqing.server.common import JobFailed
from danqing.server.media import MEDIA_TYPES, queue
from danqing.server.state import ServerState

MAX_STORYBOARD_CHARS = 100_000
SHOWN = (".png", ".pdf", ".cbz", ".json", ".toml")  # the kinds of project file served by name
NAME = PathParam(max_length=64, description="a comic project's name")


class ComicJobSubmit(BaseModel):
    """The body of ``POST /api/v1/comic/jobs``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    project: str
    storyboard: Optional[str] = None  # TOML text; None: the project's own (it must exist)
    action: Literal["draft", "reroll", "render"] = "draft"
    panel: Optional[int] = None  # reroll: the panel (1-based); draft: only this panel


def project_names(state: ServerState) -> list[str]:
    root = comics_dir(state.settings.outputs_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / STORYBOARD).is_file() and inside(p, root))


def prepare_comic(state: ServerState, fields: dict) -> ComicJob:
    """Network fields -> a checked ``ComicJob`` (InvalidRequest naming the field otherwise)."""
    name = check_new_name(fields.get("project"), "project", "comic project")
    text = fields.get("storyboard")
    if text is None:
        if name not in project_names(state):
            raise InvalidRequest("storyboard", f"no comic project {name!r} yet: send its storyboard (TOML text); "
                                               f"projects: {', '.join(project_names(state)) or 'none'}")
        text = (comics_dir(state.settings.outputs_dir) / name / STORYBOARD).read_text(encoding="utf-8")
    if len(text) > MAX_STORYBOARD_CHARS:
        raise InvalidRequest("storyboard", f"more than {MAX_STORYBOARD_CHARS} characters")
    story = parse_storyboard(text, "storyboard")
    action, panel, n = fields.get("action", "draft"), fields.get("panel"), len(story.panels)
    if action == "reroll" and panel is None:
        raise InvalidRequest("panel", "reroll needs the panel to draw again (1-based)")
    if panel is not None and (action == "render" or not 1 <= panel <= n):
        raise InvalidRequest("panel", f"{panel}: the storyboard has panels 1-{n}" if action != "render"
                             else "render draws every panel; leave panel out")
    if story.expand and story.expand.startswith("lm:"):  # a name of models/prompt_expansion/, never a path
        lm_folder(story.expand[3:], base_dir=None, models_dir=state.registry.models_dir, names_only=True)
    for i in range(n):  # each panel's request, checked as the job API checks one
        try:
            request = panel_request(story, i, 0, final=True)
        except InvalidRequest as exc:
            raise InvalidRequest(f"storyboard.panels.{i}", str(exc).split(": ", 1)[-1]) from None
        try:
            state.prepare_request(request.model_dump(exclude_defaults=True))
        except InvalidRequest as exc:
            raise InvalidRequest(f"storyboard.panels.{i}.{exc.field}", str(exc).split(": ", 1)[-1]) from None
    return ComicJob(project=name, storyboard=text, action=action, panel=panel)


def project_files(state: ServerState, name: object) -> dict[str, Path]:
    """{name in the project: file} of a project named by a client (a 404 naming the projects
    otherwise); the client's strings are only compared with these names, never opened."""
    names = project_names(state)
    if name not in names:
        raise JobFailed(404, f"no comic project {str(name)[:64]!r}; projects: {', '.join(names) or 'none'}", None)
    folder = comics_dir(state.settings.outputs_dir) / name
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in SHOWN and inside(p, folder)}


def comic_router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["comic"])

    @r.post("/comic/jobs", status_code=202, summary="Submit a comic action (draft, reroll a panel, render)")
    def submit(body: ComicJobSubmit) -> dict:
        return queue(state, prepare_comic(state, body.model_dump()))

    @r.get("/comic/projects", summary="The comic projects (names)")
    def projects() -> list[str]:
        return project_names(state)

    @r.get("/comic/projects/{name}", summary="A comic project: its seeds, prompts and files")
    def project(name: str = NAME) -> dict:
        files = project_files(state, name)
        info = json.loads(files["project.json"].read_text(encoding="utf-8")) if "project.json" in files else {}
        return {"name": name, "seeds": info.get("seeds", []), "prompts": info.get("prompts", []),
                "files": [{"name": f, "url": f"/api/v1/comic/projects/{name}/files/{f}"} for f in files]}

    @r.get("/comic/projects/{name}/files/{file:path}", response_class=FileResponse,
           summary="A file of a comic project by its name (page-1.png, comic.pdf, draft/panel-01.png)")
    def file(file: str, name: str = NAME):
        files = project_files(state, name)
        if file not in files:
            raise JobFailed(404, f"comic project {name!r} has no file {file[:120]!r}; files: {', '.join(files)}", None)
        path = files[file]
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"), filename=path.name)

    return r
