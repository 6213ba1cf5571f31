"""Benchmark: ControlNet's overhead per sampler step, as the ratio to the same step without it,
measured in the same run (interleaved). Not a test: numbers go to docs/benchmarks.md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/control_cpu.py [--sd15] [--device cuda]

One "step" is one model evaluation with CFG (batch 2): ``sampling.loop.denoise`` vs
``conditioning.control.ControlDenoise`` with one ControlNet at weight 1. Rows: the bundled
danqing-tiny at 64x64 with its canny ControlNet (or a fresh ``from_unet`` copy when it is not
bundled), and with ``--sd15`` an SD1.5-architecture UNet + ControlNet with random weights at
``--sd15-size`` (the architecture is what costs time, not the weights).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _median_times(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():  # interleaved, so drifts in machine load hit both
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def measure(unet, controlnet, *, latent: int, ctx_dim: int, repeats: int, device, dtype, factor: int) -> dict:
    from danqing.conditioning.control import ControlDenoise, PreparedControl
    from danqing.sampling.loop import Conditioning, denoise

    x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    cond = Conditioning(torch.randn(2, 77, ctx_dim, device=device, dtype=dtype))
    img = torch.rand(1, 3, latent * factor, latent * factor)
    ctl = ControlDenoise([PreparedControl(controlnet, "controlnet", img, 1.0)])
    ctl.begin(10 ** 9)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain():
        denoise(unet, x, t, cond, 7.0, True)
        sync()

    def control():
        ctl(unet, x, t, cond, 7.0, True)
        sync()

    m = _median_times({"plain": plain, "control": control}, repeats)
    return {**m, "ratio": m["control"] / m["plain"]}


def main() -> None:
    from danqing.settings import force_offline

    force_offline()
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sd15", action="store_true")
    ap.add_argument("--sd15-size", type=int, default=256)
    ap.add_argument("--sd15-repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"# {platform.machine()}, {platform.processor() or '?'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}")

    from danqing.models.loader import load_components
    from danqing.models.registry import Registry
    from danqing.settings import Settings
    from danqing.training.controlnet import new_controlnet

    reg = Registry(Settings.from_env().models_dir)
    comps = load_components(reg.find("checkpoint", "danqing-tiny"))
    try:
        from danqing.models.control import load_control_model

        cn, _ = load_control_model(reg.find("controlnet", "danqing-tiny-canny"))
        which = "danqing-tiny-canny"
    except Exception:
        cn, which = new_controlnet(comps.unet, comps.vae), "from_unet copy"
    unet, cn = comps.unet.to(device, dtype).eval(), cn.to(device, dtype).eval()
    r = measure(unet, cn, latent=16, ctx_dim=unet.config.cross_attention_dim, repeats=args.repeats, device=device,
                dtype=dtype, factor=4)
    print(f"danqing-tiny 64x64 + {which}: plain {r['plain'] * 1e3:.2f} ms/step, with ControlNet "
          f"{r['control'] * 1e3:.2f} ms/step, ratio {r['ratio']:.2f}")

    if args.sd15:
        from diffusers import ControlNetModel, UNet2DConditionModel

        from danqing.models.families import load_family_config

        cfg = load_family_config("sd1")["unet"]
        unet = UNet2DConditionModel.from_config(cfg).to(device, dtype).eval()
        cn = ControlNetModel.from_unet(unet).to(device, dtype).eval()
        lat = args.sd15_size // 8
        r = measure(unet, cn, latent=lat, ctx_dim=768, repeats=args.sd15_repeats, device=device, dtype=dtype, factor=8)
        print(f"SD1.5 architecture (random weights) {args.sd15_size}x{args.sd15_size}: plain {r['plain']:.3f} s/step, "
              f"with ControlNet {r['control']:.3f} s/step, ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
