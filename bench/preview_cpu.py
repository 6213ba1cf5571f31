"""Benchmark: one live preview on the CPU -- the linear approximation, a tiny decoder (TAESD
architecture) and the model's full VAE decode, interleaved, in the same run.

Two latent spaces: danqing-tiny at 64x64 (its bundled VAE and bundled preview decoder) and SD1
at 512x512 (SD1's VAE and TAESD's default architecture, random weights: the time does not depend
on them). Prints the median ms of each and the ratios to the VAE. Not a test: the table goes to
docs/benchmarks.md with the machine.

    .venv/bin/python bench/preview_cpu.py [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib import resources


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from diffusers import AutoencoderKL

    from danqing.decode import cheap_preview, decode_latents, tiny_preview
    from danqing.models.preview_decoder import build_tiny_decoder, bundled_decoder_path, load_tiny_decoder

    torch.set_num_threads(args.threads)
    root = resources.files("danqing").joinpath("data")
    sd1_vae = AutoencoderKL.from_config(json.loads(root.joinpath("families/sd1/vae.json").read_text()))
    cases = {
        "danqing-tiny 64x64": (AutoencoderKL.from_pretrained(str(root.joinpath("models/danqing-tiny/vae"))),
                               load_tiny_decoder(bundled_decoder_path()), (1, 4, 16, 16), "sd1"),
        "SD1 512x512": (sd1_vae, build_tiny_decoder(), (1, 4, 64, 64), "sd1"),
    }
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    for name, (vae, tiny, shape, family) in cases.items():
        vae.eval()
        z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        runs = {"linear (Approx cheap)": lambda: cheap_preview(z, family),
                "tiny decoder (TAESD)": lambda: tiny_preview(z, tiny),
                "VAE decode (Full)": lambda: decode_latents(vae, z)}
        times = {k: [] for k in runs}
        for fn in runs.values():
            fn()  # warm-up
        with torch.no_grad():
            for _ in range(args.repeats):
                for k, fn in runs.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
        vae_ms = statistics.median(times["VAE decode (Full)"]) * 1000
        print(f"\n{name}")
        for k, v in times.items():
            ms = statistics.median(v) * 1000
            print(f"  {k:24s} {ms:9.2f} ms   {ms / vae_ms:6.3f}x the VAE")


if __name__ == "__main__":
    main()
