"""Benchmark: SD3 and FLUX.1 at full size on one CUDA GPU -- seconds per step and peak VRAM of
danqing's loop in bf16, with fp8-stored transformer weights (upcast per layer), with model /
sequential offload, and (``--gguf``) with GGUF Q8_0 / Q4_0 transformers, against diffusers'
``StableDiffusion3Pipeline`` / ``FluxPipeline`` on the same modules in the same run.

Random weights (no downloads): the bundled full-size configs (``danqing/data/families/sd3``,
``flux``: SD3 medium, FLUX.1 dev, with CLIP-L, OpenCLIP bigG and T5-XXL), initialised on the GPU
in bf16. T5's tokenizer is a toy one (its ids are all a random T5 needs). 1024x1024, Euler;
SD3 at CFG 4.5 (two branches), FLUX at CFG 1 with distilled guidance 3.5. Seconds per step are
(t(6 steps) - t(2 steps)) / 4, so text encoding and decoding drop out; peak VRAM is that of the
6-step run (torch.cuda.max_memory_allocated). Not a test: the table goes to docs/benchmarks.md.

    .venv/bin/python bench/families_gpu.py [--families sd3,flux] [--size 1024] [--gguf]
    .venv/bin/python bench/families_gpu.py --families tiny-sd3,tiny-flux --size 64 --device cpu   # smoke run

Without CUDA (and without ``--device cpu``) it refuses in one line (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a lighthouse at dusk, oil painting"


def toy_t5_tokenizer():
    """A toy T5 tokenizer (the ids of a few words and letters): enough for random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(PROMPT.replace(",", "").split())]
    vocab += [(c, -50.0) for c in "abcdefghijklmnopqrstuvwxyz,.\u2581"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def random_components(config: str, device, dtype):
    """Components of a bundled config with random weights made on ``device`` in ``dtype``
    (parameters built on the meta device first: a 12 B transformer never passes through the CPU)."""
    from danqing.models.families import base_family, components_from_configs, load_family_config

    comps = components_from_configs(base_family(config), load_family_config(config), empty=True)
    gen = torch.Generator(device).manual_seed(0)
    for module in comps.modules().values():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    t = torch.empty(p.shape, device=device, dtype=dtype)
                    t.normal_(0.0, 0.02, generator=gen) if p.ndim > 1 else t.fill_(1.0 if "norm" in name or name == "weight" else 0.0)
                    sub._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = b.to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
        module.eval()
    if comps.family == "sd3":
        comps.tokenizer_3 = toy_t5_tokenizer()
    else:
        comps.tokenizer_2 = toy_t5_tokenizer()
    return comps


def timed(fn, device) -> tuple[float, int]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def per_step(make_run, device) -> tuple[float, int]:
    """(seconds per step, peak bytes of the longer run) of ``make_run(steps)``."""
    make_run(1)()  # warm-up
    t2, _ = timed(make_run(2), device)
    t6, peak = timed(make_run(6), device)
    return (t6 - t2) / 4, peak


def diffusers_pipeline(comps):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    sched = FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config)
    if comps.family == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=comps.unet, scheduler=sched, vae=comps.vae, text_encoder=comps.text_encoder,
                                        tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2,
                                        tokenizer_2=comps.tokenizer_2, text_encoder_3=comps.text_encoder_3,
                                        tokenizer_3=comps.tokenizer_3)
    else:
        pipe = FluxPipeline(transformer=comps.unet, scheduler=sched, vae=comps.vae, text_encoder=comps.text_encoder,
                            tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_fp8(module) -> None:
    """The transformer's 2-D (Linear) weights and their biases stored in float8_e4m3fn, as the
    shared fp8 files store them."""
    for sub in module.modules():
        w = sub._parameters.get("weight")
        if w is not None and w.ndim == 2:
            for name in ("weight", "bias"):
                p = sub._parameters.get(name)
                if p is not None:
                    sub._parameters[name] = torch.nn.Parameter(p.data.to(torch.float8_e4m3fn), requires_grad=False)


def gguf_transformer(comps, qtype_name: str, folder: Path):
    """The transformer written as a GGUF file of ``qtype_name`` (Q8_0, Q4_0) and read back
    through diffusers' GGUF reader (``models.gguf_files``)."""
    import gguf

    from danqing.models.flow_files import DIT, transformer_to_original
    from danqing.models.gguf_files import load_gguf_transformer

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    config = dict(comps.unet.config)
    path = folder / f"{comps.family}-{qtype_name}.gguf"
    writer = gguf.GGUFWriter(str(path), arch=comps.family)
    for key, value in transformer_to_original(comps.unet.state_dict(), comps.family, config).items():
        array = value.float().cpu().numpy()
        if value.ndim == 2 and value.shape[1] % 32 == 0:
            writer.add_tensor(key.removeprefix(DIT), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key.removeprefix(DIT), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return load_gguf_transformer(path, config=config)


def bench_family(config: str, args, device) -> None:
    from danqing.models.fastpath import FastPath, applied
    from danqing.models.fp8 import place_fp8
    from danqing.passes.txt2img import run_txt2img
    from danqing.request import GenerationRequest, for_family

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    comps = random_components(config, device, dtype)
    flux = comps.family == "flux"
    base = GenerationRequest(prompt=PROMPT, sampler="Euler", width=args.size, height=args.size, seed=1, rng="gpu",
                             cfg_scale=1.0 if flux else 4.5)
    base = for_family(base, comps.family)
    params = sum(p.numel() for p in comps.unet.parameters()) / 1e9
    print(f"\n{config}: transformer {params:.2f} B parameters, {args.size}x{args.size}, Euler, {dtype}")

    def ours(steps, fast=FastPath(), c=None):
        def run():
            with torch.no_grad(), applied(c or comps, fast, device):
                run_txt2img(c or comps, base.replace(steps=steps), device=device, dtype=dtype)
        return run

    def stock(steps):
        pipe = diffusers_pipeline(comps)
        words = dict(prompt=PROMPT, num_inference_steps=steps, height=args.size, width=args.size, output_type="latent",
                     generator=torch.Generator(device).manual_seed(1))
        words.update(guidance_scale=3.5) if flux else words.update(guidance_scale=4.5)
        return lambda: pipe(**words)

    rows = {"diffusers pipeline": lambda s: stock(s), "danqing": lambda s: ours(s)}
    if device.type == "cuda":
        rows["danqing --offload model"] = lambda s: ours(s, FastPath(offload="model"))
        rows["danqing --offload sequential"] = lambda s: ours(s, FastPath(offload="sequential"))
    results = {name: per_step(make, device) for name, make in rows.items()}
    if args.gguf:
        with tempfile.TemporaryDirectory() as tmp:
            for q in ("Q8_0", "Q4_0"):
                quantised = gguf_transformer(comps, q, Path(tmp)).to(device)
                c = dataclasses.replace(comps, unet=quantised)
                results[f"danqing GGUF {q}"] = per_step(lambda s, c=c: ours(s, c=c), device)
                del quantised, c
    to_fp8(comps.unet)  # last: the weights are quantised in place
    place_fp8(comps.unet, device, dtype)
    results["danqing fp8 weights (layerwise)"] = per_step(lambda s: ours(s), device)
    ref = results["diffusers pipeline"][0]
    for name, (sec, peak) in results.items():
        print(f"  {name:34s} {sec:7.3f} s/step  peak {peak / 2**30:7.2f} GiB  {ref / sec:5.2f}x the pipeline's speed")


def main() -> None:
    from danqing.settings import force_offline

    force_offline()
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="sd3,flux", help="bundled configs: sd3, flux (tiny-sd3, tiny-flux: smoke run)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--gguf", action="store_true", help="also GGUF Q8_0 / Q4_0 (quantised on the CPU: minutes)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        print("bench/families_gpu.py needs a CUDA device (torch.cuda.is_available() is False here); "
              "--device cpu --families tiny-sd3,tiny-flux --size 64 is a smoke run", file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), f"torch {torch.__version__}")
    for config in args.families.split(","):
        bench_family(config, args, device)


if __name__ == "__main__":
    main()
