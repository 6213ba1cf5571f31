"""What stands between the network and the library: the Host/Origin check, HTTP Basic auth,
request-size limits, undecodable bodies, bounded image uploads and the work limits of a request
(docs/security.md). Model names are resolved inside their folder by ``danqing.models.names``.

Every refusal is a typed ``InvalidRequest`` (-> 422 with the field and what is allowed) or a
JSON answer of the same shape (``error``, ``field``, ``detail``) with its own status.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import Request

from danqing.conditioning.prompt_limits import check_prompt, lone_surrogate
from danqing.errors import InvalidRequest
from danqing.settings import ServerSettings
from danqing.conditioning.prompt_parser import prompt_schedule
from danqing.models.tokenizer import clip_tokenizer

# Names a client may use for a model: letters, digits and a few separators, optionally in
# sub-folders, never absolute, never "..", optionally an A1111 title "name [hash]".
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


# ---------------------------------------------------------------------------------------------
# The error answer
# ---------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every error answer (4xx, and the 5xx that should never happen): what failed, the request
    field it is about (a JSON path such as ``request.steps``; null when none), one line saying
    what was wrong and what is allowed; ``job_id`` for an answer about a job."""

    error: str
    field: Optional[str] = None
    detail: str
    job_id: Optional[str] = None


def _err(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


# What every API route may answer besides its success (docs/api.md, docs/security.md); in the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict] = {
    400: _err("Undecodable body (not UTF-8, JSON nested too deeply) or a Host that is not this server's"),
    401: _err("Missing or wrong credentials (servers started with --api-auth)"),
    403: _err("A state-changing request from a foreign Origin"),
    404: _err("No such route, job or image"),
    405: _err("Method not allowed on this route"),
    413: _err("Body over the size limit (max_body_bytes), with or without Content-Length"),
    422: _err("A field is invalid or over a limit: `field` names it, `detail` says what is allowed"),
}
# Routes that wait for a job: it may be cancelled (409), time out (504) or fail inside (500).
JOB_RESPONSES: dict[int | str, dict] = {
    409: _err("The job was cancelled, or is not in a state for this"),
    500: _err("The job failed with an internal error"),
    504: _err("The job is still waiting or running"),
}


# ---------------------------------------------------------------------------------------------
# ASGI middleware
# ---------------------------------------------------------------------------------------------
def error_body(error: str, detail: str, field: str | None = None, **extra: Any) -> dict:
    """The one shape of every error answer: ``{"error", "field", "detail"}`` (docs/api.md)."""
    return {"error": error, "field": field, "detail": detail, **extra}


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": raw})


