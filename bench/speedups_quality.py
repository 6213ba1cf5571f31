"""Benchmark: what DeepCache and token merging cost in quality and buy in time on danqing-tiny.

Generates the first N prompts of the shapes world's held-out set (seed 1000 + i, 64x64, 20
steps of DPM++ 2M, CFG 7, as ``danqing eval shapes --generate``) plainly and with each speed
option at its default strength, scores every picture with the shapes evaluator and prints each
option's summary, its change against the plain run and its time ratio, all in the same run.
Not a test: the numbers go to docs/benchmarks.md.

    .venv/bin/python bench/speedups_quality.py [--n 32] [--lang en] [--threads 1] [--deepcache 2] [--tome 0.3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    from danqing import GenerationRequest, Settings, Studio
    from danqing.customise.speedups import DEFAULT_DEEPCACHE_INTERVAL, DEFAULT_TOME_RATIO
    from danqing.settings import force_offline
    from danqing.synthetic.captions import caption
    from danqing.synthetic.evaluate import score, summarise
    from danqing.synthetic.scenes import eval_scenes

    force_offline()
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--lang", default="en")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--deepcache", type=int, default=DEFAULT_DEEPCACHE_INTERVAL)
    ap.add_argument("--tome", type=float, default=DEFAULT_TOME_RATIO)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    studio = Studio(Settings(home=tempfile.mkdtemp(), device="cpu", dtype="fp32"))
    variants = {"plain": {}, f"deepcache {args.deepcache}": {"deepcache_interval": args.deepcache},
                f"tome {args.tome:g}": {"tome_ratio": args.tome}}
    scores = {k: [] for k in variants}
    seconds = {k: 0.0 for k in variants}
    scenes = eval_scenes(args.n)
    for i, sc in enumerate(scenes):
        req = GenerationRequest(prompt=caption(sc, args.lang), model="danqing-tiny", steps=20, cfg_scale=7.0,
                                seed=1000 + i, subseed=0, width=64, height=64, sampler="DPM++ 2M")
        for name, fields in variants.items():  # interleaved so drift hits all alike
            t = time.perf_counter()
            img = studio.generate(req.replace(**fields)).images[0]
            seconds[name] += time.perf_counter() - t
            scores[name].append(score(img, sc.spec))
    plain = summarise(scores["plain"])
    print(f"danqing-tiny, {args.n} held-out prompts ({args.lang}), 64x64, 20 steps DPM++ 2M, CFG 7, "
          f"{torch.get_num_threads()} torch threads")
    for name in variants:
        s = summarise(scores[name])
        delta = {k: round(s[k] - plain[k], 4) for k in ("object", "colour", "shape") if s[k] is not None}
        print(f"{name:14s} object {s['object']:.4f} colour {s['colour']:.4f} shape {s['shape']:.4f}  "
              f"change {delta}  time {seconds[name] / args.n:.3f} s/image ({seconds[name] / seconds['plain']:.2f}x plain)")


if __name__ == "__main__":
    main()
