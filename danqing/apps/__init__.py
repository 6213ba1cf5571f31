"""The practical projects of the course 《AI绘画核心技术与实战》 (2023) as workflows over
``Studio.generate`` (thin: they make control maps and requests, the engine paints). Defaults live
in ``data/apps/*.json``."""

from __future__ import annotations

import functools
import json
from importlib import resources


@functools.lru_cache(maxsize=None)
def app_defaults(name: str) -> dict:
    """``data/apps/control.json``'s section ``name``."""
    return json.loads(resources.files("danqing").joinpath("data/apps/control.json").read_text(encoding="utf-8"))[name]


def work_dir(studio, app: str):
    """Where an app keeps the maps and pictures its requests name: outputs/apps/<app>/."""
    import tempfile
    from pathlib import Path

    root = Path(studio.settings.outputs_dir) / "apps" / app
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root))


def save_map(image, folder, name: str) -> str:
    from danqing.outputs.store import save_png

    return str(save_png(image, folder / f"{name}.png", ""))


class QueuedStudio:
    """A Studio stand-in for the apps inside the server: each ``generate`` goes through the job
    queue (the worker thread stays the only owner of the models) and waits for its pictures."""

    def __init__(self, state, source: str = "ui"):
        self.state, self.source = state, source
        self.settings = state.settings

    def generate(self, request, save: bool = False, **_):
        import io
        from types import SimpleNamespace

        from PIL import Image

        from danqing.errors import DanqingError

        job = self.state.worker.submit(request, source=self.source, save=False)
        job = self.state.worker.wait(job.id, timeout=self.state.server.sync_timeout_s)
        if job.status != "done":
            raise DanqingError(job.error or f"job {job.status}")
        pngs = self.state.worker.take_images(job.id) or []
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
        return SimpleNamespace(images=images, infotexts=[i.get("infotext", "") for i in job.result["images"]])
