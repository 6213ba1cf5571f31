"""danqing-tiny-motion: an AnimateDiff motion module trained for the frozen danqing-tiny on the
moving shapes world (``synthetic.motion``), saved as a diffusers ``MotionAdapter`` folder that
``models/motion/`` loads like any AnimateDiff module.

AnimateDiff's recipe (Guo et al. 2023) at the shapes world's size: temporal attention layers
(diffusers' ``MotionAdapter``: one per UNet block, sinusoidal frame positions) are inserted into
the frozen text-to-image UNet (``UNetMotionModel.from_unet2d``); the clip's frames are encoded
once by the frozen VAE, noised with independent noise per frame at one timestep per clip, and
only the motion layers learn to predict the noise, with the ordinary epsilon objective. Each
motion layer's output projection starts at zero (as AnimateDiff's do), so training starts from
the still model drawing every frame on its own. A share of the steps sees the empty caption, so
classifier-free guidance works.

The still model never read a motion word, and a motion layer reads no text: it sees the frames'
features, which the caption reaches only through the UNet's cross-attention. With
``model.text_lora_rank`` a LoRA on that cross-attention (keys, values, queries and outputs of
``attn2``) trains beside the motion layers, so "moving to the right" can leave a trace in the
features the motion layers read; it is written in kohya format, for ``<lora:NAME:1>`` beside the
module (AnimateDiff v3 pairs its module with an adapter LoRA the same way).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path

import torch

from danqing.errors import InvalidRequest
from danqing.synthetic.motion import MotionClip, heldout_clips, motion_caption, training_clips, training_pairs
from danqing.synthetic.trajectory import score_clip, summarise_clips
from danqing.training.base import encode_all
from danqing.training.conditioning import encode_texts
from danqing.training.data import render_batch
from danqing.training.runs import Log, load_float32, start_run, write_json_line


def new_adapter(unet, m, seed: int):
    """A ``MotionAdapter`` shaped for ``unet`` as ``m`` (``MotionModelConfig``) says, with every
    motion layer's output projection at zero: the motion UNet starts as the still UNet."""
    from diffusers import MotionAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = MotionAdapter(block_out_channels=tuple(unet.config.block_out_channels),
                                motion_layers_per_block=m.layers_per_block, motion_num_attention_heads=m.heads,
                                motion_norm_num_groups=m.norm_groups, motion_max_seq_length=m.max_frames,
                                use_motion_mid_block=m.mid_block)
    for name, module in adapter.named_modules():
        if name.endswith("proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return adapter


def clip_latents(comps, clips: list[MotionClip], size: int, log: Log) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior means, stds) of every frame, (N, F, C, h, w) each, float16 on the CPU."""
    frames = clips[0].frames
    t = time.perf_counter()
    images = render_batch([s for c in clips for s in c.scenes()], size)
    log(f"rendered {images.shape[0]} frames in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    with torch.no_grad():
        mean, std = encode_all(comps.vae, images, "cpu")
    log(f"encoded them in {time.perf_counter() - t:.0f} s")
    shape = (len(clips), frames, *mean.shape[1:])
    return mean.view(shape).half(), std.view(shape).half()


def clip_captions(clips: list[MotionClip], per_clip: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """(the distinct captions, an (N, per_clip) index into them): random phrasings, English and
    Chinese in turn."""
    rng = random.Random(f"motion-captions:{seed}")
    texts: dict[str, int] = {}
    index = [[texts.setdefault(motion_caption(c, ("en", "zh")[k % 2], rng), len(texts)) for k in range(per_clip)]
             for c in clips]
    return list(texts), torch.tensor(index)


def travel_hidden(comps, texts: list[str], frames: int) -> torch.Tensor:
    """(2U + 2, 77, D): rows 2u and 2u + 1 the encoded start and end keyframes of caption u written
    as prompt travel (``synthetic.motion.travel_prompt``), the last two the empty caption's."""
    from danqing.conditioning.travel import parse_travel
    from danqing.synthetic.motion import travel_prompt

    keys = []
    for text in texts:
        travel = travel_prompt(text, frames, size=None)  # a training caption's unsaid size stays unsaid
        if travel is None:
            raise InvalidRequest("data.travel", f"travel captions need straight-motion captions; got {text!r}")
        keys += [k for _, k in parse_travel(travel, frames)]
    return encode_texts(comps, keys + ["", ""])


