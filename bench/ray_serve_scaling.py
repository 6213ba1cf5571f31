"""Benchmark: throughput of danqing on Ray Serve with 1 and 2 Studio replicas (``danqing
ray-serve``), on the bundled tiny model, in the same run; ratios against 1 replica.

A local Ray is started once (``--cpus``, default 2, no dashboard, no usage stats). For each
replica count the application is deployed (one torch thread and ``--replica-cpus`` CPUs per
replica), warmed up until every replica has answered once (its model loaded), and then
``--clients`` concurrent A1111 clients (``webuiapi``, the A1111 client from PyPI) each post
``--requests`` txt2img requests one after another (their own prompt, seeds 1000*c + i). Every
request must succeed, and the pictures of each replica count must equal those of the first
(the same request and seed give the same picture on any replica). Not a test: numbers go to
docs/benchmarks.md and docs/scale.md with the machine.

    RAY_USAGE_STATS_ENABLED=0 .venv/bin/python bench/ray_serve_scaling.py [--replicas 1 2] [--clients 4] \
        [--requests 10] [--steps 20] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from clients import Round, free_port, warm_workers, webuiapi_post

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=10, help="per client")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    args = p.parse_args()

    import ray
    from ray import serve

    from danqing.scale.serving import RayServeOptions, start
    from danqing.settings import ServerSettings, Settings

    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    home = Path(tempfile.mkdtemp(prefix="danqing-ray-bench-"))
    settings = Settings(home=home, device="cpu", dtype="fp32")
    body = {"steps": args.steps, "width": 64, "height": 64, "sampler_name": "Euler a"}
    rows, reference = [], None
    for n in args.replicas:
        port = free_port()
        t = time.perf_counter()
        start(settings, ServerSettings(port=port, ui=False),
              RayServeOptions(replicas=n, threads=1, replica_cpus=args.replica_cpus))
        deploy = time.perf_counter() - t
        warm = warm_workers(f"http://127.0.0.1:{port}", n, body)
        round_ = Round(args.clients, args.requests).run(webuiapi_post(port, body))
        round_.raise_errors()
        seconds = round_.seconds
        if reference is None:
            reference = round_
        diff = round_.max_pixel_diff(reference)
        total = args.clients * args.requests
        rows.append((n, total, seconds, total / seconds, deploy, warm, diff))
        print(f"{n} replica(s): {total} requests in {seconds:.1f}s = {total / seconds:.2f} req/s "
              f"(deploy {deploy:.1f}s, warm-up {warm:.1f}s, max pixel diff vs first {diff})", flush=True)
        serve.shutdown()
    ray.shutdown()

    base = rows[0][3]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; ray.init {ray_start:.1f}s")
    print(f"danqing-tiny 64x64, {args.steps} steps, Euler a; {args.clients} clients x {args.requests} requests (webuiapi); "
          f"1 torch thread per replica\n")
    print("| replicas | requests | seconds | requests/s | vs 1 replica | deploy s | warm-up s | max pixel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for n, total, seconds, rate, deploy, warm, diff in rows:
        print(f"| {n} | {total} | {seconds:.1f} | {rate:.2f} | {rate / base:.2f}x | {deploy:.1f} | {warm:.1f} | {diff} |")


if __name__ == "__main__":
    main()
