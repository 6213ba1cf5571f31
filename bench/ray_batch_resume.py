"""Benchmark: ``danqing batch --ray --workers 2`` over 200 requests, killed halfway (SIGKILL to
its whole process group) and rerun; the pictures against a single-process ``danqing batch`` of
the same file, in the same run.

1. ``danqing batch requests.jsonl --out single/`` (one process, one Studio, one torch thread):
   the reference pictures, and the baseline time.
2. ``danqing batch requests.jsonl --out ray/ --ray --workers 2`` in its own process group; once
   ``--kill-at`` requests have their NNNNN.json, the group is sent SIGKILL (the driver and the
   local Ray it started: raylet, GCS, the two actors).
3. The same command again: it must run only the requests without a JSON file (the finished ones'
   files keep their modification times) and end with every request done.

Every PNG of ray/ must equal single/'s (pixels and infotext). Not a test: numbers go to
docs/scale.md and docs/benchmarks.md with the machine.

    RAY_USAGE_STATS_ENABLED=0 .venv/bin/python bench/ray_batch_resume.py [--requests 200] [--steps 20] \
        [--kill-at 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _cmd(home: Path, jsonl: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "danqing.cli", "--home", str(home), "--device", "cpu", "--dtype", "fp32",
            "batch", str(jsonl), "--out", str(out), "--threads", "1", "-q", *extra]


def _run(cmd: list[str]) -> tuple[float, int, str]:
    """Run to the end; (seconds, requests it ran, stderr)."""
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{cmd[5:]} failed ({done.returncode}): {done.stderr[-2000:]}")
    m = re.search(r"(\d+) request\(s\) in", done.stderr)
    return seconds, int(m.group(1)) if m else -1, done.stderr


def _group_alive(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,comm=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kill-at", type=int, default=100, help="finished requests when the Ray run is killed")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="danqing-batch-resume-"))
    home, jsonl = root / "home", root / "requests.jsonl"
    shapes = ["a red circle left of a blue star", "two yellow squares", "a green triangle above a red circle",
              "a blue star on a white ground"]
    jsonl.write_text("".join(json.dumps({"prompt": f"{shapes[i % 4]}, {i}", "seed": 5000 + i, "steps": args.steps,
                                         "width": 64, "height": 64, "sampler": "Euler a"}) + "\n"
                             for i in range(args.requests)))
    single, ray_out = root / "single", root / "ray"

    t_single, n_single, _ = _run(_cmd(home, jsonl, single))
    print(f"single process: {n_single} requests in {t_single:.1f}s", flush=True)

    ray_cmd = _cmd(home, jsonl, ray_out, "--ray", "--workers", str(args.workers))
    t = time.perf_counter()
    proc = subprocess.Popen(ray_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    while len(list(ray_out.glob("*.json"))) < args.kill_at:
        if proc.poll() is not None:
            raise SystemExit(f"the Ray run ended before the kill: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    t_killed = time.perf_counter() - t
    proc.wait()
    time.sleep(2)
    left_alive = _group_alive(proc.pid)
    finished = {p.name: p.stat().st_mtime_ns for p in ray_out.glob("*.json")}
    pngs = {p.stem.split("-")[0] for p in ray_out.glob("*.png")}
    orphans = sorted(pngs - {Path(n).stem for n in finished})
    tmp_left = sorted(p.name for p in ray_out.iterdir() if not p.name.endswith((".json", ".png")))
    print(f"killed after {t_killed:.1f}s: {len(finished)} JSON files, {len(orphans)} PNG(s) without their JSON "
          f"{orphans}, other files {tmp_left}, processes of the group still alive: {left_alive}", flush=True)
    png_before = {p.name: p.stat().st_mtime_ns for p in ray_out.glob("*.png") if p.stem.split("-")[0] in
                  {Path(n).stem for n in finished}}

    t_rerun, n_rerun, err = _run(ray_cmd)
    print(f"rerun: {n_rerun} requests in {t_rerun:.1f}s; {err.strip().splitlines()[0]}", flush=True)

    jsons = sorted(ray_out.glob("*.json"))
    untouched = all(ray_out.joinpath(n).stat().st_mtime_ns == m for n, m in finished.items()) and all(
        ray_out.joinpath(n).stat().st_mtime_ns == m for n, m in png_before.items())
    diffs, infotext_same = [], 0
    for i in range(args.requests):
        a, b = Image.open(ray_out / f"{i:05d}.png"), Image.open(single / f"{i:05d}.png")
        diffs.append(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()))
        infotext_same += a.info.get("parameters") == b.info.get("parameters")
    workers = Counter(json.loads(j.read_text())["worker"] for j in jsons)
    equal = sum(d == 0 for d in diffs)

    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{args.requests} requests: danqing-tiny 64x64, {args.steps} steps, Euler a, one torch thread per process/actor\n")
    print("| run | requests run | seconds | requests/s | vs single process |")
    print("|---|---|---|---|---|")
    print(f"| single process (`danqing batch`) | {n_single} | {t_single:.1f} | {n_single / t_single:.2f} | 1.00x |")
    first = len(finished)
    print(f"| `--ray --workers {args.workers}`, SIGKILLed | {first} finished | {t_killed:.1f} | "
          f"{first / t_killed:.2f} | {first / t_killed / (n_single / t_single):.2f}x |")
    print(f"| the same command again | {n_rerun} | {t_rerun:.1f} | {n_rerun / t_rerun:.2f} | "
          f"{n_rerun / t_rerun / (n_single / t_single):.2f}x |")
    total = t_killed + t_rerun
    print(f"| killed run + rerun | {first + n_rerun} | {total:.1f} | {args.requests / total:.2f} | "
          f"{args.requests / total / (n_single / t_single):.2f}x |")
    print(f"\nJSON files at the end: {len(jsons)} of {args.requests}; the rerun ran {n_rerun} = "
          f"{args.requests} - {first} finished before the kill: {n_rerun == args.requests - first}; "
          f"finished files untouched by the rerun: {untouched}")
    print(f"pictures equal to the single process's: {equal} of {args.requests} (max pixel diff {max(diffs)}); "
          f"infotext equal: {infotext_same} of {args.requests}")
    print(f"requests per worker (both runs): {dict(workers)}")
    print(f"folder: {root}")
    ok = (len(jsons) == args.requests and n_rerun == args.requests - first and untouched and equal == args.requests
          and infotext_same == args.requests)
    if not ok:
        raise SystemExit("FAILED: see above")


if __name__ == "__main__":
    main()
