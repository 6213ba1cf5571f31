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
from danqing.server.state import STAND_IN, ClipUpload, ServerState, Upload, with_stand_ins
from danqing.server.media import INDEX, JOB_ID, kept_uploads, queue, serve_file
from danqing.outputs.video import probe_video
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
    animated WebP; video-to-video) or the picture to animate (image-to-video), and per ControlNet
    unit, optionally, a clip whose frames are the frames' maps (``control_videos[i]`` for
    ``request.controlnet[i]``, in place of its image)."""

    model_config = ConfigDict(extra="forbid")

    request: VideoRequest
    init_video: Optional[str] = None
    init_image: Optional[str] = None
    control_videos: Optional[list[Optional[str]]] = None

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
            clips = data.get("control_videos")
            if isinstance(request, dict) and isinstance(clips, list) and any(c is not None for c in clips):
                units = request.get("controlnet") or []
                if not isinstance(units, list) or len(clips) > len(units):
                    raise ValueError(f"control_videos: {len(clips)} clips for "
                                     f"{len(units) if isinstance(units, list) else 0} ControlNet units; "
                                     "control_videos[i] is the clip of request.controlnet[i]")
                for i, c in enumerate(clips):
                    if c is not None and isinstance(units[i], dict) and units[i].get("image") is not None:
                        raise ValueError(f"control_videos.{i}: request.controlnet.{i} has an image too; "
                                         "send its map as the image or its maps as a clip, not both")
                units = [{**u, "image": STAND_IN} if i < len(clips) and clips[i] is not None and isinstance(u, dict)
                         else u for i, u in enumerate(units)]
                data = {**data, "request": {**data["request"], "controlnet": units}}
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
        kept = [kept_control(keep, u["image"], i) for i, u in enumerate(fields.get("controlnet") or [])]
        if kept:  # a map or a clip uploaded with the request (the UI's, the API's)
            fields["controlnet"] = [{**u, "image": image} for u, (image, _) in zip(fields["controlnet"], kept)]
        if picture is not None:
            path = keep(png_bytes(picture), "init", (), ".png")
            request = VideoRequest.create(**fields, init_image=str(path))
        elif clip is None:
            request = VideoRequest.create(**fields)
        else:
            path = keep(clip, "video", SIGNATURES, ".mp4")
            try:
                fields = video2video_fields(fields, path)  # frames, fps and size of the clip unless given
                request = VideoRequest.create(**fields)
            except InvalidRequest as exc:  # about the clip: said of the upload, never of a server path
                field = "init_video" if exc.field in ("video", "init_video") else exc.field
                raise of_upload(exc, path, field, "the uploaded clip") from None
            check_work(request, state.server)
            check_frames(request.frames, state.server)
        for i, (_, n) in enumerate(kept):
            if n is not None and n < request.frames:
                raise InvalidRequest(f"controlnet.{i}.image", f"the control clip has {n} frames; the video asks for "
                                                              f"{request.frames} (send a clip of at least that many "
                                                              f"frames, or ask for fewer)")
        return resolve_for_queue(request, state.settings.default_model)


def kept_control(keep, image, i: int) -> tuple[Any, int | None]:
    """(a ControlNet unit's image once the request is accepted, the frame count of a clip or
    None): an uploaded map kept as a PNG, an uploaded clip kept as it came (checked first: it
    decodes, within the input limits), a path this server returned as it is."""
    if isinstance(image, Upload):
        return str(keep(png_bytes(image.image), "control", (), ".png")), None
    if not isinstance(image, ClipUpload):
        return image, None
    path = keep(image.data, image.kind, SIGNATURES, ".mp4")
    try:
        return str(path), probe_video(path).frames
    except InvalidRequest as exc:
        raise of_upload(exc, path, f"controlnet.{i}.image", "the uploaded control clip") from None


def of_upload(exc: InvalidRequest, path, field: str, name: str) -> InvalidRequest:
    """``exc`` about a kept upload, said of the upload as ``field`` (never of a server path)."""
    return InvalidRequest(field, str(exc).split(": ", 1)[-1].replace(str(path), name))


def video_router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["video"])

    @r.post("/video/jobs", status_code=202, summary="Submit a video job (VideoRequest + optional base64 clip)")
    def submit(body: VideoJobSubmit) -> dict:
        clip = decode_base64(body.init_video, "init_video", state.limits) if body.init_video else None
        picture = decode_image(body.init_image, "init_image", state.limits).convert("RGB") if body.init_image else None
        fields = body.request.model_dump(exclude_unset=True)
        fields.pop("init_video", None)  # the stand-ins of the uploads
        fields.pop("init_image", None)
        clips = {i: decode_base64(c, f"control_videos.{i}", state.limits)
                 for i, c in enumerate(body.control_videos or []) if c is not None}
        if clips:
            fields["controlnet"] = [{**u, "image": ClipUpload(clips[i])} if i in clips else u
                                    for i, u in enumerate(fields["controlnet"])]
        try:
            request = prepare_video(state, fields, clip, picture)
        except InvalidRequest as exc:  # name the field by its JSON path, as validation errors do
            field = exc.field if exc.field in ("init_video", "init_image") else f"request.{exc.field}"
            for i in clips:  # a control clip's trouble is said of where it came
                field = f"control_videos.{i}" if exc.field == f"controlnet.{i}.image" else field
            raise InvalidRequest(field, str(exc).split(": ", 1)[-1]) from None
        try:
            return queue(state, request)
        except BaseException:
            for upload in (request.init_video, request.init_image, *(request.controlnet[i].image for i in clips)):
                if upload:
                    os.unlink(upload)
            raise

    @r.get("/jobs/{job_id}/videos/{index}", response_class=FileResponse, summary="One clip of a finished video job")
    def video(job_id: str = JOB_ID, index: int = INDEX):
        return serve_file(state, job_id, "videos", index)

    return r