def travel_context(hidden: torch.Tensor, which: torch.Tensor, frames: int) -> torch.Tensor:
    """(B * F, 77, D): clip b's frame f conditioned on (1 - f / (F - 1)) start + f / (F - 1) end
    of caption ``which[b]`` (rows of ``travel_hidden``), as ``conditioning.travel`` does at
    generation for keyframes 0 and F - 1."""
    w = torch.linspace(0, 1, frames).view(1, frames, 1, 1)
    start, end = hidden[2 * which][:, None], hidden[2 * which + 1][:, None]
    return ((1 - w) * start + w * end).reshape(-1, *hidden.shape[1:])


def motion_unet_for_training(comps, adapter):
    """The motion UNet whose only trainable parameters are the adapter's."""
    from diffusers import UNetMotionModel

    unet = UNetMotionModel.from_unet2d(comps.unet, adapter)
    unet.requires_grad_(False)
    params = []
    for name, p in unet.named_parameters():
        if "motion_modules" in name:
            p.requires_grad_(True)
            params.append(p)
    return unet, params


def add_text_lora(unet, rank: int) -> list[torch.nn.Parameter]:
    """peft LoRA adapters of ``rank`` (alpha = rank) on the spatial cross-attention projections
    of a motion UNet; returns their parameters (the only ones of them that train)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = sorted(n for n, _ in unet.named_modules() if "motion_modules" not in n and TEXT_PROJECTIONS.search(n))
    training = [p for p in unet.parameters() if p.requires_grad]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets),
                            unet)
    for p in training:  # peft leaves only its own adapters trainable: the motion layers train on
        p.requires_grad_(True)
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def _trained_file(name: str, field: str, bundled) -> Path:
    """A path, or the name of a bundled entry (``bundled()``: registry entries)."""
    if Path(name).exists():
        return Path(name)
    found = {e.name: e.path for e in bundled()}
    if name not in found:
        raise InvalidRequest(field, f"{name!r} is neither a path nor a bundled name ({', '.join(sorted(found)) or 'none'})")
    return Path(found[name])


def resume_adapter(adapter, name: str) -> None:
    """Load the trained ``MotionAdapter`` folder ``name`` (a path or a bundled module's name)
    into ``adapter``, which must have its shape."""
    from diffusers import MotionAdapter

    from danqing.models.registry import bundled_motion_entries

    trained = MotionAdapter.from_pretrained(str(_trained_file(name, "model.resume_from", bundled_motion_entries)))
    try:
        adapter.load_state_dict(trained.state_dict(), strict=True)
    except RuntimeError as e:
        raise InvalidRequest("model.resume_from", f"{name!r} is not shaped as [model] says: {str(e).splitlines()[0]}")


def text_lora_layers(unet, comps, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The kohya cross-attention LoRA ``name`` (a path or a bundled LoRA's name), as
    ``save_text_lora`` wrote it, per layer of ``unet`` it names: {module name: (down, up with
    alpha / rank folded in)}."""
    from safetensors.torch import load_file

    from danqing.customise import kohya
    from danqing.models.registry import bundled_lora_entries

    sd = load_file(str(_trained_file(name, "model.resume_lora", bundled_lora_entries)))
    out = {}
    for mod_name, _ in unet.named_modules():
        if "motion_modules" in mod_name or not TEXT_PROJECTIONS.search(mod_name):
            continue
        key = kohya.module_key("unet", mod_name, comps.family, dict(comps.unet.config))
        if f"{key}.lora_down.weight" in sd:
            down, up = sd[f"{key}.lora_down.weight"].float(), sd[f"{key}.lora_up.weight"].float()
            alpha = float(sd.get(f"{key}.alpha", torch.tensor(float(down.shape[0]))))
            out[mod_name] = (down, up * (alpha / down.shape[0]))
    if not out:
        raise InvalidRequest("model.resume_lora", f"{name!r} has no cross-attention layer of this model")
    return out


def resume_text_lora(unet, comps, name: str) -> None:
    """Load the kohya cross-attention LoRA ``name`` into the peft adapters of ``unet``."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    layers = text_lora_layers(unet, comps, name)
    loaded = {}
    for key, value in get_peft_model_state_dict(unet).items():
        mod, _, part = key.rpartition(".lora_")
        got = layers.get(mod)
        tensor = None if got is None else got[0] if part == "A.weight" else got[1]
        if tensor is None or tensor.shape != value.shape:
            raise InvalidRequest("model.resume_lora", f"{name!r} has no layer {mod} of shape {tuple(value.shape)}: "
                                                      "not a LoRA of this rank for this model")
        loaded[key] = tensor
    set_peft_model_state_dict(unet, loaded)


TEXT_PROJECTIONS = re.compile(r"\.attn2\.(to_q|to_k|to_v|to_out\.0)$")
MOTION_PROJECTIONS = re.compile(r"\.attn1\.(to_q|to_k|to_v|to_out\.0)$")


def merge_text_lora(unet, comps, name: str) -> int:
    """Fold the kohya cross-attention LoRA ``name`` into the weights of ``unet`` (a motion UNet,
    frozen), as ``<lora:NAME:1>`` does at sampling; returns the layers changed."""
    layers = text_lora_layers(unet, comps, name)
    with torch.no_grad():
        for mod_name, (down, up) in layers.items():
            unet.get_submodule(mod_name).weight += up @ down
    return len(layers)


def add_motion_lora(unet, rank: int) -> list[torch.nn.Parameter]:
    """peft LoRA adapters of ``rank`` (alpha = rank) on the motion layers' temporal attention
    projections (AnimateDiff's MotionLoRA); every other weight is frozen. Returns their parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    targets = sorted(n for n, _ in unet.named_modules() if "motion_modules" in n and MOTION_PROJECTIONS.search(n))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets),
                            unet)
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def save_motion_lora(unet, path: Path, metadata: dict[str, str]) -> Path:
    """The motion LoRA of a motion UNet in diffusers' layout (``unet.<layer>.lora_A.weight``),
    which ``<lora:NAME:1>`` in a video prompt reads (``customise.motion_lora``)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from danqing.files import atomic_save

    sd = {f"unet.{k}": v.detach().float().contiguous() for k, v in get_peft_model_state_dict(unet).items()
          if "lora_" in k and "motion_modules" in k}
    return atomic_save(path, lambda p: save_file(sd, str(p), metadata=metadata), overwrite=True)


def save_text_lora(unet, comps, path: Path, rank: int, metadata: dict[str, str]) -> Path:
    """The cross-attention LoRA of a motion UNet as a kohya file for the still UNet (the motion
    UNet's spatial modules have the still UNet's names)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from danqing.files import atomic_save
    from danqing.training.networks import kohya_state_dict

    sd = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(unet).items() if "lora_" in k}
    kohya = kohya_state_dict({"unet": sd}, float(rank), comps.family, dict(comps.unet.config))
    return atomic_save(path, lambda p: save_file(kohya, str(p), metadata=metadata), overwrite=True)


