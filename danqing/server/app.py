"""``create_app``: one FastAPI app with the A1111 API (``/sdapi/v1``), the async job API
(``/api/v1``) and the Gradio web UI (``/``). Nothing happens at import; ``danqing serve`` builds
the settings and calls the factory (docs/api.md).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import APIRouter, Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, model_validator
from starlette.exceptions import HTTPException

from danqing.errors import DanqingError, InvalidRequest, ModelError
from danqing.files import is_url
from danqing.outputs import place
from danqing.request import GenerationRequest
from danqing.server.a1111 import build_router
from danqing.server.comic import comic_router
from danqing.server.portrait import portrait_router
from danqing.server.common import JobFailed, job_error
from danqing.server.batching import BatchingWorker, BatchSettings
from danqing.server.store import QUEUED, RUNNING, STATUSES, TERMINAL, JobStore
from danqing.server.security import (
    BasicAuthMiddleware,
    ERROR_RESPONSES,
    JOB_RESPONSES,
    BodyLimitMiddleware,
    HostOriginMiddleware,
    decode_image,
    error_body,
    guard_body,
    strict_scalars,
)
from danqing.server.state import ServerState
from danqing.server.ui import mount_ui
from danqing.server.media import media_view
from danqing.server.talk import talk_router
from danqing.server.threed import threed_router
from danqing.server.train import train_router
from danqing.server.video import video_router
from danqing.settings import ServerSettings, Settings, force_offline
from danqing.studio import Studio

JOB_ID = PathParam(pattern=r"^[0-9a-f]{32}$", description="job id (32 hex characters)")


# ---------------------------------------------------------------------------------------------
# The job API
# ---------------------------------------------------------------------------------------------
MAX_IP_IMAGES = 8  # IP-Adapter pictures per job


class JobSubmit(BaseModel):
    """A job: the library's GenerationRequest, plus the pictures of img2img / inpaint."""

    model_config = ConfigDict(extra="forbid")

    request: GenerationRequest
    init_image: Optional[str] = None
    mask: Optional[str] = None
    ip_adapter_images: Optional[list[str]] = None
    save: bool = True

    @model_validator(mode="before")
    @classmethod
    def _strict(cls, data: Any) -> Any:
        """Booleans and numbers as strict as the A1111 bodies: no 0/1 for false/true, no 1.0 for 1."""
        if isinstance(data, dict):
            strict_scalars(data, cls)
            strict_scalars(data.get("request"), GenerationRequest, "request.")
        return data

    @model_validator(mode="before")
    @classmethod
    def _ip_uploads(cls, data: Any) -> Any:
        """Base64 IP-Adapter pictures stand in for ``request.ip_adapter_image`` (which must then
        be left out): the request is validated with as many places as pictures, filled in by
        ``submit`` with the stored uploads."""
        if isinstance(data, dict) and data.get("ip_adapter_images") and isinstance(data.get("request"), dict):
            images = data["ip_adapter_images"]
            if not isinstance(images, list) or not 1 <= len(images) <= MAX_IP_IMAGES:
                raise ValueError(f"ip_adapter_images must be a list of 1 to {MAX_IP_IMAGES} base64 pictures")
            if data["request"].get("ip_adapter_image"):
                raise ValueError("give the IP-Adapter pictures as ip_adapter_images (base64) or as "
                                 "request.ip_adapter_image (paths from this server), not both")
            data = {**data, "request": {**data["request"], "ip_adapter_image": ["(upload)"] * len(images)}}
        return data


def _job_view(state: ServerState, job, request_url: str = "") -> dict:
    d = job.to_dict()
    if job.status == QUEUED:
        d["position"] = state.store.position(job)
    if job.status == RUNNING:
        p = state.worker.progress(job.id)
        if p["job_id"] == job.id:
            d["progress"] = {k: v for k, v in p.items() if k not in ("preview_png", "log_len")}
    if job.result:
        d["result"] = {**job.result, "images": [
            {**img, "url": f"/api/v1/jobs/{job.id}/images/{i}" if img.get("path") else None}
            for i, img in enumerate(job.result["images"])]}
    return media_view(job, d)


