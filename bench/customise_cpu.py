"""Benchmark: what customisation costs per request on a full-size SD1 model (random weights, CPU),
as ratios to the work it sits beside, measured in the same run. Not a test: numbers go to
docs/benchmarks.md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/customise_cpu.py [--repeats 3] [--latent 32]

Rows: encoding a prompt with CLIP ViT-L, plain and with an 8-vector textual-inversion embedding
(the forward hook); installing + restoring an SD1.5-shaped IP-Adapter (diffusers'
``_load_ip_adapter_weights``: 16 decoupled cross-attention processors and the image projection)
against one CFG UNet evaluation; one CFG UNet evaluation with the adapter installed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
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
    from danqing.conditioning.text import TextEncoder
    from danqing.customise import ip_adapter as ipa
    from danqing.customise.embeddings import Embedding
    from danqing.models.families import build_components
    from danqing.settings import force_offline

    force_offline()
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256x256 pictures)")
    args = ap.parse_args()
    torch.manual_seed(0)
    comps = build_components("sd1")
    unet = comps.unet
    rows = []
    with torch.no_grad():
        prompt = "a photo of a castle on a hill, zqxstyle, golden hour, highly detailed"
        emb = Embedding("zqxstyle", {"emb_params": torch.randn(8, comps.text_encoder.config.hidden_size)})
        plain = _time(lambda: TextEncoder(comps, embeddings=()).encode(prompt), args.repeats)
        with_emb = _time(lambda: TextEncoder(comps, embeddings=[emb]).encode(prompt), args.repeats)
        rows += [("prompt encoding, plain (baseline)", plain, 1.0), ("prompt encoding, 8-vector embedding", with_emb, with_emb / plain)]

        x = torch.randn(2, 4, args.latent, args.latent)
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
        t = torch.tensor(500)
        step = _time(lambda: unet(x, t, encoder_hidden_states=ctx, return_dict=False), args.repeats)
        cross = unet.config.cross_attention_dim
        state = {"image_proj": {"proj.weight": torch.randn(4 * cross, 1024) * 0.02, "proj.bias": torch.zeros(4 * cross),
                                "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)},
                 "ip_adapter": {}}
        key_id = 1
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            w = unet.get_submodule(name.removesuffix(".processor")).to_k.weight
            state["ip_adapter"][f"{key_id}.to_k_ip.weight"] = torch.randn_like(w) * 0.02
            state["ip_adapter"][f"{key_id}.to_v_ip.weight"] = torch.randn_like(w) * 0.02
            key_id += 2

        def install_restore():
            with ipa.install(unet, state, 0.8):
                pass

        install = _time(install_restore, args.repeats)
        prompt_embeds = ipa.ImagePrompt(torch.randn(1, 1, 1024), torch.zeros(1, 1, 1024))
        with ipa.install(unet, state, 0.8):
            added = {"image_embeds": prompt_embeds.batch(1, True)}
            with_ip = _time(lambda: unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added, return_dict=False),
                            args.repeats)
        rows += [("UNet evaluation, CFG batch 2 (baseline)", step, 1.0),
                 ("IP-Adapter install + restore (per request)", install, install / step),
                 ("UNet evaluation with the IP-Adapter", with_ip, with_ip / step)]
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"latent {args.latent}x{args.latent}, median of {args.repeats}")
    for name, sec, ratio in rows:
        print(f"| {name} | {sec:.3f} s | {ratio:.2f} |")


if __name__ == "__main__":
    main()
