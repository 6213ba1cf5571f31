"""Train an IP-Adapter (Ye et al. 2023) for a base model: pictures as prompts.

The recipe of the paper at the size of the shapes world. The base model (UNet, VAE, text
encoder) and the CLIP image encoder stay frozen; what trains is

- the image projection (diffusers' ``ImageProjection``: a linear map of the CLIP image
  embedding to 4 "image tokens" and a LayerNorm), and
- the decoupled cross-attention of every cross-attention layer: ``to_k_ip`` / ``to_v_ip``,
  started from the layer's text ``to_k`` / ``to_v`` as in the paper.

The trainable parts are installed by diffusers' own loader (``_load_ip_adapter_weights``, the
one ``customise.ip_adapter.install`` uses to run an adapter), so training and generation go
through the same ``IPAdapterAttnProcessor2_0``; the export is the released adapters' layout
(``image_proj.*`` / ``ip_adapter.*`` keys), which ``models.ip_adapter.read_ip_adapter`` and
diffusers' ``load_ip_adapter`` read.

Each picture is its own image prompt (the paper's recipe: the CLIP embedding of the training
picture). Captions are dropped for a share of the steps (``drop_text``), the image embedding
(zeros, the unconditional image branch at generation) for another (``drop_image``), both for a
third (``drop_both``), so classifier-free guidance works on either.

    danqing train ip-adapter --config configs/train/danqing-tiny-ip.toml
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from danqing.conditioning.schedule import ConditioningContext
from danqing.customise.ip_adapter import ImagePrompt, encode_images
from danqing.decode import decode_latents, to_pil
from danqing.request import GenerationRequest
from danqing.studio import run_sampling
from danqing.synthetic.evaluate import detect
from danqing.synthetic.render import render
from danqing.synthetic.scenes import Obj, Scene
from danqing.training.base import _gen, encode_all, new_accelerator
from danqing.training.conditioning import encode_texts
from danqing.training.config import IPAdapterTrainConfig
from danqing.training.data import picture_embeddings, synthetic_dataset
from danqing.training.runs import (StepLog, ema_weights, load_float32, my_rows, optimiser_step, resume_step,
                                   start_run)

Log = Callable[[str], None]
TOKENS = 4  # image tokens of the base IP-Adapter (diffusers' ImageProjection)
# the references the run is judged on: one object each, at the centre of a white picture
EVAL_OBJECTS = (("green", "star"), ("red", "circle"), ("blue", "square"), ("yellow", "cross"),
                ("purple", "triangle"), ("orange", "ring"), ("pink", "cross"), ("cyan", "triangle"))


# ---------------------------------------------------------------------------------------------
# The adapter's weights in the release layout
# ---------------------------------------------------------------------------------------------
def cross_attention_layers(unet) -> list[str]:
    """Names of the UNet's cross-attention processors, in diffusers' order (the release numbers
    them 1, 3, 5, ...: ``_convert_ip_adapter_attn_to_diffusers``)."""
    return [name for name in unet.attn_processors
            if not name.endswith("attn1.processor") and not name.startswith("encoder_hid_proj.")]  # plus's own


def _ip_layers(unet) -> dict[str, torch.Tensor]:
    """Every ``to_k_ip`` / ``to_v_ip`` a copy of its layer's text ``to_k`` / ``to_v`` (the paper)."""
    modules = dict(unet.named_modules())
    ip = {}
    for i, name in enumerate(cross_attention_layers(unet)):
        attn = modules[name.removesuffix(".processor")]
        ip[f"{2 * i + 1}.to_k_ip.weight"] = attn.to_k.weight.detach().clone().float()
        ip[f"{2 * i + 1}.to_v_ip.weight"] = attn.to_v.weight.detach().clone().float()
    return ip


