"""The job store's form of a comic job (``server/comic.py``) and the worker's run of it: a named
project under ``outputs/comics/NAME/``, its storyboard (TOML text) and one action of the comic
workflow (``danqing app comic draft | reroll | render``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from PIL import Image

from danqing.apps.comic import ComicProject
from danqing.files import atomic_write_text
from danqing.server.bodies import QueuedBody

ACTIONS = ("draft", "reroll", "render")
STORYBOARD = "storyboard.toml"  # the project's storyboard, in its folder


def comics_dir(outputs_dir: Path) -> Path:
    """Where the server keeps comic projects, one folder per name (under the outputs folder, so
    the web UI may show their files)."""
    return Path(outputs_dir) / "comics"


class ComicJob(QueuedBody):
    """A queued comic action: the project's name, its storyboard and what to do (``panel``: the
    panel to re-roll, or the one panel to draft), in the shape the queue reads."""

    project: str
    storyboard: str
    action: Literal["draft", "reroll", "render"] = "draft"
    panel: Optional[int] = None

    @property
    def prompt(self) -> str:
        return f"comic {self.project}: {self.action}" + (f" panel {self.panel}" if self.panel else "")


def run_comic(worker, job) -> dict | None:
    """The worker's run of a ``ComicJob``: the storyboard written into the project folder, the
    action run there, progress (panels done of panels to do, the last panel as the preview) per
    panel. Its result lists the files the action made, each with its name in the project."""
    request: ComicJob = job.request
    folder = comics_dir(worker.outputs_dir) / request.project
    source = folder / STORYBOARD
    atomic_write_text(source, request.storyboard, overwrite=True)
    comic = ComicProject(source, folder)

    def on_panel(done: int, total: int, path: Path) -> bool:
        with Image.open(path) as im:
            return worker.media_step(done, total, None, im.convert("RGB"))

    if request.action == "draft":
        made = [comic.draft(worker.studio, [request.panel] if request.panel else None, on_panel=on_panel)]
    elif request.action == "reroll":
        made = [comic.reroll(worker.studio, request.panel, on_panel=on_panel)]
    else:
        made = comic.render(worker.studio, on_panel=on_panel)
    if worker.aborted():
        return None
    files = [{"path": str(p), "kind": p.suffix.lstrip("."), "name": p.relative_to(folder).as_posix()} for p in made]
    return {"images": [], "files": files, "project": request.project, "seeds": comic.seeds(),
            "request": request.model_dump()}
