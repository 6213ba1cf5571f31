"""Benchmark: peak memory of tiled SD upscale against one untiled img2img of the same size.

Each case runs in its own process (peak resident memory, ru_maxrss, is per process) on the CPU
with the bundled model; the baseline, an img2img of the whole picture at once, runs in the same
invocation. Not a test: numbers go to docs/benchmarks.md with the machine.

    .venv/bin/python bench/upscale_memory.py [--tile 256] [--overlap 32] [--steps 20] [--strength 0.3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def child(case: str, size: int, tile: int, overlap: int, steps: int, strength: float) -> None:
    import tempfile
    from pathlib import Path

    import torch

    from danqing import GenerationRequest, Settings, Studio
    from danqing.editing.upscale import sd_upscale, tile_boxes
    from danqing.settings import force_offline

    force_offline()
    torch.set_num_threads(2)
    studio = Studio(Settings(home=Path(tempfile.mkdtemp()), device="cpu", dtype="fp32"))
    base = studio.generate(GenerationRequest(prompt="a red circle left of a blue square", seed=42, steps=20,
                                             width=64, height=64)).images[0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    req = GenerationRequest(prompt="a red circle left of a blue square", seed=0, steps=steps, width=tile, height=tile,
                            denoising_strength=strength)
    if case == "tiled":
        out = sd_upscale(studio, base, req, scale=size / 64, tile=tile, overlap=overlap)
        tiles = len(tile_boxes(size, size, tile, overlap))
    else:
        big = base.resize((size, size))
        out = studio.generate(req.replace(width=size, height=size), init_image=big).images[0]
        tiles = 1
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"case": case, "size": out.size, "tiles": tiles, "seconds": round(seconds, 1),
                      "peak_mb": round(peak / 1024), "model_loaded_mb": round(before / 1024)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.3)
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), a.tile, a.overlap, a.steps, a.strength)
        return
    print(f"machine: {platform.machine()}, torch 2 threads, tile {a.tile}, overlap {a.overlap}, "
          f"{a.steps} steps at strength {a.strength}")
    for case, size in (("tiled", 1024), ("tiled", 2048), ("whole", 1024)):
        r = subprocess.run([sys.executable, __file__, "--child", case, str(size), "--tile", str(a.tile), "--overlap",
                            str(a.overlap), "--steps", str(a.steps), "--strength", str(a.strength)],
                           capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        print(line[-1] if line else f"{case} {size}: failed: {r.stderr.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