def generate_clips(comps, unet, clips: list[MotionClip], *, lang: str, steps: int, seed: int = 6000,
                   travel: bool = False) -> list[list]:
    """Clip i of ``clips`` generated from its canonical caption (``travel``: as prompt travel) with
    seed ``seed + i`` (DPM++ 2M, CFG 7, the clip's size and frames): lists of PIL pictures."""
    from danqing.passes.video import decode_clips, run_video
    from danqing.request_video import VideoRequest
    from danqing.synthetic.motion import travel_prompt

    out = []
    unet.eval()
    for i, c in enumerate(clips):
        prompt = travel_prompt(motion_caption(c, lang), c.frames) if travel else motion_caption(c, lang)
        req = VideoRequest(prompt=prompt, frames=c.frames, width=64, height=64, steps=steps,
                           seed=seed + i, sampler="DPM++ 2M", cfg_scale=7.0)
        with torch.no_grad():
            run = run_video(comps, unet, req, device=torch.device("cpu"), dtype=torch.float32)
            out.append(decode_clips(comps.vae, run.latents[0])[0])
    return out


def clip_scores(frames_per_clip: list[list], clips: list[MotionClip]) -> dict:
    """The trajectory summary of generated clips against what their captions asked."""
    return summarise_clips([score_clip(f, c.colour, c.shape, c.direction) for f, c in zip(frames_per_clip, clips)])


HIGH_NOISE = 0.7  # the high-noise end starts at this share of the timesteps


def draw_timesteps(n_train: int, batch: int, high_share: float, g: torch.Generator) -> torch.Tensor:
    """One timestep per clip: uniform over [0, n_train), except the first ``round(high_share *
    batch)`` clips, drawn from the high-noise end [0.7 n_train, n_train)."""
    t = torch.randint(n_train, (batch,), generator=g)
    k = round(high_share * batch)
    if k:
        t[:k] = torch.randint(int(HIGH_NOISE * n_train), n_train, (k,), generator=g)
    return t


