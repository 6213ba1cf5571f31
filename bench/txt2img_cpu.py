"""Benchmark: one 20-step txt2img on the CPU with the tiny built-in model.

Prints wall time per phase and ratios against a baseline measured in the same run: the stock
diffusers ``StableDiffusionPipeline`` on the same components, scheduler, seed and prompt. Not a
test: numbers go to docs/benchmarks.md with the machine.

    .venv/bin/python bench/txt2img_cpu.py [--repeats 5] [--size 256] [--model danqing-tiny-random]
    .venv/bin/python bench/txt2img_cpu.py --model danqing-tiny --size 64   # the bundled model
    .venv/bin/python bench/txt2img_cpu.py --model danqing-tiny --size 64 --sampler LCM --steps 4 --cfg 1
        # few-step sampling with the CFG-1 fast path (one UNet branch, no negative prompt encoded)
    .venv/bin/python bench/txt2img_cpu.py --model danqing-tiny --size 64 --threads 1 --deepcache 2 \
        --fast channels-last --fast sdpa=flash   # the fast path and DeepCache against stock diffusers
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
    from danqing.sampling.samplers import make_scheduler
    from danqing.settings import force_offline

    force_offline()
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", default="danqing-tiny-random")
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--cfg", type=float, default=7.0, help="CFG scale; 1 runs one UNet branch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--fast", action="append", default=[], help="a fast-path option (danqing generate --fast)")
    ap.add_argument("--deepcache", type=int, default=0, help="DeepCache interval (0 = off)")
    ap.add_argument("--tome", type=float, default=0.0, help="ToMe ratio (0 = off)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())

    from danqing.models.fastpath import fast_path_from

    fast = fast_path_from(args.fast)
    studio = Studio(Settings(home=tempfile.mkdtemp(), device="cpu", dtype="fp32", fast=fast))
    req = GenerationRequest(prompt="a red circle left of a blue star", negative_prompt="blurry", steps=args.steps,
                            width=args.size, height=args.size, seed=1, sampler=args.sampler, cfg_scale=args.cfg,
                            model=args.model, deepcache_interval=args.deepcache, tome_ratio=args.tome)
    studio.generate(req.replace(steps=2))  # warm-up + model load
    comps = studio.models.load(args.model).components

    from diffusers import StableDiffusionPipeline

    def ours():
        return studio.generate(req).timings

    def reference():
        pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                       unet=comps.unet, scheduler=make_scheduler(comps.scheduler_config, req.sampler, req.schedule),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        t = time.perf_counter()
        with torch.no_grad():
            pipe(req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps, height=req.height,
                 guidance_scale=req.cfg_scale, eta=0.3 if req.sampler == "TCD" else 0.0,
                 width=req.width, generator=torch.Generator().manual_seed(1), output_type="pil")
        return {"total": time.perf_counter() - t}

    ours_t, ref_t = [], []
    for _ in range(args.repeats):  # interleaved so drift hits both alike
        ours_t.append(ours())
        ref_t.append(reference())
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    n_params = sum(p.numel() for m in comps.modules().values() for p in m.parameters())
    print(f"model: {args.model} (SD1 architecture, {n_params / 1e6:.1f} M parameters), {args.size}x{args.size}, "
          f"{args.steps} steps, {args.sampler}, CFG {args.cfg:g}")
    print(f"danqing options : fast path {fast.changed() or 'plain'}, DeepCache {args.deepcache or 'off'}, "
          f"ToMe {args.tome or 'off'}")
    print(f"danqing total   : {med(ours_t, 'total'):.3f} s (median of {args.repeats})")
    for k in ("sample", "decode"):  # "sample" includes text conditioning
        print(f"  {k:14s}: {med(ours_t, k):.3f} s")
    print(f"diffusers total : {med(ref_t, 'total'):.3f} s (baseline, same run)")
    print(f"ratio danqing / diffusers: {med(ours_t, 'total') / med(ref_t, 'total'):.3f} "
          f"(speed-up {med(ref_t, 'total') / med(ours_t, 'total'):.2f}x)")


if __name__ == "__main__":
    main()