def job_router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["jobs"])

    def get_job(job_id: str):
        job = state.store.get(job_id)
        if job is None:
            raise JobFailed(404, f"no job {job_id}", job_id)
        return job

    @r.post("/jobs", status_code=202, summary="Submit a job (GenerationRequest + optional base64 pictures)")
    def submit(body: JobSubmit) -> dict:
        init = decode_image(body.init_image, "init_image", state.limits) if body.init_image else None
        mask = decode_image(body.mask, "mask", state.limits) if body.mask else None
        fields = body.request.model_dump(exclude_unset=True)
        if body.ip_adapter_images:  # decoded now, stored only once the request is accepted
            fields["ip_adapter_image"] = tuple(decode_image(b, "ip_adapter_images", state.limits)
                                               for b in body.ip_adapter_images)
        try:
            job = state.submit(fields, source="api", save=body.save, init_image=init, mask=mask)
        except InvalidRequest as exc:  # name the field by its JSON path, as validation errors do
            raise InvalidRequest(f"request.{exc.field}", str(exc).split(": ", 1)[-1]) from None
        return _job_view(state, job)

    @r.get("/jobs/{job_id}", summary="Status of a job (position when queued, progress when running)")
    def status(job_id: str = JOB_ID) -> dict:
        return _job_view(state, get_job(job_id))

    @r.get("/jobs/{job_id}/wait", summary="Wait (up to timeout seconds) until the job has finished")
    def wait(job_id: str = JOB_ID, timeout: float = Query(30.0, ge=0, le=600)) -> dict:
        get_job(job_id)
        return _job_view(state, state.worker.wait(job_id, timeout))

    @r.post("/jobs/{job_id}/cancel", summary="Cancel a queued job or stop a running one", responses=JOB_RESPONSES)
    def cancel(job_id: str = JOB_ID) -> dict:
        job = get_job(job_id)
        if job.status in TERMINAL:
            raise JobFailed(409, f"job {job_id} has already {'finished' if job.status == 'done' else job.status}", job_id)
        state.worker.cancel(job_id)
        return _job_view(state, state.worker.wait(job_id, timeout=30))

    @r.get("/jobs/{job_id}/result", summary="The images (URLs, seeds, infotexts) of a finished job", responses=JOB_RESPONSES)
    def result(job_id: str = JOB_ID) -> dict:
        job = get_job(job_id)
        if job.status != "done":
            raise job_error(job) if job.status in TERMINAL else JobFailed(409, f"job {job_id} is {job.status}", job_id)
        return _job_view(state, job)["result"]

    @r.get("/jobs/{job_id}/images/{index}", response_class=FileResponse, summary="One image of a finished job (PNG)")
    def image(job_id: str = JOB_ID, index: int = PathParam(ge=0, le=10_000)):
        job = get_job(job_id)
        images = (job.result or {}).get("images", [])
        if index >= len(images) or not images[index].get("path"):
            raise JobFailed(404, f"job {job_id} has no saved image {index}", job_id)
        path = images[index]["path"]
        if is_url(path):  # pictures saved under an fsspec outputs URL (outputs.place)
            try:
                return Response(place.read_bytes(path), media_type="image/png")
            except FileNotFoundError:
                raise JobFailed(404, f"image {index} of job {job_id} is no longer at {path}", job_id) from None
        if not os.path.isfile(path):
            raise JobFailed(404, f"image {index} of job {job_id} is no longer on disk", job_id)
        return FileResponse(path, media_type="image/png")

    @r.get("/jobs/{job_id}/events", summary="Server-sent events: queue position, per-step progress with previews, the end")
    async def events(request: Request, job_id: str = JOB_ID):
        get_job(job_id)

        async def stream():
            cursor, last_preview, last_status = 0, None, None
            while True:
                job = state.store.get(job_id)
                if job.status == QUEUED and last_status != QUEUED:
                    yield _sse("queued", {"id": job_id, "status": job.status, "position": state.store.position(job)})
                if job.status in (RUNNING, *TERMINAL):  # terminal: the steps not sent yet, then "done"
                    steps = state.worker.steps_since(job_id, cursor)
                    p = state.worker.progress(job_id)
                    for n, (batch_index, step, total) in enumerate(steps):
                        data = {"status": RUNNING, "batch_index": batch_index, "batch_count": p["batch_count"],
                                "step": step, "total": total}
                        if n == len(steps) - 1 and p["job_id"] == job_id:
                            data.update(fraction=p["fraction"], eta=p["eta"])
                            if p["loss"] is not None:  # a 3D job's
                                data["loss"] = p["loss"]
                            if p["preview_png"] is not None and p["preview_step"] != last_preview:
                                last_preview = p["preview_step"]
                                data["preview"] = base64.b64encode(p["preview_png"]).decode()
                        yield _sse("progress", data)
                    cursor += len(steps)
                last_status = job.status
                if job.status in TERMINAL:
                    yield _sse("done", _job_view(state, job))
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @r.get("/jobs/{job_id}/preview", summary="The running job's latest preview (PNG); 204 when none")
    def preview(job_id: str = JOB_ID):
        get_job(job_id)
        p = state.worker.progress(job_id)
        if p["job_id"] != job_id or p["preview_png"] is None:
            return Response(status_code=204)
        return Response(p["preview_png"], media_type="image/png")

    @r.get("/history", summary="Jobs, newest first; q searches the prompt")
    def history(q: str = Query("", max_length=1000), status: Optional[str] = Query(None),
                limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10_000_000)) -> dict:
        if status is not None and status not in STATUSES:
            raise InvalidRequest("status", f"must be one of {', '.join(STATUSES)}, got {status!r}")
        jobs = state.store.history(query=q, status=status, limit=limit, offset=offset)
        return {"jobs": [_job_view(state, j) for j in jobs], "limit": limit, "offset": offset}

    @r.get("/health")
    def health() -> dict:
        return {"status": "ok", "worker": state.worker.alive, "queued": state.store.count(QUEUED),
                "running": state.store.count(RUNNING)}

    return r


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


