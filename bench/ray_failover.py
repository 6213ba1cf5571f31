"""Benchmark: a Ray Serve replica killed while 4 A1111 clients run 40 requests (``danqing
ray-serve --replicas 2``, the bundled tiny model), against the same 40 requests without a kill in
the same run; then requests for two models, counting model loads.

A local Ray (``--cpus``, default 2) runs the ingress and 2 CPU replicas (one torch thread each).
Three rounds of ``--clients`` concurrent ``webuiapi`` clients x ``--requests`` txt2img requests
(their own prompt, seeds 1000*c + i):

1. baseline: no kill;
2. kill: once ``--kill-after`` requests have answered, the process of one replica (the worker
   named by the ``x-danqing-worker`` header of the last answer, host:pid) is killed with
   SIGKILL. Every request must still answer, with the baseline's picture; the answers sent
   twice (``x-danqing-attempts: 2``) are counted, and the replica Ray starts in its place is
   waited for;
3. models: client c asks for ``danqing-tiny`` (even c) or ``danqing-tiny-random`` (odd c); each
   answer's worker and its ``x-danqing-model-loads`` are kept, to count loads per replica.

Not a test: numbers go to docs/scale.md and docs/benchmarks.md with the machine.

    RAY_USAGE_STATS_ENABLED=0 .venv/bin/python bench/ray_failover.py [--clients 4] [--requests 10] \
        [--steps 20] [--kill-after 10] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from clients import Round, free_port, warm_workers, webuiapi_post

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODELS = ("danqing-tiny", "danqing-tiny-random")


def _kill_when(round_: Round, after: int, log: dict) -> threading.Thread:
    """A thread that SIGKILLs a replica once ``after`` requests answered: not the one that gave
    the latest answer (it may be between two requests) but the other, which is running one (with
    more clients than replicas, a replica waits for no request)."""
    def watch():
        while round_.completed < after:
            time.sleep(0.01)
        answers = list(round_.extras.values())
        latest = answers[-1]["x-danqing-worker"]
        worker = next(e["x-danqing-worker"] for e in reversed(answers) if e["x-danqing-worker"] != latest)
        pid = int(worker.rsplit(":", 1)[1])
        log.update(worker=worker, at=time.perf_counter(), answered=round_.completed)
        os.kill(pid, signal.SIGKILL)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    return th


def _summary(name: str, r: Round, total: int, base: Round | None) -> str:
    lat = r.latency_summary()
    attempts = Counter(int(e.get("x-danqing-attempts", 1)) for e in r.extras.values())
    rate = r.completed / r.seconds
    ratio = f"{rate / (base.completed / base.seconds):.2f}x" if base else "1.00x"
    diff = r.max_pixel_diff(base) if base else 0
    return (f"| {name} | {total} | {r.completed} | {r.failed} | {attempts.get(2, 0)} | {r.seconds:.1f} | {rate:.2f} | "
            f"{ratio} | {lat['median']:.1f} | {lat['p90']:.1f} | {lat['max']:.1f} | {diff} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=10, help="per client")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kill-after", type=int, default=10, help="answers before one replica is killed")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = p.parse_args()

    import ray
    from ray import serve

    from danqing.scale.serving import RayServeOptions, start
    from danqing.settings import ServerSettings, Settings

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="danqing-ray-failover-")), device="cpu", dtype="fp32")
    body = {"steps": args.steps, "width": 64, "height": 64, "sampler_name": "Euler a"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    start(settings, ServerSettings(port=port, ui=False), RayServeOptions(replicas=2, threads=1))
    deploy = time.perf_counter() - t
    warm = warm_workers(url, 2, body)
    print(f"deployed in {deploy:.1f}s, both replicas answered after {warm:.1f}s", flush=True)
    total = args.clients * args.requests

    base = Round(args.clients, args.requests).run(webuiapi_post(port, body))
    print(f"baseline: {base.completed}/{total} answered in {base.seconds:.1f}s", flush=True)

    killed = Round(args.clients, args.requests)
    log: dict = {}
    watcher = _kill_when(killed, args.kill_after, log)
    t0 = time.perf_counter()
    killed.run(webuiapi_post(port, body))
    watcher.join(5)
    print(f"kill: {killed.completed}/{total} answered, {killed.failed} failed in {killed.seconds:.1f}s; killed "
          f"{log.get('worker')} after {log.get('answered')} answers ({log.get('at', t0) - t0:.1f}s in)", flush=True)
    for k, e in sorted(killed.errors.items()):
        print(f"  failed {k}: {e}")
    workers_after = {e["x-danqing-worker"] for k, e in killed.extras.items()}
    t = time.perf_counter()
    replaced = warm_workers(url, 2, body)  # two answering workers again: Ray's new replica is up
    print(f"after the kill, 2 replicas answer again after {replaced:.1f}s more "
          f"({time.perf_counter() - t:.1f}s); workers seen in the kill round: {sorted(workers_after)}", flush=True)

    models = Round(args.clients, args.requests).run(webuiapi_post(port, body, model=lambda c, i: MODELS[c % 2]))
    by_model: dict[str, Counter] = defaultdict(Counter)
    loads: dict[str, list[int]] = defaultdict(list)
    for (c, i), e in sorted(models.extras.items()):
        by_model[MODELS[c % 2]][e["x-danqing-worker"]] += 1
        loads[e["x-danqing-worker"]].append(int(e["x-danqing-model-loads"]))
    late = defaultdict(set)  # the last half of each client's requests: routed by then
    for (c, i), e in models.extras.items():
        if i >= args.requests // 2:
            late[MODELS[c % 2]].add(e["x-danqing-worker"])
    serve.shutdown()
    ray.shutdown()

    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"danqing-tiny 64x64, {args.steps} steps, Euler a; {args.clients} clients x {args.requests} requests "
          f"(webuiapi); 2 replicas, 1 torch thread each; deploy {deploy:.1f}s, warm-up {warm:.1f}s\n")
    print("| round | requests | answered | failed | sent twice | seconds | requests/s | vs baseline | "
          "median s | p90 s | max s | max pixel diff vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(_summary("baseline", base, total, None))
    print(_summary("one replica SIGKILLed", killed, total, base))
    twice = {k: killed.latencies[k] for k, e in killed.extras.items() if e.get("x-danqing-attempts") == "2"}
    print(f"\nkilled {log.get('worker')} after {log.get('answered')} answers; the replacement answered "
          f"{replaced:.1f}s after the round; sent twice (client, request): seconds "
          + ", ".join(f"{k}: {s:.1f}" for k, s in sorted(twice.items())))
    slow = sorted(killed.latencies.items(), key=lambda kv: -kv[1])[:5]
    print("slowest answers of the kill round (client, request): seconds, worker: "
          + "; ".join(f"{k}: {s:.1f}, {killed.extras.get(k, {}).get('x-danqing-worker')}" for k, s in slow))
    print(f"\nmodels round: {models.completed}/{total} answered, {models.failed} failed, {models.seconds:.1f}s")
    for m in MODELS:
        print(f"  {m}: answers per worker {dict(by_model[m])}; workers in the second half {sorted(late[m])}")
    print("  model loads per worker (x-danqing-model-loads, counted since the replica started), first and last "
          "answer of the round: " + ", ".join(f"{w}: {min(v)} -> {max(v)}" for w, v in loads.items()))
    if base.errors or killed.errors or models.errors:
        raise SystemExit("some requests failed (see above)")
    if not any(e.get("x-danqing-attempts") == "2" for e in killed.extras.values()):
        raise SystemExit("no request was sent twice: the killed replica was running none")


if __name__ == "__main__":
    main()