def initial_state(unet, image_dim: int, seed: int = 0, *, plus: bool = False, tokens: int = 16,
                  width: int = 64) -> dict[str, dict[str, torch.Tensor]]:
    """A new adapter: the projection at PyTorch's initialisation (from ``seed``) and the
    ``to_k_ip`` / ``to_v_ip`` of ``_ip_layers``. ``image_dim``: the image embedding's size, or
    with ``plus`` the encoder's hidden size; the "plus" projection is IP-Adapter Plus's
    resampler (``tokens`` learned queries of ``width``, 4 layers, 64 per head, as released)."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    cross = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    if plus:
        proj = IPAdapterPlusImageProjection(embed_dims=image_dim, output_dims=cross, hidden_dims=width,
                                            heads=width // 64, num_queries=tokens)
        image_proj = plus_release_layout(proj.state_dict())
    else:
        proj = ImageProjection(image_embed_dim=image_dim, cross_attention_dim=cross, num_image_text_embeds=TOKENS)
        image_proj = {k.replace("image_embeds", "proj"): v.detach().clone() for k, v in proj.state_dict().items()}
    return {"image_proj": image_proj, "ip_adapter": _ip_layers(unet)}


_PLUS_NAMES = (("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"), ("attn.to_out.0", "0.to_out"),
               ("ff.0", "1.0"), ("ff.1.net.0.proj", "1.1"), ("ff.1.net.2", "1.3"))


def plus_release_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``IPAdapterPlusImageProjection`` state in the released Resampler's names (the
    inverse of diffusers' ``_convert_ip_adapter_image_proj_to_diffusers``; a test round-trips
    it): ``layers.i.0`` the attention (``to_kv`` = ``to_k`` and ``to_v`` stacked), ``layers.i.1``
    the feed-forward."""
    out = {}
    for key, value in state.items():
        value = value.detach().float().cpu().clone()
        if not key.startswith("layers."):
            out[key] = value
            continue
        _, i, rest = key.split(".", 2)
        if rest.startswith("attn.to_v."):
            continue
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.{rest.rsplit('.', 1)[1]}"] = torch.cat(
                [value, state[key.replace("attn.to_k.", "attn.to_v.")].detach().float().cpu()])
            continue
        for ours, release in _PLUS_NAMES:
            if rest.startswith(ours + "."):
                out[f"layers.{i}.{release}{rest[len(ours):]}"] = value
                break
        else:
            raise KeyError(key)
    return out


def installed_state(unet) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of diffusers' loader: the release-layout state of the adapter installed on
    ``unet`` (one adapter)."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    if type(proj).__name__ == "IPAdapterPlusImageProjection":
        image_proj = plus_release_layout(proj.state_dict())
    else:
        image_proj = {k.replace("image_embeds", "proj"): v.detach().float().cpu().clone()
                      for k, v in proj.state_dict().items()}
    ip = {}
    for i, name in enumerate(cross_attention_layers(unet)):
        proc = unet.attn_processors[name]
        ip[f"{2 * i + 1}.to_k_ip.weight"] = proc.to_k_ip[0].weight.detach().float().cpu().clone()
        ip[f"{2 * i + 1}.to_v_ip.weight"] = proc.to_v_ip[0].weight.detach().float().cpu().clone()
    return {"image_proj": image_proj, "ip_adapter": ip}


def adapter_parameters(unet) -> list[torch.nn.Parameter]:
    """The trainable parameters: the image projection and every ``to_k_ip`` / ``to_v_ip``."""
    params = list(unet.encoder_hid_proj.parameters())
    for name in cross_attention_layers(unet):
        proc = unet.attn_processors[name]
        params += list(proc.to_k_ip.parameters()) + list(proc.to_v_ip.parameters())
    return params


def save_ip_adapter(state: dict, path: Path, *, base: str, image_encoder: str) -> Path:
    """``path`` (.safetensors, float32): ``image_proj.*`` and ``ip_adapter.*`` keys (the release
    layout); the metadata names the base model and the image encoder it was trained with."""
    from safetensors.torch import save_file

    flat = {f"{part}.{k}": v.contiguous() for part in ("image_proj", "ip_adapter") for k, v in state[part].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp), metadata={"format": "pt", "base_model": base, "image_encoder": image_encoder})
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Judging it: does the generation hold the reference's object?
# ---------------------------------------------------------------------------------------------
def reference_scene(colour: str, shape: str) -> Scene:
    """One large object at the centre of a plain white picture: the image prompt of a judgement."""
    return Scene((Obj(shape, colour, "large", 0.5, 0.5),), background="white", style="plain", seed=0)


def holds(image: Image.Image, colour: str, shape: str) -> bool:
    """Whether the evaluator finds a ``colour`` ``shape`` in ``image``."""
    return any(d.colour == colour and d.shape == shape for d in detect(image))


