"""Benchmark: peak memory of tiled SD upscale against one untiled img2img of the same size, and
of a tiled model upscale (a random ESRGAN x4, 512 -> 2048) against the same model run untiled.

Each case runs in its own process (peak resident memory, ru_maxrss, is per process) on the CPU
with the bundled model; the baselines (the whole picture at once) run in the same invocation.
Not a test: numbers go to docs/benchmarks.md with the machine.

    .venv/bin/python bench/upscale_memory.py [--tile 256] [--overlap 32] [--steps 20] [--strength 0.3]
        [--cases sd,model] [--model-tile 256] [--model-overlap 32]
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


def model_child(case: str, tile: int, overlap: int) -> None:
    """A random old-arch ESRGAN x4 (RRDBNet, 32 filters, 2 blocks: the real 4x-UltraSharp-class
    models have 64 and 23) saved as a user's file, loaded through danqing, 512x512 -> 2048x2048."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    from danqing import Settings, Studio
    from danqing.editing.upscale import tile_boxes
    from danqing.models.upscalers import import_spandrel
    from danqing.settings import force_offline

    force_offline()
    torch.set_num_threads(2)
    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    home = Path(tempfile.mkdtemp())
    (home / "models" / "upscalers").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(ESRGAN(in_nc=3, out_nc=3, num_filters=32, num_blocks=2, scale=4).state_dict(),
               home / "models" / "upscalers" / "bench-esrgan.pth")
    studio = Studio(Settings(home=home, device="cpu", dtype="fp32"))
    studio.models.load_upscaler(studio.upscalers.file("bench-esrgan"))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    out = studio.upscalers.upscale(img, 2048, 2048, "bench-esrgan", tile=tile if case == "model-tiled" else 0,
                                   overlap=overlap)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tiles = len(tile_boxes(512, 512, tile, overlap)) if case == "model-tiled" else 1
    print(json.dumps({"case": case, "size": out.size, "tiles": tiles, "seconds": round(seconds, 1),
                      "peak_mb": round(peak / 1024), "model_loaded_mb": round(before / 1024),
                      "above_loaded_mb": round((peak - before) / 1024)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strength", type=float, default=0.3)
    ap.add_argument("--cases", default="sd,model", help="sd (SD upscale), model (model upscaler), or both")
    ap.add_argument("--model-tile", type=int, default=256)
    ap.add_argument("--model-overlap", type=int, default=32)
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        if a.child[0].startswith("model-"):
            model_child(a.child[0], a.model_tile, a.model_overlap)
        else:
            child(a.child[0], int(a.child[1]), a.tile, a.overlap, a.steps, a.strength)
        return
    cases = []
    if "sd" in a.cases.split(","):
        print(f"machine: {platform.machine()}, torch 2 threads, tile {a.tile}, overlap {a.overlap}, "
              f"{a.steps} steps at strength {a.strength}")
        cases += [("tiled", 1024), ("tiled", 2048), ("whole", 1024)]
    if "model" in a.cases.split(","):
        print(f"model upscaler: random ESRGAN x4 (32 filters, 2 blocks), 512 -> 2048, tile {a.model_tile}, "
              f"overlap {a.model_overlap}")
        cases += [("model-tiled", 2048), ("model-whole", 2048)]
    peaks = {}
    for case, size in cases:
        r = subprocess.run([sys.executable, __file__, "--child", case, str(size), "--tile", str(a.tile), "--overlap",
                            str(a.overlap), "--steps", str(a.steps), "--strength", str(a.strength),
                            "--model-tile", str(a.model_tile), "--model-overlap", str(a.model_overlap)],
                           capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        print(line[-1] if line else f"{case} {size}: failed: {r.stderr.strip().splitlines()[-1:]}")
        if line:
            peaks[case] = json.loads(line[-1])
    if "model-tiled" in peaks and "model-whole" in peaks:
        t, w = peaks["model-tiled"], peaks["model-whole"]
        print(f"model upscaler, tiled / untiled: peak {t['peak_mb'] / w['peak_mb']:.2f}x, above the loaded model "
              f"{t['above_loaded_mb'] / max(w['above_loaded_mb'], 1):.2f}x, time {t['seconds'] / w['seconds']:.2f}x")


if __name__ == "__main__":
    main()