class BasicAuthMiddleware:
    """HTTP Basic on every HTTP and websocket request (API and UI alike)."""

    def __init__(self, app, user: str, password: str):
        self.app = app
        self._expected = base64.b64encode(f"{user}:{password}".encode()).decode()

    def _ok(self, scope) -> bool:
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, value = v.decode("latin-1").partition(" ")
                return scheme.lower() == "basic" and secrets.compare_digest(value.strip(), self._expected)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not self._ok(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _send_json(send, 401, error_body("Unauthorized", "authentication required (HTTP Basic, --api-auth)"),
                             [(b"www-authenticate", b'Basic realm="danqing"')])
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413, by Content-Length or while reading."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    size = int(v)
                except ValueError:
                    size = self.limit + 1
                if size > self.limit:
                    return await _send_json(send, 413, error_body(
                        "RequestTooLarge", f"body: {size} bytes is more than the limit of {self.limit} bytes "
                                           "(max_body_bytes)", "body"))
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise TooLarge(self.limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except TooLarge as exc:  # raised where no exception handler turned it into the answer
            if not started:
                await _send_json(send, 413, error_body("RequestTooLarge", exc.detail, "body"))


class TooLarge(HTTPException):
    """A body (chunked, without Content-Length) that grew past the limit while being read. An
    HTTPException, so that FastAPI's body reader passes it on (as 413) instead of a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"body: more than the limit of {limit} bytes (max_body_bytes)")


LOCAL_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # methods that change nothing


class HostOriginMiddleware:
    """DNS rebinding and cross-site requests (docs/security.md).

    * ``Host`` must be one of ``host_names`` (the localhost names, the listening host, the
      ``allowed_hosts`` setting), else 400: a page of ``attacker.example`` whose name was
      re-pointed at 127.0.0.1 sends ``Host: attacker.example``.
    * A state-changing request (POST, PUT, DELETE, PATCH, or a websocket) whose ``Origin`` is
      neither this server's own origin nor one of ``cors_origins`` is refused with 403: a foreign page can
      make the browser send such a request (a form, ``fetch`` with ``no-cors``) even though CORS
      keeps it from reading the answer. Requests without ``Origin`` (scripts, curl) pass.
    * TRACE and CONNECT are answered 405 on every path.
    """

    def __init__(self, app, host_names: frozenset[str] | None, cors_origins: tuple[str, ...] = ()):
        self.app = app
        self.host_names = host_names
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get("host", "")
        if self.host_names is not None and host_name(host) not in self.host_names:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            allowed = ", ".join(sorted(self.host_names))
            return await _send_json(send, 400, error_body(
                "BadHost", f"Host: {host!r} is not a name of this server; allowed: {allowed} "
                           "(add names with --allowed-host)", "host"))
        method = scope.get("method", "GET")
        if method in ("TRACE", "CONNECT"):
            return await _send_json(send, 405, error_body("MethodNotAllowed", f"method {method} is not allowed"),
                                    [(b"allow", b"GET, HEAD, POST")])
        origin = headers.get("origin")
        changes = scope["type"] == "websocket" or method not in LOCAL_METHODS  # a websocket can do anything
        if origin is not None and changes and not self._same_origin(origin, host, scope.get("scheme", "http")):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _send_json(send, 403, error_body(
                "ForeignOrigin", f"Origin: {origin!r} may not change this server's state (POST/PUT/DELETE); "
                                 "allow it with --cors-allow-origin", "origin"))
        await self.app(scope, receive, send)

    def _same_origin(self, origin: str, host: str, scheme: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.cors_origins:
            return True
        parts = urlsplit(origin)
        own = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
        try:
            o_port = str(parts.port or own.get(parts.scheme, ""))
        except ValueError:
            return False
        h_name, _, h_port = host.lower().rpartition(":") if not host.endswith("]") else (host.lower(), "", "")
        if not h_name or not h_port.isdigit():
            h_name, h_port = host.lower(), own.get(scheme, "")
        return (parts.scheme in ("http", "https") and (parts.hostname or "") == h_name.strip("[]")
                and o_port == h_port)


def host_name(host: str) -> str:
    """``Host`` header -> the name alone, lower case: ``localhost:7860`` -> ``localhost``,
    ``[::1]:7860`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


# ---------------------------------------------------------------------------------------------
# Request bodies and work limits
# ---------------------------------------------------------------------------------------------
PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt", "p2p_source")


def check_json_text(data: Any) -> None:
    """Refuse a parsed JSON body holding a string that is not valid Unicode (a lone surrogate
    ``"\\ud800"``): it could be neither stored, nor rendered, nor echoed in an answer. Walks the
    body without recursion; raises InvalidRequest naming the field's JSON path."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            bad = lone_surrogate(value)
            if bad >= 0:
                raise InvalidRequest(path or "body", f"character {bad} is a lone UTF-16 surrogate "
                                                     f"(U+{ord(value[bad]):04X}); text must be valid Unicode")
        elif isinstance(value, dict):
            for key, v in value.items():
                if lone_surrogate(key) >= 0:
                    raise InvalidRequest(path or "body", "a key holds a lone UTF-16 surrogate; text must be valid Unicode")
                stack.append((f"{path}.{key}" if path else key, v))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))


def check_body_prompts(data: Any, limits: ServerSettings) -> None:
    """The prompt fields of a raw JSON body (A1111 at the top, the job API under ``request``),
    checked for length and nesting before any model validation parses them."""
    if not isinstance(data, dict):
        return
    for prefix, fields in (("", data), ("request.", data.get("request"))):
        if isinstance(fields, dict):
            for name in PROMPT_FIELDS:
                if isinstance(fields.get(name), str):
                    check_prompt(fields[name], prefix + name, max_chars=limits.max_prompt_chars,
                                 max_depth=limits.max_prompt_depth)


async def guard_body(request: Request) -> None:
    """FastAPI dependency of every API route: runs after the body is parsed and before it is
    validated (FastAPI solves dependencies first), so that text no model can hold and prompts
    over the limits are refused before a model validator parses them."""
    if request.method in LOCAL_METHODS or "json" not in request.headers.get("content-type", ""):
        return
    try:
        data = await request.json()  # already parsed by FastAPI: cached on the request
    except Exception:  # noqa: BLE001 -- FastAPI has answered this body already
        return
    check_json_text(data)
    check_body_prompts(data, request.app.state.danqing.server)


_TOKENIZER_LOCK = threading.Lock()  # a Rust-backed tokenizer must not be called from two threads at once


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return clip_tokenizer()


def prompt_chunks(text: str, steps: int) -> int:
    """How many 77-token chunks (75 tokens each, as the text encoder packs them) the longest
    text of the prompt's schedule takes, with the bundled CLIP tokenizer (textual-inversion
    names count as their words)."""
    from danqing.conditioning.text import tokenize_prompt  # imports torch: only when counting

    longest = max((t for _, t in prompt_schedule(text, steps)), key=len, default="")
    with _TOKENIZER_LOCK:
        return len(tokenize_prompt(_tokenizer(), longest))


def check_work(request, limits: ServerSettings):
    """Refuse a GenerationRequest that asks for more work than the server's limits allow:
    prompts (characters, nesting, 77-token chunks), steps, pictures per request, final size.

    Args:
        request: a validated GenerationRequest.
        limits: the server settings holding the ``max_*`` limits.

    Returns:
        ``request`` unchanged. Raises InvalidRequest naming the field and the limit.
    """
    for name in ("steps", "hr_second_pass_steps"):
        n = getattr(request, name)
        if n > limits.max_steps and (name == "steps" or request.enable_hr):
            raise InvalidRequest(name, f"{n} steps is more than the limit of {limits.max_steps} (max_steps)")
    n = request.batch_size * request.batch_count
    if n > limits.max_batch_images:
        raise InvalidRequest("batch_size", f"batch_size x batch_count = {n} pictures is more than the limit of "
                                           f"{limits.max_batch_images} (max_batch_images)")
    w, h = request.hr_size if request.enable_hr else (request.width, request.height)
    if w * h > limits.max_pixels:
        field = ("hr_resize_x" if request.hr_resize_x or request.hr_resize_y else "hr_scale") if request.enable_hr else "width"
        raise InvalidRequest(field, f"the final picture of {w}x{h} = {w * h} pixels is more than the limit of "
                                    f"{limits.max_pixels} (max_pixels)")
    for name in PROMPT_FIELDS:
        text = getattr(request, name, None)
        if not text:
            continue
        check_prompt(text, name, max_chars=limits.max_prompt_chars, max_depth=limits.max_prompt_depth)
        chunks = prompt_chunks(text, request.steps)
        if chunks > limits.max_prompt_chunks:
            raise InvalidRequest(name, f"{chunks} chunks of 75 tokens is more than the limit of "
                                       f"{limits.max_prompt_chunks} (max_prompt_chunks)")
    return request


def check_frames(frames: int, limits: ServerSettings, field: str = "frames") -> int:
    """A video request's frame count against ``max_frames``; raises InvalidRequest naming it."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise InvalidRequest(field, f"must be a whole number of frames >= 1, got {frames!r}")
    if frames > limits.max_frames:
        raise InvalidRequest(field, f"{frames} frames is more than the limit of {limits.max_frames} (max_frames)")
    return frames


def strict_scalars(data: Any, model, prefix: str = "") -> None:
    """JSON scalars as strict as pydantic's strict mode, for a model validated in lax mode (the
    library's GenerationRequest, whose tuples come as JSON lists): a bool field takes only
    true/false, an int field no bool and no float, a float field no bool. Raises InvalidRequest."""
    if not isinstance(data, dict):
        return
    for name, info in model.model_fields.items():
        if name not in data or data[name] is None:
            continue
        value, kinds = data[name], _scalar_kinds(info.annotation)
        if not kinds:
            continue
        ok = (bool in kinds and isinstance(value, bool)) or (
            not isinstance(value, bool) and ((int in kinds and isinstance(value, int))
                                             or (float in kinds and isinstance(value, (int, float)))))
        if not ok and isinstance(value, (bool, int, float)):
            want = " or ".join(k.__name__.replace("bool", "true/false").replace("int", "a whole number")
                               .replace("float", "a number") for k in kinds)
            raise InvalidRequest(prefix + name, f"must be {want}, got {json.dumps(value)}")


def _scalar_kinds(annotation) -> tuple:
    import types
    import typing

    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    kinds = tuple(a for a in args if a in (bool, int, float))
    return kinds if kinds and all(a in (bool, int, float, type(None)) for a in args) else ()


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_pixels: int


def decode_base64(data: str, field: str, limits: UploadLimits) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URL) -> bytes, bounded before decoding."""
    if not isinstance(data, str) or not data:
        raise InvalidRequest(field, "must be a non-empty base64 string (optionally a data: URL)")
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidRequest(field, "a data: URL must be base64 encoded (data:image/png;base64,...)")
    data = "".join(data.split())
    if len(data) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise InvalidRequest(field, f"upload is more than the limit of {limits.max_bytes} bytes")
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "not valid base64") from None
    if len(raw) > limits.max_bytes:
        raise InvalidRequest(field, f"upload of {len(raw)} bytes is more than the limit of {limits.max_bytes} bytes")
    return raw


def open_image(raw: bytes, field: str, limits: UploadLimits):
    """Bytes -> a fully loaded PIL image; the pixel count is checked from the header before any
    pixel is decoded (decompression bombs are refused), and only still-image formats are read."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # over Pillow's own bound: named as ours
        m = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{m.group(1)} pixels" if m else "more pixels than Pillow reads"
        raise InvalidRequest(field, f"{size} is more than the limit of {limits.max_pixels}") from None
    except Exception:  # noqa: BLE001 -- Pillow raises many kinds on junk
        raise InvalidRequest(field, f"not an image Pillow can read as {', '.join(IMAGE_FORMATS)}") from None
    w, h = img.size
    if w * h > limits.max_pixels or w <= 0 or h <= 0:
        raise InvalidRequest(field, f"{w}x{h} is {w * h} pixels, more than the limit of {limits.max_pixels}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001
        raise InvalidRequest(field, f"damaged image ({str(exc) or type(exc).__name__})") from None
    return img


def decode_image(data: str, field: str, limits: UploadLimits):
    return open_image(decode_base64(data, field, limits), field, limits)
