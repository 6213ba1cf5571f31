"""``danqing serve``: the A1111-compatible API, the job API and the web UI."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import announce_device, app, check_device
from danqing.errors import InvalidRequest
from danqing.models.fastpath import FAST_HELP, fast_path_from
from danqing.settings import ServerSettings, limits_from


@app.command()
def serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, help="Interface to bind [default: 127.0.0.1; with --listen 0.0.0.0]."),
    port: int = typer.Option(7860, help="Port."),
    listen: bool = typer.Option(False, "--listen", help="Listen on all interfaces (needs --api-auth)."),
    api_auth: Optional[str] = typer.Option(None, "--api-auth", envvar="DANQING_API_AUTH",
                                           help="user:password for HTTP Basic on the API and the UI [default: none: no login]."),
    cors: list[str] = typer.Option([], "--cors-allow-origin", help="Allow this origin (CORS); repeatable [default: none]."),
    db: Optional[Path] = typer.Option(None, help="SQLite database of jobs and history [default: HOME/danqing.sqlite3]."),
    db_url: Optional[str] = typer.Option(None, "--db-url", envvar="DANQING_DB_URL",
                                         help="postgresql://user:password@host/dbname: a job store shared by several servers "
                                              "[default: none: the SQLite file of --db]."),
    no_ui: bool = typer.Option(False, "--no-ui", help="API only, no web UI."),
    max_upload_mb: Optional[float] = typer.Option(None, help="Largest uploaded picture in MiB [default: 16]."),
    max_upload_megapixels: Optional[float] = typer.Option(None, help="Largest uploaded picture in megapixels [default: 16.78 = 4096x4096]."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="Also accept this name in the Host header (besides localhost and --host); repeatable [default: none]."),
    batch: int = typer.Option(1, "--batch", min=1, max=64, help="Batched serving: run up to N images of compatible queued requests as one UNet batch (1 = off; docs/api.md) [default: 1]."),
    batch_wait_ms: float = typer.Option(50.0, "--batch-wait-ms", min=0, max=10_000, help="Longest wait for compatible requests to join a batch, in ms [default: 50]."),
    fast: list[str] = typer.Option([], "--fast", help=FAST_HELP + "."),
    medvram: bool = typer.Option(False, "--medvram", help="CUDA: move each model to the GPU only while it runs (model CPU offload) [default: off]."),
    lowvram: bool = typer.Option(False, "--lowvram", help="CUDA: stream each layer to the GPU when it runs (sequential CPU offload; slowest, least memory) [default: off]."),
    limit: list[str] = typer.Option([], "--limit", help="NAME=N: a request limit (max_pixels, max_prompt_chars, ...; docs/security.md); repeatable. Also DANQING_<NAME> [default: none]."),
):
    """Serve the A1111-compatible API (/sdapi/v1), the job API (/api/v1) and the web UI (/)."""
    import uvicorn  # lazy: the server's dependencies (FastAPI, Gradio, torch) load only to serve

    from danqing.server.app import create_app

    if host is None:
        host = "0.0.0.0" if listen else "127.0.0.1"
    limits = {}
    if max_upload_mb is not None:
        limits["max_upload_bytes"] = int(max_upload_mb * 1024 * 1024)
    if max_upload_megapixels is not None:
        limits["max_upload_pixels"] = int(max_upload_megapixels * 1e6)
    limits.update(limits_from(limit))
    server = ServerSettings(host=host, port=port, api_auth=api_auth, cors_origins=tuple(cors), ui=not no_ui,
                            allowed_hosts=tuple(allowed_host), batch_max=batch, batch_wait_s=batch_wait_ms / 1000,
                            **limits)
    if not server.is_local and not api_auth:
        raise InvalidRequest("listen", f"refusing to listen on {host} without --api-auth user:password")
    settings = ctx.obj if db is None else ctx.obj.with_(db_path=db)
    settings = settings.with_(fast=fast_path_from(fast, medvram=medvram, lowvram=lowvram))
    if db_url:
        settings = settings.with_(db_url=db_url)
    check_device(settings.device)
    application = create_app(settings, server)
    announce_device(application.state.danqing.worker.studio)
    typer.echo(f"danqing serving on http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/ "
               f"(API: /sdapi/v1, /api/v1; docs: /docs)", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