@torch.no_grad()
def image_prompt_rates(comps, encoder, processor, objects=EVAL_OBJECTS, *, n: int = 4, steps: int = 20,
                       cfg_scale: float = 7.0, seed: int = 0, size: int = 64, prompt: str = "") -> dict:
    """For each (colour, shape): the share of ``n`` generations (seeds ``seed``...) with the
    picture of that object as image prompt and ``prompt`` as text that contain it; and their mean.
    ``comps.unet`` must have the adapter installed (at the weight to judge)."""
    plus = type(comps.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == "IPAdapterPlusImageProjection"
    out = {}
    for colour, shape in objects:
        picture = render(reference_scene(colour, shape), size)
        ctx = ConditioningContext((), encode_images(encoder, processor, [picture], plus=plus))
        req = GenerationRequest(prompt=prompt, steps=steps, cfg_scale=cfg_scale, seed=seed, subseed=0, batch_size=n,
                                width=size, height=size, sampler="DPM++ 2M")
        lat, _, _, _ = run_sampling(comps, req, device=torch.device("cpu"), dtype=comps.unet.dtype, context=ctx)
        images = to_pil(decode_latents(comps.vae, lat[0]))
        out[f"{colour} {shape}"] = sum(holds(im, colour, shape) for im in images) / n
    out["mean"] = round(float(np.mean(list(out.values()))), 4)
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@dataclass
class AdapterData:
    """The training pictures, encoded once: latents (posterior mean, std), CLIP image
    embeddings and caption hidden states (the last row is the empty prompt)."""

    mean: torch.Tensor  # (N, 4, h, w)
    std: torch.Tensor
    embeds: torch.Tensor  # (N, D), plus (N, tokens, C): what encode_images gives the picture at generation
    hidden: torch.Tensor  # (T + 1, 77, C)
    cap_idx: list[list[int]]
    dropped: torch.Tensor  # the unconditional image as at generation: zeros (D,), plus the encoding of zero pixels


def adapter_data(comps, encoder, processor, d, log: Log, *, plus: bool = False) -> AdapterData:
    t = time.perf_counter()
    data = synthetic_dataset(d.n_images, d.size, d.seed, d.captions_per_image)
    mean, std = encode_all(comps.vae, data.images, "cpu")
    embeds = picture_embeddings(encoder, processor, data.images, plus=plus)
    blank = Image.new("RGB", (d.size, d.size))
    dropped = encode_images(encoder, processor, [blank], plus=plus).negative[0, 0].float().cpu()
    texts = sorted({c for caps in data.captions for c in caps})
    index = {c: i for i, c in enumerate(texts)}
    hidden = encode_texts(comps, texts + [""])
    log(f"data: {len(data)} pictures, their CLIP image embeddings, {len(texts)} distinct captions "
        f"({time.perf_counter() - t:.0f} s)")
    return AdapterData(mean, std, embeds, hidden, [[index[c] for c in caps] for caps in data.captions], dropped)


def adapter_loss(unet, data: AdapterData, g: torch.Generator, cfg, noise_sched, scaling: float, acc) -> torch.Tensor:
    """The denoising loss of one batch through the UNet with the adapter: each picture's own
    image embedding as image prompt; text, image or both dropped at the config's rates. All
    draws come from ``g``, for the whole batch, of which this process keeps its rows."""
    b, a = cfg.unet.batch_size, cfg.ip_adapter
    idx = torch.randint(len(data.cap_idx), (b,), generator=g)
    z = (data.mean[idx] + data.std[idx] * torch.randn(data.mean[idx].shape, generator=g)) * scaling
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=g)
    x_t = noise_sched.add_noise(z, noise, t)
    pick = torch.randint(cfg.data.captions_per_image, (b,), generator=g)
    u = torch.rand(b, generator=g)  # one draw decides: text only dropped, image only, both, neither
    drop_text = u < a.drop_text
    drop_image = (u >= a.drop_text) & (u < a.drop_text + a.drop_image)
    both = (u >= a.drop_text + a.drop_image) & (u < a.drop_text + a.drop_image + a.drop_both)
    drop_text, drop_image = drop_text | both, drop_image | both
    rows = [data.hidden[-1] if drop_text[k] else data.hidden[data.cap_idx[int(i)][int(pick[k])]] for k, i in enumerate(idx)]
    ctx = torch.stack(rows)
    keep = drop_image.view(-1, *([1] * (data.embeds.dim() - 1)))
    embeds = torch.where(keep, data.dropped.expand_as(data.embeds[idx]), data.embeds[idx])[:, None]
    part = my_rows(acc, b)
    x_t, t, ctx, embeds, noise = (v[part].to(acc.device) for v in (x_t, t, ctx, embeds, noise))
    with acc.autocast():
        pred = unet(x_t, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [embeds]}).sample
        return F.mse_loss(pred.float(), noise)


