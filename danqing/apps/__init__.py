"""The practical projects of the course 《AI绘画核心技术与实战》 (2023) as workflows over
``Studio.generate`` (thin: they make control maps and requests, the engine paints). Defaults live
in ``data/apps/*.json``."""

from __future__ import annotations

import functools
import io
import json
import tempfile
from importlib import resources
from pathlib import Path

from PIL import Image

from danqing.errors import DanqingError, InvalidRequest
from danqing.outputs.store import save_png
from danqing.request import GenerationRequest
from danqing.studio import GenerationResult


@functools.lru_cache(maxsize=None)
def app_defaults(name: str) -> dict:
    """``data/apps/control.json``'s section ``name``."""
    return json.loads(resources.files("danqing").joinpath("data/apps/control.json").read_text(encoding="utf-8"))[name]


def work_dir(studio, app: str):
    """Where an app keeps the maps and pictures its requests name: outputs/apps/<app>/."""
    root = Path(studio.settings.outputs_dir) / "apps" / app
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root))


def save_map(image, folder, name: str) -> str:
    return str(save_png(image, folder / f"{name}.png", ""))


class QueuedStudio:
    """A Studio for the apps inside the server: each ``generate`` goes through the job queue (the
    worker thread stays the only owner of the models), waits for its pictures and returns the
    same ``GenerationResult`` as ``Studio.generate``.

    What a queued job cannot carry is refused, never dropped: a per-call ``on_step`` (the queue
    reports progress to the server's clients) and ``out_dir`` (saved pictures go to the server's
    outputs folder). The result has no ``latents`` or ``sources``: the queue hands out pictures.
    """

    def __init__(self, state, source: str = "ui"):
        self.state, self.source = state, source
        self.settings = state.settings

    def generate(self, request: GenerationRequest, on_step=None, *, save: bool = False, out_dir=None,
                 init_image: Image.Image | None = None, mask_image: Image.Image | None = None) -> GenerationResult:
        """``Studio.generate`` through the job queue (same arguments; see the class for the two
        it refuses). In-memory pictures are stored under the server's inputs folder first."""
        if on_step is not None:
            raise InvalidRequest("on_step", "a queued job reports its steps to the server's progress routes; "
                                 "a per-call on_step is not available through the job queue")
        if out_dir is not None:
            raise InvalidRequest("out_dir", "a queued job saves into the server's outputs folder; out_dir is not "
                                 "available through the job queue (use save=True)")
        if mask_image is not None and init_image is None and request.init_image is None:
            raise InvalidRequest("mask", "a mask needs an init image to inpaint")
        pictures = {}
        if init_image is not None:
            pictures["init_image"] = self.state.save_upload(init_image, "init")
        if mask_image is not None:
            pictures["mask"] = self.state.save_upload(mask_image, "mask")
        if pictures:
            request = request.replace(**pictures)
        worker = self.state.worker
        job = worker.wait(worker.submit(request, source=self.source, save=save).id,
                          timeout=self.state.server.sync_timeout_s)
        if job is None or job.status != "done":
            raise DanqingError((job.error if job is not None else None) or
                               f"job {job.status if job is not None else 'lost'}")
        done = job.result
        rows = done["images"]
        pngs = worker.take_images(job.id)
        if pngs is None:  # saved: the files the worker wrote
            pngs = [Path(row["path"]).read_bytes() for row in rows]
        return GenerationResult(
            images=[Image.open(io.BytesIO(b)).convert("RGB") for b in pngs],
            seeds=[row["seed"] for row in rows], subseeds=[row["subseed"] for row in rows],
            infotexts=[row.get("infotext", "") for row in rows],
            request=GenerationRequest.model_validate(done["request"]),
            paths=[Path(row["path"]) for row in rows if row.get("path")],
            timings=dict(done.get("timings", {})), interrupted=bool(done.get("interrupted")),
            warnings=list(done.get("warnings", [])))
