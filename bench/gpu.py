"""Benchmark: the GPU fast path against the stock diffusers pipelines, on any CUDA machine.

Random-weight SD1.5 (512x512) and SDXL (1024x1024) built from danqing's bundled configs (no
downloads), fp16 (or ``--dtype bf16``), 20 steps of DPM++ 2M at CFG 7. Runs, interleaved so
drift hits all alike: the stock ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` on the
same modules, and danqing's txt2img pass plainly and with each fast-path option (and DeepCache,
which changes the picture a little), at batch 1, 4 and 8. Prints per variant: ms per step, ms per
20-step image, images/s, peak VRAM, and the first call's extra time (compile time). Also the
peak VRAM of ``--medvram`` / ``--lowvram`` at batch 1. Not a test: the table goes to
docs/benchmarks.md with the machine.

    .venv/bin/python bench/gpu.py [--families sd1,sdxl] [--batches 1,4,8] [--repeats 3] [--dtype fp16]

Without CUDA it refuses in one line (exit 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

VARIANTS = {  # name -> (fast-path options as ``danqing generate --fast``, request fields)
    "danqing plain": ([], {}),
    "channels-last": (["channels-last"], {}),
    "sdpa=flash": (["sdpa=flash"], {}),
    "fuse-qkv": (["fuse-qkv"], {}),
    "compile": (["compile=max-autotune"], {}),
    "all exact": (["channels-last", "fuse-qkv", "compile=max-autotune"], {}),
    "all + deepcache 2": (["channels-last", "fuse-qkv", "compile=max-autotune"], {"deepcache_interval": 2}),
}
SIZES = {"sd1": 512, "sdxl": 1024}


def stock_pipeline(comps, scheduler):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if comps.family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
                                         tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                       unet=comps.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn) -> tuple[float, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated()


def bench_family(family: str, args) -> None:
    from danqing.customise.speedups import request_speedups
    from danqing.decode import decode_latents
    from danqing.models.families import build_components
    from danqing.models.fastpath import applied, fast_path_from
    from danqing.models.manager import ModelManager
    from danqing.models.registry import Registry
    from danqing.passes.txt2img import run_txt2img
    from danqing.request import GenerationRequest
    from danqing.sampling.samplers import make_scheduler

    manager = ModelManager(Registry(args.tmp), device="cuda", dtype=args.dtype)
    comps = build_components(family, seed=0)
    manager._place(comps)  # the manager's own placement: fp16, SDXL's VAE in fp32
    device = manager.device
    size = SIZES[family]
    print(f"\n{family}: {size}x{size}, 20 steps DPM++ 2M, CFG 7, {manager.dtype}")
    for batch in args.batches:
        req = GenerationRequest(prompt="a red circle left of a blue star", negative_prompt="blurry", steps=20,
                                width=size, height=size, seed=1, batch_size=batch, rng="gpu")

        def ours(fast_opts, fields):
            r = req.replace(**fields)
            with torch.no_grad(), applied(comps, fast_path_from(fast_opts), device), request_speedups(comps.unet, r):
                out = run_txt2img(comps, r, device=device, dtype=manager.dtype)
                decode_latents(comps.vae, out.latents[0])

        def stock():
            pipe = stock_pipeline(comps, make_scheduler(comps.scheduler_config, req.sampler, req.schedule))
            with torch.no_grad():
                lat = pipe(req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=20, height=size,
                           width=size, guidance_scale=7.0, num_images_per_prompt=batch, output_type="latent").images
                decode_latents(comps.vae, lat)  # the same decode as ours (the VAE stays fp32)

        runs = {"stock diffusers": stock, **{k: (lambda v=v: ours(*v)) for k, v in VARIANTS.items()}}
        first = {k: timed(fn)[0] for k, fn in runs.items()}  # warm-up; compile happens here
        times = {k: [] for k in runs}
        peaks = {}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t, peak = timed(fn)
                times[k].append(t)
                peaks[k] = peak
        base = statistics.median(times["stock diffusers"])
        print(f"  batch {batch}:")
        for k in runs:
            t = statistics.median(times[k])
            print(f"    {k:20s} {t / 20 * 1000:8.1f} ms/step {t / batch * 1000:9.1f} ms/image "
                  f"{batch / t:7.2f} img/s  peak {peaks[k] / 2**30:6.2f} GiB  first-call extra "
                  f"{max(first[k] - t, 0):6.1f} s  speed-up {base / t:5.2f}x")
    for flag, opts in (("--medvram", dict(medvram=True)), ("--lowvram", dict(lowvram=True))):
        req1 = GenerationRequest(prompt="a red circle", steps=20, width=size, height=size, seed=1, rng="gpu")
        fast = fast_path_from([], **opts)

        def offloaded():
            with torch.no_grad(), applied(comps, fast, device):
                out = run_txt2img(comps, req1, device=device, dtype=manager.dtype)
                decode_latents(comps.vae, out.latents[0])

        t, peak = timed(offloaded)
        print(f"  {flag}: batch 1 {t:.2f} s/image, peak {peak / 2**30:.2f} GiB")


def main() -> None:
    import tempfile

    from danqing.settings import force_offline

    force_offline()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device (torch.cuda.is_available() is False here)", file=sys.stderr)
        sys.exit(2)
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="sd1,sdxl")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.tmp = tempfile.mkdtemp()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for family in args.families.split(","):
        bench_family(family, args)


if __name__ == "__main__":
    main()
