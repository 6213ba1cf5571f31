"""The job API for video: a ``VideoRequest`` queued as a job (text-to-video, video-to-video with
the input clip sent as base64, or image-to-video with the picture sent as base64), its progress on the ordinary job routes, its clips served
as files of the outputs folder (``server/media.py``, shared with 3D jobs) (docs/api.md, "Video jobs").

Every model the request names is a name of its own folder (checkpoint, motion module, LoRA
tags); the work limits (steps, size, prompts, ``max_frames``) are checked before anything is
queued; an uploaded clip is checked (decodable, within the input limits) before it is kept.
"""

from __future__ import annotations

import io
import os
from typing import Any, Optional

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, model_validator

from danqing.customise.lora import request_tags
from danqing.errors import InvalidRequest
from danqing.request_video import VideoRequest
from danqing.server.jobs import resolve_for_queue
from danqing.models.svd import PIPELINE as SVD_PIPELINE, is_svd_folder
from danqing.server.security import check_frames, check_work, decode_base64, decode_image, strict_scalars
from danqing.server.state import STAND_IN, ServerState, Upload, with_stand_ins
from danqing.server.media import INDEX, JOB_ID, kept_uploads, queue, serve_file
from danqing.video.studio import video2video_fields


def png_bytes(picture) -> bytes:
    """A decoded upload as the PNG the job reads back (lossless; no metadata of the sender's)."""
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()

# what an uploaded clip is, from its first bytes (the readers pick their decoder by extension)
SIGNATURES = ((b"GIF8", ".gif"), (b"RIFF", ".webp"))


class VideoJobSubmit(BaseModel):
    """A video job: the library's VideoRequest, plus the clip to restyle (base64 MP4, GIF or
    animated WebP; video-to-video)."""

    model_config = ConfigDict(extra="forbid")

    request: VideoRequest
    init_video: Optional[str] = None
    init_image: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _strict(cls, data: Any) -> Any:
        if isinstance(data, dict):
            strict_scalars(data, cls)
            strict_scalars(data.get("request"), VideoRequest, "request.")
            request = data.get("request")
            if isinstance(request, dict) and request.get("init_video") is not None:
                raise ValueError("request.init_video: paths are not accepted over HTTP; send the clip itself as "
                                 "init_video (base64)")
            if isinstance(request, dict) and request.get("init_image") is not None:
                raise ValueError("request.init_image: paths are not accepted over HTTP; send the picture itself as "
                                 "init_image (base64)")
            if data.get("init_video") and data.get("init_image"):
                raise ValueError("init_image: image-to-video starts from a picture, video-to-video from a clip; "
                                 "send one of init_image and init_video")
            if isinstance(request, dict) and data.get("init_video"):  # validated as video-to-video
                data = {**data, "request": {**request, "init_video": STAND_IN}}
            if isinstance(request, dict) and data.get("init_image"):  # validated as image-to-video
                data = {**data, "request": {**request, "init_image": STAND_IN}}
        return data


def prepare_video(state: ServerState, fields: dict[str, Any], clip: bytes | None, picture=None) -> VideoRequest:
    """Network fields (VideoRequest names) + an uploaded clip (video-to-video) or picture (a
    decoded PIL image: image-to-video) -> a queued-ready request; the upload is kept under the
    inputs folder only once every other check has passed."""
    fields = dict(fields)
    opts = state.options()
    fields["model"] = (state.model_name("checkpoint", fields["model"], "model") if fields.get("model") is not None
                       else opts["sd_model_checkpoint"])
    if fields.get("vae") is not None:
        fields["vae"] = state.model_name("vae", fields["vae"], "vae")
    if fields.get("motion_module") is not None:
        fields["motion_module"] = state.model_name("motion", fields["motion_module"], "motion_module")
    if fields.get("controlnet"):  # maps this server returned or uploads (a picture for every frame); never another path
        fields["controlnet"] = state.control_units(fields["controlnet"])
    stand_in = {"init_video": STAND_IN} if clip is not None else {"init_image": STAND_IN} if picture is not None else {}
    checked = VideoRequest.create(**with_stand_ins(fields), **stand_in)
    for tag in request_tags(checked):
        state.model_name("lora", tag.name, "prompt")
    check_work(checked, state.server)
    check_frames(checked.frames, state.server)
    if picture is not None:
        entry = state.registry.find("checkpoint", checked.model)
        if entry.format != "diffusers" or not is_svd_folder(entry.path):
            raise InvalidRequest("init_image", f"image-to-video needs a Stable Video Diffusion model ({SVD_PIPELINE} "
                                               f"folder); {checked.model!r} is not one")
    with kept_uploads(state) as keep:  # accepted: the uploads are kept (all removed if a later check fails)
        if fields.get("controlnet"):  # a map uploaded with the request (the UI's), kept as a PNG
            fields["controlnet"] = [{**u, "image": str(keep(png_bytes(u["image"].image), "control", (), ".png"))
                                     if isinstance(u["image"], Upload) else u["image"]} for u in fields["controlnet"]]
        if picture is not None:
            path = keep(png_bytes(picture), "init", (), ".png")
            return resolve_for_queue(VideoRequest.create(**fields, init_image=str(path)), state.settings.default_model)
        if clip is None:
            return resolve_for_queue(VideoRequest.create(**fields), state.settings.default_model)
        path = keep(clip, "video", SIGNATURES, ".mp4")
        try:
            fields = video2video_fields(fields, path)  # frames, fps and size of the clip unless given
            request = VideoRequest.create(**fields)
        except InvalidRequest as exc:  # about the clip: said of the upload, never of a server path
            detail = str(exc).split(": ", 1)[-1].replace(str(path), "the uploaded clip")
            raise InvalidRequest("init_video" if exc.field in ("video", "init_video") else exc.field, detail) from None
        check_work(request, state.server)
        check_frames(request.frames, state.server)
        return resolve_for_queue(request, state.settings.default_model)


def video_router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["video"])

    @r.post("/video/jobs", status_code=202, summary="Submit a video job (VideoRequest + optional base64 clip)")
    def submit(body: VideoJobSubmit) -> dict:
        clip = decode_base64(body.init_video, "init_video", state.limits) if body.init_video else None
        picture = decode_image(body.init_image, "init_image", state.limits).convert("RGB") if body.init_image else None
        fields = body.request.model_dump(exclude_unset=True)
        fields.pop("init_video", None)  # the stand-ins of the uploads
        fields.pop("init_image", None)
        try:
            request = prepare_video(state, fields, clip, picture)
        except InvalidRequest as exc:  # name the field by its JSON path, as validation errors do
            field = exc.field if exc.field in ("init_video", "init_image") else f"request.{exc.field}"
            raise InvalidRequest(field, str(exc).split(": ", 1)[-1]) from None
        try:
            return queue(state, request)
        except BaseException:
            for upload in (request.init_video, request.init_image):
                if upload:
                    os.unlink(upload)
            raise

    @r.get("/jobs/{job_id}/videos/{index}", response_class=FileResponse, summary="One clip of a finished video job")
    def video(job_id: str = JOB_ID, index: int = INDEX):
        return serve_file(state, job_id, "videos", index)

    return r

