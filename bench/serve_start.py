"""Benchmark: how long ``danqing serve`` takes to answer: the API, the web UI, a first image.

Every run is a fresh server process on a free port with a fresh home folder, started as a user
starts it (``python -m danqing.cli --home DIR serve``); the script polls ``/api/v1/health``,
then reads ``/`` and asks ``/sdapi/v1/txt2img`` for a 64x64, 2-step picture of the bundled model.
The baseline measured in the same run is a bare interpreter importing the server's libraries
(torch, FastAPI, uvicorn, Gradio), so the ratio shows what danqing adds on top of them. The
promise (docs/api.md) is an answer within 10 s on the 2-core machine. Not a test: numbers go to
docs/benchmarks.md with the machine (tests/test_server_serve.py checks that the server starts
offline and answers, not how fast).

    .venv/bin/python bench/serve_start.py [--repeats 3] [--budget 10]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

LIBRARIES = "import torch, fastapi, uvicorn, gradio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def floor_s() -> float:
    """Wall seconds of a fresh interpreter importing the server's libraries."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", LIBRARIES], check=True, capture_output=True)
    return time.perf_counter() - t0


def one_start() -> dict[str, float]:
    """Seconds from launch to: health 200 (``api``), ``/`` read (``ui``), first PNG (``image``)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "GRADIO_"))}

    def get(path):
        with urllib.request.urlopen(url + path, timeout=5) as r:
            return r.status, r.read()

    with tempfile.TemporaryDirectory() as home:
        t0 = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "danqing.cli", "--home", home, "serve", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        out = {}
        try:
            while True:
                try:
                    if get("/api/v1/health")[0] == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.perf_counter() - t0 > 120:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.02)
            out["api"] = time.perf_counter() - t0
            status, body = get("/")
            assert status == 200 and b"gradio" in body.lower()
            out["ui"] = time.perf_counter() - t0
            body = json.dumps({"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1}).encode()
            req = urllib.request.Request(url + "/sdapi/v1/txt2img", data=body, method="POST",
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                assert base64.b64decode(json.loads(r.read())["images"][0])[:4] == b"\x89PNG"
            out["image"] = time.perf_counter() - t0
        finally:
            server.terminate()
            server.wait(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=10.0, help="Seconds within which the UI must answer.")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}")
    floors, runs = [], []
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both alike
        floors.append(floor_s())
        runs.append(one_start())
    base = statistics.median(floors)
    print(f"baseline: {LIBRARIES:<40} {base:6.2f} s")
    for key, what in (("api", "API answers (/api/v1/health)"), ("ui", "web UI answers (/)"),
                      ("image", "first image (txt2img 64x64, 2 steps)")):
        t = statistics.median(r[key] for r in runs)
        print(f"{what:<50} {t:6.2f} s  ({t / base:4.2f}x baseline)")
    ui = statistics.median(r["ui"] for r in runs)
    print(f"{'within' if ui <= args.budget else 'OVER'} the {args.budget:g} s budget (web UI {ui:.2f} s, "
          f"median of {args.repeats})")


if __name__ == "__main__":
    main()