def batch_indices(n_clips: int, batch: int, pairs: bool, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """(the batch's clip indices, clips per noise draw): ``batch`` random clips, or with ``pairs``
    ``batch / 2`` random twin pairs (clips 2k and 2k + 1), twins side by side."""
    if not pairs:
        return torch.randint(n_clips, (batch,), generator=g), 1
    k = torch.randint(n_clips // 2, (batch // 2,), generator=g)
    return torch.stack([2 * k, 2 * k + 1], dim=1).flatten(), 2


def loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-clip weights of the epsilon loss, ``max(1, min(1/SNR(t), cap))``: with them a clip at
    SNR < 1 counts its error in the picture (x0 = its epsilon error / SNR) up to ``cap``."""
    a = alphas_cumprod[t].double()
    return (1 - a).div(a).clamp(1.0, cap).float()


def train_motion(cfg, *, log: Log = print) -> dict:
    """Train a motion module for ``cfg.model.init_from`` as ``cfg`` (``MotionTrainConfig``) says;
    writes the ``MotionAdapter`` folder to ``OUTPUT_DIR/model`` and returns the summary."""
    from diffusers import DDPMScheduler

    d, m, tr, out = cfg.data, cfg.model, cfg.train, cfg.output
    run_dir = start_run(out.output_dir, resume=False, num_threads=out.num_threads)
    (run_dir / "eval.jsonl").unlink(missing_ok=True)
    comps, _, _ = load_float32(m.init_from)
    if tr.mirror_pairs and d.kinds != ["line"]:
        raise InvalidRequest("train.mirror_pairs", "contrast pairs are straight lines; set data.kinds = [\"line\"]")
    clips = (training_pairs(d.n_clips, d.seed, d.frames, d.directions) if tr.mirror_pairs
             else training_clips(d.n_clips, d.seed, d.frames, d.directions, d.kinds))
    mean, std = clip_latents(comps, clips, d.size, log)
    texts, caption_index = clip_captions(clips, d.captions_per_clip, d.seed)
    hidden = (travel_hidden(comps, texts, d.frames) if d.travel     # (2U + 2, 77, D): start, end keyframes
              else encode_texts(comps, texts + [""]))               # (U + 1, 77, D); the last: empty
    log(f"{len(clips)} clips of {d.frames} frames, {len(texts)} distinct captions")
    adapter = new_adapter(comps.unet, m, tr.seed)
    if m.resume_from:
        resume_adapter(adapter, m.resume_from)
        log(f"motion layers from {m.resume_from}")
    unet, params = motion_unet_for_training(comps, adapter)
    log(f"motion layers: {sum(p.numel() for p in params) / 1e6:.2f} M parameters")
    if m.motion_lora_rank:  # a MotionLoRA for a trained module (and its cross-attention LoRA, folded in)
        if m.resume_lora:
            log(f"cross-attention LoRA {m.resume_lora} folded in: {merge_text_lora(unet, comps, m.resume_lora)} layers")
        params = add_motion_lora(unet, m.motion_lora_rank)
        log(f"motion LoRA: rank {m.motion_lora_rank}, {sum(p.numel() for p in params) / 1e6:.3f} M parameters")
    elif m.text_lora_rank:
        lora = add_text_lora(unet, m.text_lora_rank)
        log(f"cross-attention LoRA: rank {m.text_lora_rank}, {sum(p.numel() for p in lora) / 1e6:.3f} M parameters")
        params += lora
        if m.resume_lora:
            resume_text_lora(unet, comps, m.resume_lora)
            log(f"cross-attention LoRA from {m.resume_lora}")
    noise_sched = DDPMScheduler.from_config(comps.scheduler_config)
    opt = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)

    def factor(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < tr.warmup_steps:
            return (step + 1) / tr.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - tr.warmup_steps) / max(1, tr.steps - tr.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    eval_set = heldout_clips(out.eval_clips, frames=d.frames, directions=d.directions)
    scale = comps.vae.config.scaling_factor
    g = torch.Generator().manual_seed(tr.seed)
    t0, avg, history = time.perf_counter(), None, []
    for step in range(tr.steps):
        unet.train()
        idx, twins = batch_indices(len(clips), tr.batch_size, tr.mirror_pairs, g)
        x0 = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=g)) * scale
        x0 = x0.permute(0, 2, 1, 3, 4)                               # (B, C, F, h, w)
        noise = torch.randn((len(idx) // twins, *x0.shape[1:]), generator=g).repeat_interleave(twins, dim=0)
        t = draw_timesteps(noise_sched.config.num_train_timesteps, len(idx) // twins, tr.high_noise_share, g)
        t = t.repeat_interleave(twins)
        noisy = noise_sched.add_noise(x0, noise, t)
        which = caption_index[idx, torch.randint(d.captions_per_clip, (tr.batch_size,), generator=g)]
        dropped = (torch.rand(len(idx) // twins, generator=g) < d.caption_dropout).repeat_interleave(twins)
        which[dropped] = len(texts)
        context = (travel_context(hidden, which, d.frames) if d.travel  # the UNet attends per frame
                   else hidden[which].repeat_interleave(d.frames, dim=0))
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        per_clip = (pred - noise).pow(2).mean(dim=(1, 2, 3, 4))
        loss = (per_clip * loss_weights(noise_sched.alphas_cumprod, t, tr.x0_weight_max)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
        opt.step()
        sched.step()
        value = float(loss.detach())
        avg = value if avg is None else 0.98 * avg + 0.02 * value
        done = step + 1
        if done % out.log_every == 0 or done == tr.steps:
            log(f"step {done}/{tr.steps} loss {avg:.4f} {done / (time.perf_counter() - t0):.2f} it/s")
        if done % out.eval_every == 0 or done == tr.steps:
            row = {"step": done, "loss": round(avg, 4), "minutes": round((time.perf_counter() - t0) / 60, 2)}
            for lang in ("en", "zh"):
                got = generate_clips(comps, unet, eval_set, lang=lang, steps=out.eval_steps, travel=d.travel)
                row.update({f"{k}_{lang}": v for k, v in clip_scores(got, eval_set).items()})
            _save(unet, comps, run_dir, m)  # the latest module, for a look while it trains
            history.append(row)
            log(f"eval {json.dumps(row)}")
            write_json_line(run_dir / "eval.jsonl", row)
    summary = {"steps": tr.steps, "minutes": round((time.perf_counter() - t0) / 60, 2),
               "params": sum(p.numel() for p in params), **history[-1]}
    log(f"wrote {run_dir / (f'{m.name}.safetensors' if m.motion_lora_rank else 'model')}: {json.dumps(summary)}")
    return summary


def _save(unet, comps, run_dir: Path, m) -> None:
    """A motion LoRA run's LoRA as ``run_dir/NAME.safetensors``; else the motion module as
    ``run_dir/model`` (a diffusers ``MotionAdapter`` folder of the
    config's shape: diffusers' own ``save_motion_modules`` writes the UNet's norm groups in place
    of the module's) and, when one trains, the cross-attention LoRA as ``run_dir/NAME.safetensors``."""
    if m.motion_lora_rank:  # the module is resume_from's, unchanged: only the LoRA is new
        save_motion_lora(unet, run_dir / f"{m.name}.safetensors",
                         {"ss_network_dim": str(m.motion_lora_rank), "ss_network_alpha": str(m.motion_lora_rank),
                          "danqing_use": f"a motion LoRA of {m.resume_from}: <lora:{m.name}:1>"})
        return
    adapter = new_adapter(comps.unet, m, 0)
    adapter.load_state_dict({k: v for k, v in unet.state_dict().items() if "motion_modules" in k}, strict=True)
    adapter.save_pretrained(str(run_dir / "model"))
    if m.text_lora_rank:
        save_text_lora(unet, comps, run_dir / f"{m.name}.safetensors", m.text_lora_rank,
                       {"ss_network_dim": str(m.text_lora_rank), "ss_network_alpha": str(m.text_lora_rank),
                        "danqing_use": f"with the motion module {m.name}: <lora:{m.name}:1>"})


__all__ = ["add_motion_lora", "merge_text_lora", "text_lora_layers", "save_motion_lora", "batch_indices", "draw_timesteps", "loss_weights", "resume_adapter", "resume_text_lora", "new_adapter", "clip_latents", "clip_captions", "motion_unet_for_training", "add_text_lora",
           "save_text_lora", "generate_clips", "clip_scores", "train_motion"]