# ---------------------------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------------------------
_UNION_TAGS = ("bool", "int", "float", "str")  # pydantic names the member of a union (``x.bool``)


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    """FastAPI's error list -> (field, one line), the first problem, our wording."""

    errors = exc.errors()
    if not errors:
        return "request", "invalid request"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", *_UNION_TAGS)]
    field = ".".join(loc) or "request"
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, InvalidRequest):
        prefix = loc[:-1] if loc and loc[-1] == ctx_error.field else loc
        field = ".".join([*prefix, ctx_error.field])
        return field, f"{field}: {str(ctx_error).split(': ', 1)[-1]}"
    msg = err.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
        if loc and loc[0] == "request":
            msg += f"; allowed fields: {', '.join(GenerationRequest.model_fields)}"
    elif err.get("type") == "json_invalid":
        msg = f"not valid JSON ({(err.get('ctx') or {}).get('error', 'parse error')})"
        field = "body"
    elif err.get("type") == "missing":
        msg = "required"
    return field, f"{field}: {msg}"


def create_app(settings: Settings, server: ServerSettings | None = None, *, studio=None,
               preview_interval: float = 0.25) -> FastAPI:
    """The whole server as one ASGI app. The worker starts (and interrupted jobs are recovered)
    in the app's lifespan, i.e. when uvicorn or a TestClient starts it.

    Args:
        settings: paths (models, outputs, database) and device policy.
        server: listening, auth and limits; default ``ServerSettings()``.
        studio: an existing Studio (tests share one); default a new ``Studio(settings)``.
    """
    force_offline()  # also when an ASGI host calls the factory directly (Gradio reads it at mount)
    server = server or ServerSettings()
    creds = server.credentials()
    if not server.is_local and creds is None:
        raise InvalidRequest("listen", "listening on other interfaces needs --api-auth user:password")
    studio = studio or Studio(settings)
    studio.registry.names_only = True  # the server names models, never paths (danqing.models.names)
    store = JobStore(settings.db_url or settings.db_path)
    worker = BatchingWorker(store, studio, settings.outputs_dir, preview_interval=preview_interval,
                            batching=BatchSettings(server.batch_max, server.batch_wait_s),
                            pictures=place.pictures_root(settings))  # a folder or an fsspec URL
    state = ServerState(settings=settings, server=server, store=store, worker=worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.recovered = store.recover()
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="danqing", version="0.1.0", lifespan=lifespan,
                  description="丹青 danqing studio server: A1111-compatible API, async job API, web UI (docs/api.md)")
    app.state.danqing = state

    add_error_handlers(app)
    guard = [Depends(guard_body)]
    app.include_router(build_router(state), dependencies=guard, responses=ERROR_RESPONSES)
    app.include_router(job_router(state), dependencies=guard, responses=ERROR_RESPONSES)
    app.include_router(video_router(state), dependencies=guard, responses=ERROR_RESPONSES)
    app.include_router(threed_router(state), dependencies=guard, responses=ERROR_RESPONSES)
    app.include_router(talk_router(state), dependencies=guard, responses=ERROR_RESPONSES)
    app.include_router(comic_router(state), dependencies=guard, responses=ERROR_RESPONSES)
    app.include_router(portrait_router(state), dependencies=guard, responses=ERROR_RESPONSES)
    train_routes, state.train = train_router(state)
    app.include_router(train_routes, dependencies=guard, responses=ERROR_RESPONSES)
    add_api_fallback(app)

    add_cors(app, server)
    if server.ui:
        app = mount_ui(app, state)
    add_guards(app, server)
    return app


def add_cors(app: FastAPI, server: ServerSettings) -> None:
    """CORS for ``server.cors_origins`` (credentials allowed when a login is set).

    Always added, even with no origins (then no CORS headers at all): Gradio adds its own
    localhost-reflecting CORS unless the parent app configures CORSMiddleware. Used by
    ``create_app`` and the Ray Serve ingress (``danqing.scale.serving``).
    """
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=list(server.cors_origins), allow_methods=["*"],
                       allow_headers=["*"], allow_credentials=bool(server.credentials()))


