"""Benchmark: how long ``danqing --help`` (and a subcommand's) takes, and which modules it imports.

Every run is a fresh interpreter (``python -m danqing ... --help``), as a user types it. The
baseline measured in the same run is a bare ``python -c pass``, so the ratio shows what danqing
adds to the interpreter's own start. ``-X importtime`` names the slowest imports, and the script
says whether torch, numpy, PIL, diffusers, transformers or gradio were loaded (none may be before
a command runs). Not a test: numbers go to docs/benchmarks.md with the machine.

    .venv/bin/python bench/cli_help.py [--repeats 5] [--budget 1.5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "numpy", "PIL", "diffusers", "transformers", "gradio", "fastapi", "cv2")


def timed(cmd: list[str], repeats: int) -> float:
    """Median wall seconds of ``cmd`` over ``repeats`` fresh runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def imports(args: list[str]) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of every import of ``python -m danqing ARGS``."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-m", "danqing", *args], capture_output=True,
                         text=True, check=True).stderr
    rows = []
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
            if cumulative.isdigit():
                rows.append((int(cumulative), name))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.5, help="Seconds `danqing --help` may take.")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    base = timed([sys.executable, "-c", "pass"], args.repeats)
    print(f"python -c pass                     {base:6.3f} s  (baseline)")
    worst = 0.0
    for cmd in (["--help"], ["generate", "--help"], ["train", "--help"]):
        t = timed([sys.executable, "-m", "danqing", *cmd], args.repeats)
        worst = max(worst, t)
        print(f"danqing {' '.join(cmd):<26} {t:6.3f} s  ({t / base:4.1f}x baseline)")
    rows = imports(["--help"])
    loaded = {name.split(".")[0] for _, name in rows}
    heavy = [m for m in HEAVY if m in loaded]
    print("heavy modules imported by --help:", ", ".join(heavy) or "none")
    print("slowest imports (cumulative ms):")
    for micros, name in sorted(rows, reverse=True)[:8]:
        print(f"  {micros / 1000:7.1f}  {name}")
    verdict = "within" if worst <= args.budget and not heavy else "OVER"
    print(f"{verdict} the {args.budget:g} s budget (slowest {worst:.3f} s)")


if __name__ == "__main__":
    main()
