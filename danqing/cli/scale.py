"""``danqing ray-serve`` (the A1111 generate routes and the job API over Ray Serve replicas) and ``danqing batch``
(a file of requests into a folder, over Ray Data actors with ``--ray``); docs/scale.md."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import app, check_device
from danqing.errors import InvalidRequest
from danqing.settings import ServerSettings, limits_from

RAY_INSTALL = "pip install -e '.[ray]'"


def _need_ray() -> None:
    try:
        import ray  # noqa: F401 -- lazy: Ray is an optional dependency
    except ImportError:
        raise InvalidRequest("ray", f"Ray is not installed; install it with {RAY_INSTALL}") from None


@app.command("ray-serve")
def ray_serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, help="Interface to bind [default: 127.0.0.1; with --listen 0.0.0.0]."),
    port: int = typer.Option(7860, help="Port [default: 7860]."),
    listen: bool = typer.Option(False, "--listen", help="Listen on all interfaces (needs --api-auth)."),
    api_auth: Optional[str] = typer.Option(None, "--api-auth", envvar="DANQING_API_AUTH",
                                           help="user:password for HTTP Basic on the API [default: none: no login]."),
    replicas: int = typer.Option(1, min=1, max=1024, help="Studio replicas, one request at a time each [default: 1]."),
    max_replicas: Optional[int] = typer.Option(None, min=1, max=1024, help="Autoscale between --replicas and this many replicas with the load [default: none: a fixed --replicas]."),
    threads: int = typer.Option(1, min=0, max=256, help="torch CPU threads per replica (0 = torch's choice) [default: 1]."),
    replica_cpus: float = typer.Option(1.0, min=0, help="CPUs Ray reserves for each replica [default: 1.0]."),
    replica_gpus: float = typer.Option(0.0, min=0, help="GPUs Ray reserves for each replica (1 = a GPU of its own) [default: 0.0]."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (auto, or ray://HOST:10001) [default: none: start a local Ray]."),
    db: Optional[Path] = typer.Option(None, help="SQLite database of the jobs, history and server options [default: HOME/danqing.sqlite3]."),
    db_url: Optional[str] = typer.Option(None, "--db-url", envvar="DANQING_DB_URL",
                                         help="postgresql://user:password@host/dbname: the jobs and options shared with other servers [default: none: the SQLite file of --db]."),
    limit: list[str] = typer.Option([], "--limit", help="NAME=N: a request limit (max_pixels, max_prompt_chars, ...; docs/security.md); repeatable [default: none]."),
):
    """Serve the A1111 generate routes (/sdapi/v1/txt2img, /img2img) and the job API (/api/v1/jobs)
    over Ray Serve: N Studio replicas behind one ingress that checks requests as `danqing serve` does."""
    _need_ray()
    from danqing.scale.serving import RayServeOptions, start

    if host is None:
        host = "0.0.0.0" if listen else "127.0.0.1"
    server = ServerSettings(host=host, port=port, api_auth=api_auth, ui=False, **limits_from(limit))
    if not server.is_local and not api_auth:
        raise InvalidRequest("listen", f"refusing to listen on {host} without --api-auth user:password")
    settings = ctx.obj if db is None else ctx.obj.with_(db_path=db)
    if db_url:
        settings = settings.with_(db_url=db_url)
    check_device(settings.device)
    options = RayServeOptions(replicas=replicas, max_replicas=max_replicas, threads=threads or None,
                              replica_cpus=replica_cpus, replica_gpus=replica_gpus)
    start(settings, server, options, address=address)
    typer.echo(f"danqing on Ray Serve: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/sdapi/v1 "
               f"({replicas} replica(s)); Ctrl-C stops it", err=True)
    try:
        while True:
            time.sleep(1)
    finally:
        from ray import serve

        serve.shutdown()


@app.command()
def batch(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Requests: a .jsonl file (one JSON object of request fields per line) or a prompts file (one prompt per line, or A1111's --prompt \"...\" --steps 20 lines)."),
    out: Path = typer.Option(..., "--out", help="Folder of the pictures (NNNNN.png) and their NNNNN.json; a rerun skips what is done."),
    use_ray: bool = typer.Option(False, "--ray", help="Run over Ray Data actors (--workers of them) instead of in this process."),
    workers: int = typer.Option(2, min=1, max=1024, help="With --ray: actors, one Studio each [default: 2]."),
    threads: int = typer.Option(1, min=0, max=256, help="torch CPU threads per actor (0 = torch's choice) [default: 1]."),
    worker_cpus: float = typer.Option(1.0, min=0, help="With --ray: CPUs Ray reserves for each actor [default: 1.0]."),
    worker_gpus: float = typer.Option(0.0, min=0, help="With --ray: GPUs Ray reserves for each actor [default: 0.0]."),
    address: Optional[str] = typer.Option(None, help="With --ray: Ray cluster to join (auto, or ray://HOST:10001) [default: none: start a local Ray]."),
    negative: str = typer.Option("", "--negative", "-n", help="Negative prompt of prompts-file lines [default: none]."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps of requests that give none [default: 20]."),
    seed: Optional[int] = typer.Option(None, help="Seed of requests that give none; -1 = random [default: -1]."),
    width: Optional[int] = typer.Option(None, help="Width of requests that give none [default: 512]."),
    height: Optional[int] = typer.Option(None, help="Height of requests that give none [default: 512]."),
    model: Optional[str] = typer.Option(None, help="Checkpoint of requests that name none [default: settings' default model]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Generate every request of a file into one folder, resumably: a rerun skips the requests
    whose NNNNN.json is written and runs the rest."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from danqing.request import GenerationRequest
    from danqing.scale.batch import pending, read_requests, run_local, run_ray

    if use_ray:
        _need_ray()
    check_device(ctx.obj.device)
    base = {"prompt": "", "negative_prompt": negative, "steps": steps, "seed": seed, "width": width,
            "height": height, "model": model}
    items = read_requests(file, GenerationRequest.create(**{k: v for k, v in base.items() if v is not None}),
                          ctx.obj.default_model)
    todo = len(pending(items, out))
    console = Console(stderr=True)
    console.print(f"{len(items)} request(s), {len(items) - todo} already done in {out}")
    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task("requests", total=todo)

        def done(meta: dict) -> None:
            progress.advance(task)
            print(f"{Path(out) / meta['files'][0]}  seed={meta['seeds'][0]}")

        if use_ray:
            ran = run_ray(ctx.obj, items, out, workers=workers, threads=threads or None, worker_cpus=worker_cpus,
                          worker_gpus=worker_gpus, on_done=done, address=address)
        else:
            ran = run_local(ctx.obj, items, out, threads=threads or None, on_done=done)
    console.print(f"{ran} request(s) in {time.perf_counter() - started:.1f}s")
