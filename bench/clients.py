"""The client loop the serving benchmarks share (bench/serve_batch.py, bench/ray_serve_scaling.py,
bench/ray_failover.py): ``clients`` threads at once, each sending ``requests`` requests one
after another, every answer's pixels, latency and extra figures kept by (client, request).

A script imports it as ``from clients import ...`` (``python bench/x.py`` puts bench/ first on
the path).
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# post(client, request) -> (pixels as an int16 array, extra figures of the answer); raises when it failed
Post = Callable[[int, int], "tuple[np.ndarray, dict[str, Any]]"]


@dataclass
class Round:
    """One round of concurrent clients; ``completed`` and ``failed`` grow while it runs (a thread
    may watch them, e.g. to kill a worker halfway)."""

    clients: int
    requests: int
    pictures: dict = field(default_factory=dict)   # (client, i) -> pixels
    extras: dict = field(default_factory=dict)     # (client, i) -> the answer's extra figures
    latencies: dict = field(default_factory=dict)  # (client, i) -> seconds (answered or failed)
    errors: dict = field(default_factory=dict)     # (client, i) -> message
    seconds: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.pictures)

    @property
    def failed(self) -> int:
        return len(self.errors)

    def run(self, post: Post) -> "Round":
        """Every client at once, each its requests in order; an error is kept and the client
        goes on with its next request."""
        def client(c: int):
            for i in range(self.requests):
                t = time.perf_counter()
                try:
                    self.pictures[(c, i)], self.extras[(c, i)] = post(c, i)
                except Exception as exc:  # noqa: BLE001 -- counted, reported by the caller
                    self.errors[(c, i)] = f"{type(exc).__name__}: {str(exc)[:200]}"
                self.latencies[(c, i)] = time.perf_counter() - t

        threads = [threading.Thread(target=client, args=(c,)) for c in range(self.clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        self.seconds = time.perf_counter() - t
        return self

    def latency_summary(self) -> dict[str, float]:
        """Median, 90th percentile and maximum latency in seconds."""
        xs = sorted(self.latencies.values())
        return {"median": statistics.median(xs), "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))], "max": xs[-1]}

    def max_pixel_diff(self, other: "Round") -> int:
        """Largest pixel difference (0-255) between the answers both rounds have."""
        keys = set(self.pictures) & set(other.pictures)
        return max((int(abs(self.pictures[k] - other.pictures[k]).max()) for k in keys), default=0)

    def raise_errors(self) -> None:
        if self.errors:
            raise SystemExit(f"{len(self.errors)} request(s) failed: {list(self.errors.values())[:3]}")


def warm_workers(url: str, replicas: int, body: dict) -> float:
    """Concurrent A1111 txt2img requests until ``replicas`` different workers (the
    ``x-danqing-worker`` header of the Ray deployment) have answered; seconds taken."""
    import httpx

    seen: set[str] = set()
    t = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as http:
        while len(seen) < replicas:
            results: list[str] = []

            def one(seed: int):
                r = http.post("/sdapi/v1/txt2img", json={**body, "prompt": "warm-up", "seed": seed})
                r.raise_for_status()
                results.append(r.headers["x-danqing-worker"])

            threads = [threading.Thread(target=one, args=(s,)) for s in range(replicas)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            seen.update(results)
            if time.perf_counter() - t > 600:
                raise SystemExit(f"only {len(seen)} of {replicas} replicas answered in 10 minutes")
    return time.perf_counter() - t


def webuiapi_post(port: int, body: dict, model: Callable[[int, int], str] | None = None) -> Post:
    """One ``webuiapi`` (the A1111 client from PyPI) txt2img call per (client c, request i): its
    own prompt, seed 1000*c + i, the checkpoint ``model(c, i)`` when given. The answer's
    ``x-danqing-*`` headers (worker, attempts, model loads) are its extra figures."""
    import webuiapi

    local = threading.local()

    def post(c: int, i: int):
        if not hasattr(local, "api"):
            local.api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler=body["sampler_name"], steps=body["steps"])
            local.seen = []
            local.api.session.hooks["response"].append(lambda r, *a, **k: local.seen.append(dict(r.headers)))
        local.seen.clear()
        extra_args = {"override_settings": {"sd_model_checkpoint": model(c, i)}} if model else {}
        r = local.api.txt2img(prompt=f"client {c}: a red circle left of a blue star", seed=1000 * c + i,
                              steps=body["steps"], width=body["width"], height=body["height"], **extra_args)
        answer = local.seen[-1] if local.seen else {}
        extra = {k.lower(): v for k, v in answer.items() if k.lower().startswith("x-danqing-")}
        return np.asarray(r.image.convert("RGB"), dtype=np.int16), extra

    return post