def add_guards(app: FastAPI, server: ServerSettings) -> None:
    """The outer middleware, added last so that it runs first: the body size limit, HTTP Basic
    login (when ``server`` has credentials) and, outermost, the Host/Origin check (a foreign
    Host or Origin is refused before credentials or the body are read). Used by ``create_app``
    and the Ray Serve ingress, so both refuse the same requests the same way."""
    creds = server.credentials()
    app.add_middleware(BodyLimitMiddleware, limit=server.max_body_bytes)
    if creds is not None:
        app.add_middleware(BasicAuthMiddleware, user=creds[0], password=creds[1])
    app.add_middleware(HostOriginMiddleware, host_names=server.host_names(), cors_origins=server.cors_origins)


def add_api_fallback(app: FastAPI) -> None:
    """Unknown paths and wrong methods under the API prefixes (``/sdapi``, ``/api``) answer 404 /
    405 in the server's JSON error shape, also when the web UI is mounted at ``/`` (which would
    otherwise take every path). Call it after the API routes are included (it reads the app's
    OpenAPI schema to name the allowed methods). Used by ``create_app`` and the Ray Serve
    ingress."""
    from starlette.routing import compile_path

    @functools.lru_cache(maxsize=1)
    def operations() -> list[tuple[Any, set[str]]]:  # (path regex, methods) of the schema's operations
        return [(compile_path(path)[0], {m.upper() for m in ops}) for path, ops in app.openapi()["paths"].items()]

    async def fallback(request: Request, rest: str):
        path = request.scope["path"]
        allowed = sorted({m for regex, methods in operations() if regex.match(path) for m in methods})
        if allowed:
            raise HTTPException(405, headers={"Allow": ", ".join(allowed)})
        raise HTTPException(404)

    for prefix in ("/sdapi", "/api"):
        app.add_api_route(prefix + "/{rest:path}", fallback, include_in_schema=False,
                          methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])


def _body_error(exc: HTTPException) -> tuple[str, str]:
    """FastAPI's "There was an error parsing the body" (400) -> (error, detail) naming why."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return "UndecodableBody", f"body: not UTF-8 text ({cause.reason} at byte {cause.start}); send JSON in UTF-8"
    if isinstance(cause, RecursionError):
        return "UndecodableBody", "body: JSON nested too deeply to read; flatten it"
    return "UndecodableBody", f"body: cannot be read ({type(cause).__name__ if cause else exc.detail})"


def add_error_handlers(app: FastAPI) -> None:
    """One JSON shape for every error (``ErrorBody``): ours, FastAPI's and Starlette's.

    ``InvalidRequest``, body validation and ``ModelError`` answer 422, other ``DanqingError`` 400,
    ``JobFailed`` its own status, HTTP errors their status with a reason naming what was wrong,
    anything unexpected a one-line 500. Used by ``create_app`` and the Ray Serve ingress."""

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest):
        return JSONResponse(error_body(type(exc).__name__, str(exc), exc.field), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        field, msg = _validation_message(exc)
        return JSONResponse(error_body("InvalidRequest", msg, field), status_code=422)

    @app.exception_handler(ModelError)
    async def _model(request: Request, exc: ModelError):
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=422)

    @app.exception_handler(DanqingError)
    async def _danqing(request: Request, exc: DanqingError):
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=400)

    @app.exception_handler(JobFailed)
    async def _job(request: Request, exc: JobFailed):
        return JSONResponse(error_body("JobFailed", exc.detail, job_id=exc.job_id), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        status, headers = exc.status_code, dict(exc.headers or {})
        if status == 400 and exc.detail == "There was an error parsing the body":
            error, detail = _body_error(exc)
            return JSONResponse(error_body(error, detail, "body"), status_code=400)
        if status == 413:
            return JSONResponse(error_body("RequestTooLarge", str(exc.detail), "body"), status_code=413)
        if status == 405:
            allow = next((v for k, v in headers.items() if k.lower() == "allow"), "")
            detail = f"method {request.method} is not allowed on {request.url.path}; allowed: {allow}"
        elif status == 404:
            detail = f"no route {request.url.path}" if exc.detail == "Not Found" else str(exc.detail)
        else:
            detail = str(exc.detail)
        return JSONResponse(error_body(type(exc).__name__ if status >= 500 else _REASONS.get(status, "HTTPError"),
                                       detail), status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # last resort: still JSON, still one line
        return JSONResponse(error_body("InternalError", f"internal error: {type(exc).__name__}; the server log "
                                                        "has the details"), status_code=500)


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
            409: "Conflict", 413: "RequestTooLarge", 415: "UnsupportedMediaType", 422: "InvalidRequest"}
