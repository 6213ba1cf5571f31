"""Benchmark: LoRA training steps/s, ours against the diffusers example trainer's step, in one run.

    .venv/bin/python bench/lora_train.py                       # CPU, the bundled danqing-tiny
    .venv/bin/python bench/lora_train.py --model sd15-random   # an SD1.5-architecture UNet with random weights (GPU)

Not a test: the numbers go to docs/benchmarks.md with the machine.

Both rows train the same peft LoRA (rank 4 on to_q/to_k/to_v/to_out.0, the example's defaults)
at the same batch and resolution, with AdamW:
* **baseline**: diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` step: every
  step encodes the pixels with the VAE and the captions with the (frozen) text encoder, then
  the UNet forward/backward.
* **danqing**: ``danqing.training.finetune``'s step: latents cached once (a posterior sample
  per step from the cached mean/std), text encoder under the same forward, UNet forward/backward.
The ratio is danqing's steps/s over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _components(name: str, device):
    from danqing.models.families import build_components
    from danqing.models.loader import load_components
    from danqing.models.registry import Registry
    from danqing.settings import Settings

    if name == "sd15-random":
        comps = build_components("sd1", seed=0)  # SD1.5's architecture (860M UNet), random weights
    else:
        comps = load_components(Registry(Settings().models_dir).find("checkpoint", name))
    for m in comps.modules().values():
        m.requires_grad_(False)
        m.to(device=device, dtype=torch.float32)  # a diffusers folder keeps its stored dtype
    return comps


def bench(comps, *, cached: bool, batch: int, size: int, steps: int, device, dtype) -> float:
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from danqing.training.conditioning import tokenize

    unet = comps.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="bench")
    unet.set_adapter("bench")
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    noise_sched = DDPMScheduler.from_config(comps.scheduler_config)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, size, size, generator=g).to(device) * 2 - 1
    ids = tokenize(comps.tokenizer, ["a red heart on the left"] * batch, device)
    with torch.no_grad():
        dist = comps.vae.encode(pixels.to(comps.vae.dtype)).latent_dist
        mean, std = dist.mean, dist.std
    scaling = comps.vae.config.scaling_factor

    def step():
        if cached:
            z = (mean + std * torch.randn_like(std)) * scaling
        else:
            with torch.no_grad():
                z = comps.vae.encode(pixels.to(comps.vae.dtype)).latent_dist.sample() * scaling
        with torch.no_grad():
            ctx = comps.text_encoder(ids)[0]
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps / (time.perf_counter() - t0)
    unet.delete_adapters("bench")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="danqing-tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=0, help="pixels (default: 64 for danqing-tiny, 512 for SD1.5)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args()
    from danqing.settings import force_offline

    force_offline()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    size = args.size or (512 if args.model == "sd15-random" else 64)
    comps = _components(args.model, device)
    rows = {}
    for name, cached in (("baseline (diffusers example step)", False), ("danqing (cached latents)", True)):
        rows[name] = bench(comps, cached=cached, batch=args.batch, size=size, steps=args.steps, device=device,
                           dtype=dtype)
    base = rows["baseline (diffusers example step)"]
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(json.dumps({"model": args.model, "batch": args.batch, "size": size, "dtype": args.dtype, "machine": machine,
                      "steps_per_s": {k: round(v, 3) for k, v in rows.items()},
                      "ratio": {k: round(v / base, 3) for k, v in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
