"""The job API for text-to-3D: a ``ThreeDRequest`` queued as a job, its progress (step, loss, a
front-view preview every few steps) on the ordinary job routes, its mesh (GLB, OBJ, PLY),
parameters and turntable (GIF, MP4) served as files of the job (``server/media.py``;
docs/api.md, "3D jobs").

The model is a name of its own folder; the work limits (steps, render size, turntable frames,
the prompts' length) are checked before anything is queued.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from danqing.errors import InvalidRequest
from danqing.server.bodies import strict_body
from danqing.server.media import INDEX, JOB_ID, queue, serve_file
from danqing.server.state import ServerState
from danqing.threed.run import ThreeDRequest

MAX_STEPS = 5000  # optimisation steps of one 3D job (``danqing 3d`` itself takes up to 100000)


ThreeDJobSubmit = strict_body(
    "ThreeDJobSubmit", ThreeDRequest,
    "A 3D job: the fields of the library's ``ThreeDRequest`` (only ``prompt`` is required).")


def prepare_3d_job(state: ServerState, fields_: dict) -> ThreeDRequest:
    """Network fields -> a checked ``ThreeDRequest`` (model named, within the server's limits)."""
    fields_ = dict(fields_)
    fields_["model"] = (state.model_name("checkpoint", fields_["model"], "model") if fields_.get("model") is not None
                        else state.options()["sd_model_checkpoint"])
    request = ThreeDRequest(**fields_)
    limits = state.server
    if request.steps > MAX_STEPS:
        raise InvalidRequest("steps", f"{request.steps} steps is more than the limit of {MAX_STEPS} for a 3D job")
    if request.size * request.size > limits.max_pixels:
        raise InvalidRequest("size", f"{request.size}x{request.size} renders are more than the limit of "
                                     f"{limits.max_pixels} pixels (max_pixels)")
    if request.frames > limits.max_frames:
        raise InvalidRequest("frames", f"{request.frames} turntable frames is more than the limit of "
                                       f"{limits.max_frames} (max_frames)")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(request, name)) > limits.max_prompt_chars:
            raise InvalidRequest(name, f"more than {limits.max_prompt_chars} characters (max_prompt_chars)")
    return request


def threed_router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["3d"])

    @r.post("/3d/jobs", status_code=202, summary="Submit a text-to-3D job (the fields of ThreeDRequest)")
    def submit(body: ThreeDJobSubmit) -> dict:
        return queue(state, prepare_3d_job(state, body.model_dump()))

    @r.get("/jobs/{job_id}/files/{index}", response_class=FileResponse,
           summary="One file of a finished 3D job (GLB, OBJ, PLY, JSON, GIF, MP4)")
    def file(job_id: str = JOB_ID, index: int = INDEX):
        return serve_file(state, job_id, "files", index)

    return r
