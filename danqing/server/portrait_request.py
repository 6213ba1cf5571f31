"""The job store's form of a portrait-studio job (``server/portrait.py``) and the worker's run of
it: N pictures of a prepared person (``HOME/people/NAME/``) in a style template, with the
person's LoRA, optionally their face fused in, ranked by face similarity; the kept ones written
as ``outputs/portrait-images/NAME/DATE/RANK-SCORE-SEED.png`` with their infotext
(``danqing app portrait make``'s work, ``apps.portrait_make``)."""

from __future__ import annotations

import datetime
from typing import Literal, Optional

from PIL import Image
from pydantic import Field

from danqing.server.bodies import QueuedBody


class PortraitJob(QueuedBody):
    """A queued portrait action: who, which style, how many made and kept, the person's LoRA,
    the model, the first seed, a steps override and face fusion (strength and method)."""

    home: str  # the server's home (its people/ and styles/): set by the server, never by a client
    person: str
    style: str = "ink-sketch"
    n: int = Field(4, ge=1, le=32)
    keep: Optional[int] = Field(None, ge=1, le=32)
    lora: Optional[str] = None
    model: Optional[str] = None
    seed: int = -1
    portrait_steps: Optional[int] = Field(None, ge=1, le=150)
    fuse: Optional[float] = Field(None, ge=0, le=1)
    fuse_method: Literal["seamless", "alpha"] = "seamless"

    @property
    def prompt(self) -> str:
        return f"portrait {self.person}: {self.style}"


def run_portrait(worker, job) -> dict | None:
    """The worker's run of a ``PortraitJob``: progress per picture (the last one as the preview),
    the kept pictures saved best first; its result lists them with rank, score and seed."""
    from danqing.apps.portrait_make import make_portraits
    from danqing.apps.portrait_people import backend_of, load_person
    from danqing.apps.portrait_styles import get_style
    from danqing.faces import load_backend
    from danqing.outputs.store import save_png

    request: PortraitJob = job.request
    person = load_person(request.home, request.person)
    style = get_style(request.style, request.home)
    faces = load_backend(backend_of(person), models_dir=worker.studio.settings.models_dir)
    made = make_portraits(worker.studio, person, style, faces, n=request.n, keep=request.keep,
                          person_lora=request.lora, model=request.model, seed=request.seed,
                          steps=request.portrait_steps, fuse=request.fuse, method=request.fuse_method,
                          on_picture=lambda i, total: worker.media_step(i, total, None))
    if worker.aborted():
        return None
    folder = worker.outputs_dir / "portrait-images" / request.person / datetime.date.today().isoformat()
    files = []
    for rank, p in enumerate(made, 1):
        score = p.ranked.score
        path = folder / f"{job.id[:8]}-{rank:02d}-{score or 0:.3f}-{p.seed}.png"
        save_png(Image.fromarray(p.ranked.image), path, p.infotext)
        files.append({"path": str(path), "kind": "png", "name": path.name, "rank": rank, "seed": p.seed,
                      "score": None if score is None else round(float(score), 4), "fused": p.ranked.fused})
    return {"images": [], "files": files, "person": request.person, "style": request.style,
            "request": request.model_dump(exclude={"home"})}
