"""Benchmark: batched serving, 8 concurrent clients x 10 requests against the server on the tiny
bundled model, batching off (each request alone) and on (``danqing serve --batch 8``), in the
same run, alternating.

Each client posts its requests one after another to the A1111 route ``/sdapi/v1/txt2img`` (its
own prompt, seeds 1000*c + i); the same requests run in every round, so the pictures of the
batched rounds are compared with those of the unbatched ones (max pixel difference). Not a
test: numbers go to docs/benchmarks.md with the machine.

    .venv/bin/python bench/serve_batch.py [--clients 8] [--requests 10] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

from clients import Round, free_port


def _serve(studio, home: Path, batch_max: int, wait_ms: float):
    """uvicorn with danqing's app in a thread of this process; returns (url, server, thread)."""
    import uvicorn

    from danqing.server.app import create_app
    from danqing.settings import ServerSettings, Settings

    settings = Settings(home=home, models_dir=studio.settings.models_dir, device="cpu", dtype="fp32")
    app = create_app(settings, ServerSettings(ui=False, batch_max=batch_max, batch_wait_s=wait_ms / 1000),
                     studio=studio, preview_interval=1.0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


def _post(url: str, body: dict):
    """One A1111 txt2img POST per (client, request): its own prompt, seed 1000*c + i."""
    import httpx
    import numpy as np
    from PIL import Image

    local = threading.local()

    def post(c: int, i: int):
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=600)
        r = local.http.post("/sdapi/v1/txt2img", json={**body, "prompt": f"client {c}: a red circle left of a blue star",
                                                       "seed": 1000 * c + i})
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code} {r.text[:200]}")
        png = base64.b64decode(r.json()["images"][0])
        return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16), {}

    return post


def main() -> None:
    from danqing.settings import force_offline

    force_offline()
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="off/on pairs, alternating")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="danqing-tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--wait-ms", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()

    import torch

    from danqing import GenerationRequest, Settings, Studio

    if args.threads:
        torch.set_num_threads(args.threads)
    studio = Studio(Settings(home=tempfile.mkdtemp(), device="cpu", dtype="fp32"))
    body = {"steps": args.steps, "width": args.size, "height": args.size, "sampler_name": "DPM++ 2M",
            "cfg_scale": 7, "negative_prompt": "blurry",
            "override_settings": {"sd_model_checkpoint": args.model}}
    studio.generate(GenerationRequest(prompt="warm-up", steps=2, width=args.size, height=args.size, model=args.model))
    sizes: list[int] = []  # requests per joint UNet batch
    joint = studio.generate_joint
    studio.generate_joint = lambda requests, on_steps=None: sizes.append(len(requests)) or joint(requests, on_steps)

    n = args.clients * args.requests
    times: dict[str, list[float]] = {"off": [], "on": []}
    pictures: dict[str, dict] = {}
    for _ in range(args.rounds):
        for mode, batch in (("off", 1), ("on", args.batch)):
            url, server, thread = _serve(studio, Path(tempfile.mkdtemp()), batch, args.wait_ms)
            try:
                round_ = Round(args.clients, args.requests).run(_post(url, body))
                round_.raise_errors()
                seconds, pictures[mode] = round_.seconds, round_.pictures
            finally:
                server.should_exit = True
                thread.join(30)
            times[mode].append(seconds)
            print(f"  batching {mode:3s}: {seconds:6.2f} s for {n} requests ({n / seconds:.2f} images/s)", flush=True)
    diff = max(int(abs(pictures["on"][k] - pictures["off"][k]).max()) for k in pictures["off"])
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: {args.model}, {args.size}x{args.size}, {args.steps} steps, DPM++ 2M, CFG 7; "
          f"{args.clients} clients x {args.requests} requests, batch {args.batch}, wait {args.wait_ms:g} ms")
    print(f"one at a time : {off:.2f} s ({n / off:.2f} images/s, median of {args.rounds})")
    print(f"batched       : {on:.2f} s ({n / on:.2f} images/s)")
    print(f"throughput ratio batched / one at a time: {off / on:.2f}")
    print(f"requests per batch (batched rounds): mean {statistics.mean(sizes or [1]):.2f}, "
          f"{sum(sizes)} of {n * args.rounds} requests joined")
    print(f"max pixel difference batched vs alone (0-255): {diff}")


if __name__ == "__main__":
    main()
