"""Benchmark: a 16-frame clip at 64x64 with a motion module on danqing-tiny (the bundled model),
against 16 single pictures of the same size, steps and sampler in the same run: seconds per
frame and peak memory. The motion module is one of danqing-tiny's shape (3 blocks of 32/64/64
channels, one motion layer each, 16-frame window) with random weights: its cost, not its
pictures, is measured. Each case runs in a fresh interpreter, so its peak resident memory is its
own. Not a test: numbers go to docs/benchmarks.md with the machine.

    .venv/bin/python bench/video_cpu.py [--frames 16] [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def case(kind: str, frames: int, steps: int, repeats: int) -> dict:
    """Run one case here and return its seconds (best of ``repeats``, after a warm-up) and peak RSS."""
    import torch

    from danqing import Settings, Studio
    from danqing.request import GenerationRequest
    from danqing.request_video import VideoRequest
    from danqing.video.studio import VideoStudio

    home = Path(tempfile.mkdtemp(prefix="danqing-bench-video-"))
    if kind == "clip":
        from diffusers import MotionAdapter

        torch.manual_seed(0)
        MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                      motion_norm_num_groups=8, motion_max_seq_length=16).save_pretrained(home / "models" / "motion" / "mm")
    studio = Studio(Settings(home=home, device="cpu", dtype="fp32"))
    common = dict(prompt="a red circle moving to the right", steps=steps, seed=1, width=64, height=64,
                  sampler="DPM++ 2M", cfg_scale=7.0, model="danqing-tiny")
    if kind == "clip":
        videos = VideoStudio(studio)
        run = lambda: videos.generate(VideoRequest.create(**common, frames=frames))  # noqa: E731
    else:
        run = lambda: studio.generate(GenerationRequest.create(**common, batch_size=frames), save=False)  # noqa: E731
    run()  # warm-up: model load, first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": min(times), "per_frame": min(times) / frames, "peak_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--case", choices=("clip", "images"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.frames, args.steps, args.repeats)))
        return
    import torch

    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.frames} frames at 64x64, {args.steps} steps DPM++ 2M, CFG 7")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = {}
    for kind in ("images", "clip"):
        done = subprocess.run([sys.executable, __file__, "--case", kind, "--frames", str(args.frames), "--steps",
                               str(args.steps), "--repeats", str(args.repeats)], capture_output=True, text=True,
                              env=env, check=True)
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    base = out["images"]
    for kind, label in (("images", f"{args.frames} single pictures (baseline)"), ("clip", f"one {args.frames}-frame clip")):
        r = out[kind]
        print(f"{label:34s} {r['seconds']:7.2f} s  {r['per_frame']:6.3f} s/frame ({r['per_frame'] / base['per_frame']:4.2f}x)"
              f"  peak {r['peak_mb']:6.0f} MB ({r['peak_mb'] / base['peak_mb']:4.2f}x)")


if __name__ == "__main__":
    main()
