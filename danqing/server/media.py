"""What every media job shares (video, 3D, talk): uploads kept under the inputs folder (and removed
when the request is refused), queueing a checked request, each job's files served from the
outputs folder with their URLs in the job's JSON view, and the worker's runs of text-to-3D and
talk jobs (docs/api.md, "Video jobs", "3D jobs" and "Talk jobs").

A media job's result row lists its files under one key (``videos`` for video, ``files`` for 3D);
``GET /api/v1/jobs/ID/videos/N`` and ``GET /api/v1/jobs/ID/files/N`` both serve from here.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from danqing.files import atomic_write_bytes
from danqing.server.common import JobFailed
from danqing.threed.export import output_paths
from danqing.threed.make import make_3d, prepare_3d

JOB_ID = PathParam(pattern=r"^[0-9a-f]{32}$", description="job id (32 hex characters)")
INDEX = PathParam(ge=0, le=10_000)
MEDIA_TYPES = {".mp4": "video/mp4", ".gif": "image/gif", ".webp": "image/webp", ".png": "image/png",
               ".glb": "model/gltf-binary", ".obj": "model/obj", ".ply": "application/ply",
               ".json": "application/json", ".pdf": "application/pdf", ".cbz": "application/vnd.comicbook+zip"}
FILE_KEYS = {"videos": "clip", "files": "file"}  # result key -> what one entry is called in a 404
PREVIEW_EVERY = 10  # a 3D job renders its front view every this many steps (and at the last)


def queue(state, request) -> dict:
    """Queue a checked request as a saved API job; its JSON view (with its queue position)."""
    job = state.worker.submit(request, source="api", save=True)
    return media_view(job, {**job.to_dict(), "position": state.store.position(job)})


def serve_file(state, job_id: str, key: str, index: int) -> FileResponse:
    """File ``index`` of a finished job's result list ``key``, or a 404 saying which is missing."""
    job = state.store.get(job_id)
    if job is None:
        raise JobFailed(404, f"no job {job_id}", job_id)
    entries = (job.result or {}).get(key, [])
    noun = FILE_KEYS[key]
    if index >= len(entries):
        raise JobFailed(404, f"job {job_id} has no {noun} {index}", job_id)
    path = entries[index]["path"]
    if not os.path.isfile(path):
        raise JobFailed(404, f"{noun} {index} of job {job_id} is no longer on disk", job_id)
    return FileResponse(path, media_type=MEDIA_TYPES.get(os.path.splitext(path)[1].lower(), "application/octet-stream"),
                        filename=os.path.basename(path))


@contextmanager
def kept_uploads(state) -> Iterator:
    """``keep(data, kind, signatures, default_suffix) -> path``: an upload written whole under the
    inputs folder (``inputs/DATE/UUID-KIND.SUFFIX``, the suffix told by the data's first bytes, as
    the readers pick their decoder by it). Every file kept inside the block is removed when the
    block raises, so a refused request leaves nothing behind."""
    kept: list[Path] = []

    def keep(data: bytes, kind: str, signatures=(), default_suffix: str = ".bin") -> Path:
        suffix = next((s for magic, s in signatures if data.startswith(magic)), default_suffix)
        path = state.inputs_dir / date.today().isoformat() / f"{uuid.uuid4().hex}-{kind}{suffix}"
        atomic_write_bytes(path, data)
        kept.append(path)
        return path

    try:
        yield keep
    except BaseException:
        for path in kept:
            path.unlink(missing_ok=True)
        raise


def media_view(job, view: dict | None = None) -> dict:
    """A job's JSON view with each file's URL (``/api/v1/jobs/ID/videos/N``, ``.../files/N``)."""
    d = view if view is not None else job.to_dict()
    result = d.get("result") or {}
    for key in FILE_KEYS:
        if result.get(key):
            result = {**result, key: [{**v, "url": f"/api/v1/jobs/{job.id}/{key}/{i}"} for i, v in enumerate(result[key])]}
    if result:
        d["result"] = result
    return d


def slug(prompt: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "-", prompt).strip("-")[:40].lower() or "object"


def run_3d(worker, job) -> dict | None:
    """The worker's run of a ``ThreeDRequest`` job: mesh (GLB, OBJ, PLY), parameters and turntable
    (GIF, MP4) under ``outputs/3d/DATE/``; progress (step, loss) every step, the front view as the
    preview every ``PREVIEW_EVERY`` steps. None when the job was cancelled (nothing left behind)."""
    request = job.request
    folder = worker.outputs_dir / "3d" / date.today().isoformat()
    out = output_paths(folder / f"{job.id[:8]}-{slug(request.prompt)}-{request.seed}.glb")
    request, loaded = prepare_3d(worker.studio, request, out)
    worker.store.set_planned(job.id, [*out.written(), out.checkpoint])

    def on_step(report):
        preview = report.preview() if report.step % PREVIEW_EVERY == 0 or report.step == report.total else None
        return worker.media_step(report.step, report.total, report.loss, preview)

    made = make_3d(loaded, request, out, on_step=on_step)
    if worker.aborted():
        for p in [*out.written(), out.checkpoint]:
            Path(p).unlink(missing_ok=True)
        return None
    files = [{"path": str(p), "kind": p.suffix.lstrip(".")} for p in made.paths]
    return {"images": [], "files": files, "interrupted": made.result.interrupted,
            "losses": [round(x, 6) for x in made.result.losses], "parameters": made.params,
            "request": request.to_dict()}


def run_talk(worker, job) -> dict:
    """The worker's run of a talking portrait (``server/talk.py``'s ``TalkJob``): the MP4 with its
    sound and JSON sidecar under ``outputs/talk/DATE/``."""
    from danqing.apps.talk import talk  # the talk workflow (dlib, espeak-ng), loaded by its first job

    request = job.request.library_request()
    out = worker.outputs_dir / "talk" / date.today().isoformat() / f"{job.id[:8]}.mp4"
    worker.store.set_planned(job.id, [out, out.with_name(out.name + ".json")])
    result = talk(request, out)
    files = [{"path": str(p), "kind": Path(p).suffix.lstrip(".")} for p in result.paths]
    return {"images": [], "files": files, "frames": len(result.frames), "parameters": result.parameters,
            "request": job.request.model_dump()}
