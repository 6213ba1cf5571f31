"""Benchmark: danqing-tiny with a 4-step distilled LoRA against the 20-step model, on the CPU.

Interleaves, in the same run, the bundled model at its documented settings (DPM++ 2M, 20 steps,
CFG 7) and the same model with a distilled LoRA (``<lora:NAME:1>``, 4 steps, CFG 1, with the
sampler it was made for: ``LCM`` for an LCM-LoRA, ``DDIM`` on the ``Simple`` schedule for a
phased one), and prints the median wall time of one 64x64 picture each and their
ratio. The LoRA's weights are merged for each request and restored after it, and that time is
counted. Not a test: the numbers go to docs/benchmarks.md with the machine.

    .venv/bin/python bench/fewstep_cpu.py [--repeats 20] [--threads 0] [--models-dir models --lora NAME]
        [--sampler DDIM --schedule Simple]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    from danqing import GenerationRequest, Settings, Studio
    from danqing.settings import force_offline

    force_offline()
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--lora", default="danqing-tiny-lcm", help="a LoRA of --models-dir or a bundled one")
    ap.add_argument("--models-dir", default=None, help="the models folder [default: an empty one]")
    ap.add_argument("--sampler", default="LCM", help="the LoRA's sampler (its header's danqing.usage)")
    ap.add_argument("--schedule", default="Automatic", help="the LoRA's schedule")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    home = tempfile.mkdtemp()
    studio = Studio(Settings(home=home, models_dir=args.models_dir or f"{home}/models", device="cpu", dtype="fp32"))
    prompt = "a red circle left of a blue star"
    runs = {
        "20 steps, DPM++ 2M, CFG 7": GenerationRequest.create(prompt=prompt, model="danqing-tiny", width=64, height=64,
                                                              steps=20, sampler="DPM++ 2M", cfg_scale=7.0, seed=1),
        f"4 steps, {args.sampler}, {args.schedule}, CFG 1, LoRA": GenerationRequest.create(
            prompt=f"{prompt} <lora:{args.lora}:1>", model="danqing-tiny", width=64, height=64, steps=4,
            sampler=args.sampler, schedule=args.schedule, cfg_scale=1.0, seed=1),
    }
    for req in runs.values():  # warm-up: model load, first LoRA read
        studio.generate(req)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, req in runs.items():
            t0 = time.perf_counter()
            studio.generate(req)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["20 steps, DPM++ 2M, CFG 7"])
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("| run | median per picture | ratio to 20 steps |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1000:.1f} ms | {m / base:.2f} |")


if __name__ == "__main__":
    main()
