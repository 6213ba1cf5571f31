"""What the web UI may read and serve.

Gradio mounted in FastAPI (``gr.mount_gradio_app``) is never "launched", and Gradio checks the
files a client names only in launched apps: a ``FileData`` whose ``path`` is any file of the
server would be copied into Gradio's cache and handed to our functions. So the server checks
itself, before Gradio sees the request: every file object in a JSON body sent to the UI's API
(``/gradio_api/...``) must name a file Gradio stored from an upload (its upload cache) or one of
danqing's outputs. Anything else -- another path, a URL, a symlink leading out -- is refused with
one message that does not depend on whether the file exists. The files Gradio serves
(``/gradio_api/file=``) are limited the same way by its ``allowed_paths``/``blocked_paths``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from danqing.models.names import inside

REFUSED = ("files reach the web UI only as uploads (POST /gradio_api/upload) or as pictures danqing made "
           "(its outputs folder); this file object names neither")
MAX_DEPTH = 64  # nesting of the JSON walked for file objects (Gradio's payloads are a few levels deep)


def upload_folder() -> Path:
    """Gradio's upload cache (``GRADIO_TEMP_DIR``, default ``<tmp>/gradio``), as Gradio finds it."""
    from gradio.utils import get_upload_folder  # gradio: optional, imported with the UI only

    return Path(get_upload_folder())


def file_paths(data, depth: int = 0):
    """Every ``path`` of a file object (a dict with a string ``path``, Gradio's ``FileData``) in
    decoded JSON; a value nested deeper than ``MAX_DEPTH`` yields None (refused)."""
    if depth > MAX_DEPTH:
        yield None
        return
    if isinstance(data, dict):
        if "path" in data:
            yield data["path"] if isinstance(data["path"], str) else None
        for v in data.values():
            yield from file_paths(v, depth + 1)
    elif isinstance(data, list):
        for v in data:
            yield from file_paths(v, depth + 1)


def allowed_file(path: str | None, roots: list[Path]) -> bool:
    """``path`` is a local file inside one of ``roots`` (symlinks followed). Existence is not
    asked here, so the answer is the same for a file that exists and one that does not."""
    if not path or "\0" in path or "://" in path or not os.path.isabs(path):
        return False
    return any(inside(Path(path), root) for root in roots)


class UIFileGuard:
    """ASGI middleware: refuses (422) a JSON body under ``prefix`` that carries a file object
    outside the upload cache and ``outputs_dir``; other requests pass untouched.

    Args:
        app: the ASGI app (the server with Gradio mounted).
        outputs_dir: danqing's outputs folder.
        prefix: where Gradio's API lives.
    """

    def __init__(self, app, outputs_dir: Path, prefix: str = "/gradio_api/"):
        self.app = app
        self.outputs_dir = Path(outputs_dir)
        self.prefix = prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").startswith(self.prefix):
            return await self.app(scope, receive, send)
        content_type = dict(scope.get("headers", ())).get(b"content-type", b"").decode("latin-1").lower()
        if content_type.startswith("multipart/"):  # uploads: Gradio stores them in its cache itself
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body) if body.strip() else None
        except (ValueError, RecursionError):
            data = None  # not JSON: Gradio answers it
        roots = [upload_folder(), self.outputs_dir]
        if any(not allowed_file(p, roots) for p in file_paths(data)):
            raw = json.dumps({"error": "InvalidRequest", "field": "data", "detail": f"data: {REFUSED}"}).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
            return await send({"type": "http.response.body", "body": raw})
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def path_rules(settings) -> dict:
    """``allowed_paths`` / ``blocked_paths`` for ``gr.mount_gradio_app``: danqing's outputs may be
    served; the models folder, the database and Gradio's examples cache never are (blocked wins
    over everything Gradio would otherwise serve)."""
    from gradio.utils import get_cache_folder

    return {"allowed_paths": [str(Path(settings.outputs_dir).resolve())],
            "blocked_paths": [str(Path(settings.models_dir).resolve()), str(Path(settings.db_path).resolve()),
                              str(Path(get_cache_folder()).resolve())]}