def train_ip_adapter(cfg: IPAdapterTrainConfig, *, resume: bool = False, log: Log = print) -> dict:
    """Train and export ``run.output_dir/ip-adapter.safetensors`` and ``summary.json``;
    ``resume``: continue from the newest checkpoint (bit-identical to an uninterrupted run)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from danqing.errors import InvalidRequest
    from danqing.models.clip_model import clip_folder
    from danqing.models.ip_adapter import load_image_encoder

    c, r, d, a = cfg.unet, cfg.run, cfg.data, cfg.ip_adapter
    run_dir = start_run(r.output_dir, resume=resume, num_threads=r.num_threads)
    t_start = time.perf_counter()

    # 1. the frozen base model and image encoder; the new adapter installed by diffusers' loader
    comps, _, _ = load_float32(a.init_from)
    encoder, processor = load_image_encoder(clip_folder(a.image_encoder))
    plus = a.kind == "plus"
    start_state = initial_state(comps.unet, encoder.config.hidden_size if plus else encoder.config.projection_dim,
                                r.seed, plus=plus, tokens=a.plus_tokens, width=a.plus_width)
    if a.init_adapter:
        from danqing.customise.ip_adapter import is_plus
        from danqing.models.ip_adapter import read_ip_adapter

        earlier = read_ip_adapter(Path(a.init_adapter))
        if is_plus(earlier) == plus:
            start_state = earlier
            log(f"adapter: continuing from {a.init_adapter}")
        elif plus:
            start_state["ip_adapter"] = earlier["ip_adapter"]
            log(f"adapter: to_k_ip / to_v_ip from the base adapter {a.init_adapter}, a new resampler")
        else:
            raise InvalidRequest("ip_adapter.init_adapter", f"{a.init_adapter} is a plus adapter; a base adapter "
                                                            "cannot continue from it")
    comps.unet._load_ip_adapter_weights([start_state], low_cpu_mem_usage=False)
    unet = comps.unet.float()
    params = adapter_parameters(unet)
    for p in params:
        p.requires_grad_(True)

    # 2. data: latents, image embeddings, caption embeddings (each once)
    data = adapter_data(comps, encoder, processor, d, log, plus=plus)

    # 3. train
    acc = new_accelerator(r.mixed_precision)
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)))
    model, opt, sched = acc.prepare(unet, opt, sched)
    ema = EMAModel(params, decay=c.ema_decay, foreach=True)
    acc.register_for_checkpointing(ema)
    start = resume_step(acc, run_dir, log) if resume else 0
    noise_sched = DDPMScheduler.from_config(comps.scheduler_config)
    scaling = comps.vae.config.scaling_factor
    steps = StepLog("ip-adapter", c.steps, start, log, run_dir, r, acc)
    for step in range(start, c.steps):
        g = _gen(r.seed, step, "ip-adapter")
        model.train()
        loss = adapter_loss(model, data, g, cfg, noise_sched, scaling, acc)
        optimiser_step(acc, loss, params, opt, sched, c.max_grad_norm, ema)
        final = steps.done(step + 1, loss)
        if steps.main and a.eval_per_object and ((step + 1) % r.eval_every == 0 or final):
            with ema_weights(ema, params, unet):
                res = image_prompt_rates(comps, encoder, processor, n=a.eval_per_object, steps=r.eval_steps)
            log(f"eval step {step + 1}: generations holding the image prompt's object {res}")
            steps.evaluated(step + 1, res, {"rates": res})
        if steps.stopping():
            break

    # 4. export the EMA weights
    ema.copy_to(params)
    unet.eval()
    acc.wait_for_everyone()
    summary = {"kind": "ip-adapter", "adapter": a.kind, "init_from": a.init_from, "image_encoder": a.image_encoder,
               "images": len(data.cap_idx), "steps": steps.last["step"], "batch_size": c.batch_size,
               "loss": steps.last["loss"], "eval": steps.last["eval"],
               "minutes": round((time.perf_counter() - t_start) / 60, 1), "config": json.loads(cfg.model_dump_json())}
    if steps.main:
        save_ip_adapter(installed_state(unet), run_dir / "ip-adapter.safetensors", base=a.init_from,
                        image_encoder=a.image_encoder)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
