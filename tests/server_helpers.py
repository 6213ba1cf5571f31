"""Helpers of the server tests (tests/test_server_*.py): a live uvicorn server in a thread, one
shared Studio on the bundled tiny model, free ports. Not a test module."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time

from danqing.settings import OFFLINE_ENV

os.environ.update(OFFLINE_ENV)

TINY = {"width": 64, "height": 64}  # danqing-tiny's native size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=1)
def shared_studio():
    """One Studio for every in-process server test (the model loads once per session).
    Its models folder is empty: checkpoints are the bundled danqing-tiny and the built-in one."""
    import tempfile

    from danqing import Settings, Studio

    home = tempfile.mkdtemp(prefix="danqing-server-studio-")
    return Studio(Settings(home=home, device="cpu", dtype="fp32"))


def make_app(home, *, studio=None, **server_kwargs):
    """create_app over a fresh home (database, outputs) sharing the session's Studio."""
    from danqing.server.app import create_app
    from danqing.settings import ServerSettings, Settings

    studio = studio or shared_studio()
    settings = Settings(home=home, models_dir=studio.settings.models_dir, device="cpu", dtype="fp32")
    server_kwargs.setdefault("ui", False)
    server_kwargs.setdefault("allowed_hosts", ("testserver",))  # the Host of Starlette's TestClient
    return create_app(settings, ServerSettings(**server_kwargs), studio=studio, preview_interval=0.0)


class LiveServer:
    """uvicorn in a background thread of this process, on a free port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class FakeStudio:
    """A Studio stand-in that answers instantly (blank 8x8 pictures): for fuzzing the HTTP layer,
    where thousands of valid requests would otherwise each run a real generation."""

    def __init__(self, studio):
        self.settings, self.registry, self.models = studio.settings, studio.registry, studio.models
        self.embeddings, self.upscalers = studio.embeddings, studio.upscalers
        self.calls = 0

    def generate(self, request, on_step=None, *, save=False, out_dir=None, init_image=None, mask_image=None):
        from PIL import Image

        from danqing.outputs.infotext import format_infotext
        from danqing.studio import GenerationResult

        self.calls += 1
        n = request.batch_size * request.batch_count
        seeds = [request.seed + i for i in range(n)]
        texts = [format_infotext(request.prompt, request.negative_prompt, {"Seed": s, "Model": request.model})
                 for s in seeds]
        return GenerationResult([Image.new("RGB", (8, 8)) for _ in seeds], seeds, [request.subseed + i for i in range(n)],
                                texts, request, timings={"total": 0.0})
