"""What stands between the network and the library: HTTP Basic auth, request-size limits,
bounded image uploads and model names that cannot leave their folder.

Every refusal is a typed ``InvalidRequest`` (-> 422 with the field and what is allowed) or a
plain 401/413 JSON answer.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import secrets
from dataclasses import dataclass

from danqing.errors import InvalidRequest

# Names a client may use for a model: letters, digits and a few separators, optionally in
# sub-folders, never absolute, never "..", optionally an A1111 title "name [hash]".
_NAME = re.compile(r"^[\w][\w .+\-()/]*( \[[0-9a-fA-F]{8,64}\])?$")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


# ---------------------------------------------------------------------------------------------
# ASGI middleware
# ---------------------------------------------------------------------------------------------
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
            await _send_json(send, 401, {"detail": "authentication required (HTTP Basic, --api-auth)"},
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
                    return await _send_json(send, 413, {"detail": f"request body: {size} bytes is more than the "
                                                                  f"limit of {self.limit} bytes"})
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, {"detail": f"request body: more than the limit of {self.limit} bytes"})


class _TooLarge(Exception):
    pass


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


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def check_name(name: str, field: str) -> str:
    """A model / file name as a client may give it: no absolute path, no '..', no odd bytes."""
    if not isinstance(name, str) or not name or len(name) > 255:
        raise InvalidRequest(field, "must be a model name of 1-255 characters")
    parts = name.split(" [")[0].split("/")
    if not _NAME.match(name) or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise InvalidRequest(field, f"{name!r} is not a model name (names are relative to the models folder: "
                                    "letters, digits, ' ._-+()', sub-folders with '/', no '..')")
    return name


def resolve_model(registry, kind: str, name: str, field: str) -> str:
    """A client's model name (name, file name, A1111 title "name [hash]" or short hash) -> the
    registry's name of a model that exists in its folder. Never a path outside the folder."""
    check_name(name, field)
    title = name.rsplit(" [", 1)[0] if name.endswith("]") else name
    entries = registry.scan(kind)
    for e in entries:
        if title == e.name or (e.path is not None and title == e.path.name):
            return e.name
    q = name.strip("[] ").lower()
    if len(q) >= 8 and all(c in "0123456789abcdef" for c in q):
        for e in entries:
            if not e.is_builtin and registry.sha256(e).startswith(q):
                return e.name
    available = ", ".join(e.name for e in entries) or "none"
    raise InvalidRequest(field, f"unknown {kind} {name!r}; available: {available}")
