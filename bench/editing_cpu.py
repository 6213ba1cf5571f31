"""Benchmark: the editing methods on the bundled model, as ratios to a txt2img of the same size,
steps and sampler measured in the same run (CPU). Not a test: numbers go to docs/benchmarks.md.

    .venv/bin/python bench/editing_cpu.py [--repeats 3]

Rows: txt2img (the baseline, DDIM 20 steps, 64x64); Prompt-to-Prompt (source and edit in one
batch); null-text inversion + reconstruction of a rendered picture (10 Adam steps per sampler
step); img2img at strength 1 with an instruct-pix2pix-shaped model (three-branch guidance).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    from danqing import GenerationRequest, Settings, Studio
    from danqing.editing.img2img import run_img2img
    from danqing.settings import force_offline
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import eval_scenes
    from danqing.training.instruct import widen_conv_in

    force_offline()
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    studio = Studio(Settings(home=tempfile.mkdtemp(), device="cpu", dtype="fp32"))
    base = dict(prompt="a green circle left of a blue square", steps=20, sampler="DDIM", cfg_scale=7.0, width=64,
                height=64, seed=1)
    picture = render(eval_scenes(1)[0])
    comps = studio.models.load(studio.settings.default_model).components
    instruct = dataclasses.replace(comps, unet=widen_conv_in(comps.unet).eval())
    rows = {
        "txt2img (baseline)": lambda: studio.generate(GenerationRequest(**base)),
        "Prompt-to-Prompt": lambda: studio.generate(GenerationRequest(
            **base, p2p_source="a red circle left of a blue square")),
        "null-text inversion + edit": lambda: studio.generate(GenerationRequest(
            **base, p2p_source="a red circle left of a blue square"), init_image=picture),
        "instruct-pix2pix img2img": lambda: run_img2img(
            instruct, GenerationRequest(**{**base, "prompt": "make the circle green"}, init_image="x",
                                        denoising_strength=1.0), picture, None,
            device=torch.device("cpu"), dtype=torch.float32),
    }
    times = {name: _time(fn, args.repeats) for name, fn in rows.items()}
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    print(f"machine: {machine}")
    print("| method | median wall time | ratio to txt2img |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} s | {t / times['txt2img (baseline)']:.2f} |")


if __name__ == "__main__":
    main()
