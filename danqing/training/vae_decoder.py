"""Fine-tune a model's VAE decoder with its encoder frozen (Stable Diffusion's ft-MSE VAE recipe):
the latents every part of the model was trained on stay exactly as they were, so the base model,
its LoRAs and ControlNets work unchanged with the new decoder, which only draws back more of
what the latents hold.

danqing-tiny-portraits' VAE is made this way. At 64 pixels the model's first decoder drew a
closed mouth (2.5 pixels high) and an open one (5 pixels) nearly alike: a round trip of the
renderer's talking frames read 0.064 / 0.068 / 0.076 of the picture at openness 0 / 0.5 / 1,
where the renderer drew 0.039 / 0.062 / 0.078. The encoder's latents do tell them apart; the
decoder, trained on whole pictures, blurred the difference away. Trained on the portrait world's
talking frames with the loss weighted inside the mouth box, it draws the mouth the latents hold
(and the eyes, the head's outline and the background colour better too).

    danqing train vae-decoder --config configs/train/danqing-tiny-portraits-vae.toml
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from danqing.files import atomic_save_dir
from danqing.synthetic.portraits import Portrait, render_portrait, sample_portrait, split_people, values
from danqing.synthetic.portraits_mouth import mouth_box_mask, mouth_height, talking_frame
from danqing.training.base import new_accelerator
from danqing.training.config import DecoderTrainConfig
from danqing.training.runs import StepLog, load_float32, my_rows, optimiser_step, resume_step, start_run

Log = Callable[[str], None]


class _Decoder(torch.nn.Module):
    """The trainable half of a VAE: latents -> pixels in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder
        self.vae = [vae]  # not a submodule: its encoder stays out of the optimiser and checkpoints

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae[0].decode(z).sample


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)


def talking_pictures(n: int, size: int, talking_share: float, rng: random.Random) -> torch.Tensor:
    """``n`` pictures (n, 3, size, size) in [-1, 1] of the portrait world's training people: a
    ``talking_share`` of talking frames (flat, any pose, openness and width drawn at random),
    the rest portraits of every style."""
    who = split_people("train")
    out = []
    for _ in range(n):
        if rng.random() < talking_share:
            p = Portrait(rng.choice(who), "neutral", rng.choice(values("clothing")), rng.choice(values("pose")),
                         rng.choice(values("background")), "flat", rng.randrange(2**31))
            out.append(_pixels(talking_frame(p, rng.random(), rng.uniform(0.7, 1.2), size)))
        else:
            out.append(_pixels(render_portrait(sample_portrait(rng, "train"), size)))
    return torch.stack(out)


def shape_pictures(n: int, size: int, rng: random.Random) -> torch.Tensor:
    """``n`` training scenes of the shapes world (1-3 objects, every background), (n, 3, size,
    size) in [-1, 1]."""
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import sample_scene

    return torch.stack([_pixels(render(sample_scene(rng, "train"), size)) for _ in range(n)])


def edge_strength(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) pictures -> (n, 1, h, w) Sobel gradient magnitude of their grey, scaled to
    0-1 per picture (0 where a picture is flat)."""
    grey = x.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    g = torch.nn.functional.pad(grey, (1, 1, 1, 1), mode="replicate")
    mag = (torch.nn.functional.conv2d(g, kx) ** 2 + torch.nn.functional.conv2d(g, kx.transpose(2, 3)) ** 2).sqrt()
    top = mag.amax(dim=(2, 3), keepdim=True)
    return torch.where(top > 0, mag / top.clamp_min(1e-8), torch.zeros_like(mag))


def _round_trip(vae, x: torch.Tensor) -> list:
    """Pictures (n, 3, h, w) in [-1, 1] encoded (posterior mean) and decoded by ``vae``: RGB pictures."""
    from PIL import Image

    y = vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean).sample.float().cpu()
    px = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in px]


@torch.no_grad()
def shapes_round_trip(vae, n: int = 200, size: int = 64) -> dict:
    """The evaluator's ``n`` held-out scenes rendered and sent through ``vae`` (encode,
    posterior mean, decode), read back against their captions: the evaluator's summary (object,
    shape, ...) and the share of each shape's objects found ({"by_shape": {"star": ...}})."""
    from danqing.synthetic.evaluate import score, summarise
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import eval_scenes

    scenes = eval_scenes(n)
    found: dict[str, list[float]] = {}
    scores = []
    for i in range(0, n, 50):
        part = scenes[i:i + 50]
        pictures = _round_trip(vae, torch.stack([_pixels(render(s, size)) for s in part]))
        for scene, picture in zip(part, pictures):
            sc = score(picture, scene.spec)
            scores.append(sc)
            for o in scene.objects:
                found.setdefault(o.shape, []).append(sc.object)
    out = {k: v for k, v in summarise(scores).items() if k in ("object", "colour", "shape", "count", "position")}
    return {**out, "by_shape": {k: round(float(np.mean(v)), 4) for k, v in sorted(found.items())}}


@torch.no_grad()
def mouth_round_trip(vae, n: int = 12, size: int = 64, seed: int = 5) -> dict:
    """The renderer's talking frames of ``n`` held-out people at openness 0, 0.5 and 1 through
    ``vae`` (encode, posterior mean, decode), their mouth heights read by the portrait reader:
    {"heights": mean height at each openness, "r": Pearson r of height and openness}."""
    rng = random.Random(seed)
    who = split_people("heldout")
    rows = []
    for _ in range(n):
        p = Portrait(rng.choice(who), "neutral", rng.choice(values("clothing")), "front",
                     rng.choice(values("background")), "flat", rng.randrange(2**31))
        x = torch.stack([_pixels(talking_frame(p, o, size=size)) for o in (0.0, 0.5, 1.0)])
        rows.append([mouth_height(f) for f in _round_trip(vae, x)])
    a = np.array(rows)
    r = float(np.corrcoef(a.ravel(), np.tile([0.0, 0.5, 1.0], n))[0, 1]) if a.std() > 0 else 0.0
    return {"heights": [round(float(h), 4) for h in a.mean(0)], "r": round(r, 4)}


def train_vae_decoder(cfg: DecoderTrainConfig, *, resume: bool = False, log: Log = print) -> dict:
    """Train and export ``run.output_dir/vae`` (a diffusers ``AutoencoderKL`` folder for
    models/VAE/: the base model's encoder, the new decoder) and ``summary.json``.

    ``resume``: continue from the newest checkpoint of ``run.output_dir/checkpoints``.
    """
    c, r, d = cfg.unet, cfg.run, cfg.data
    run_dir = start_run(r.output_dir, resume=resume, num_threads=r.num_threads)
    t_start = time.perf_counter()
    comps, _, _ = load_float32(cfg.decoder.init_from)
    vae = comps.vae
    shapes = d.source == "world:shapes"
    if shapes:  # the shapes world: new training scenes, read back by the evaluator
        def evaluate():
            return shapes_round_trip(vae, cfg.decoder.eval_scenes, d.size) if cfg.decoder.eval_scenes else None

        def pictures(rng):
            return shape_pictures(c.batch_size, d.size, rng)

        weight = torch.ones(1, 1, d.size, d.size)
        log("new shapes scenes every step")
    else:
        def evaluate():
            return mouth_round_trip(vae, cfg.decoder.eval_people, d.size) if cfg.decoder.eval_people else None

        def pictures(rng):
            return talking_pictures(c.batch_size, d.size, d.talking_share, rng)

        weight = 1 + d.mouth_weight * torch.from_numpy(np.asarray(mouth_box_mask(d.size), np.float32) / 255)[None, None]
        log(f"new pictures every step ({d.talking_share:.0%} talking frames), mouth box weighted {1 + d.mouth_weight:g}x")
    before = evaluate()
    log(f"{cfg.decoder.init_from}'s decoder: round trip {before}")

    acc = new_accelerator(r.mixed_precision)
    model = _Decoder(vae)
    model.requires_grad_(True)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)))
    model, opt, sched = acc.prepare(model, opt, sched)
    start = resume_step(acc, run_dir, log) if resume else 0
    rows = my_rows(acc, c.batch_size)
    steps = StepLog("vae-decoder", c.steps, start, log, run_dir, r, acc)
    result = before
    for step in range(start, c.steps):
        # the step's pictures, drawn from the step's own seed (a resumed run draws the same; each
        # process of a multi-process run takes its rows), encoded by the frozen encoder
        x = pictures(random.Random(f"{r.seed}:{step}"))[rows].to(acc.device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
            w = weight.to(acc.device) + d.edge_weight * edge_strength(x) if d.edge_weight else weight.to(acc.device)
        loss = ((model(z) - x) ** 2 * w).mean()
        optimiser_step(acc, loss, params, opt, sched, c.max_grad_norm)
        final = steps.done(step + 1, loss)
        if steps.main and before is not None and ((step + 1) % r.eval_every == 0 or final):
            result = evaluate()
            log(f"eval step {step + 1}: round trip {result}")
            steps.evaluated(step + 1, result, {"round_trip" if shapes else "mouth_round_trip": result})
        if steps.stopping():
            break
    vae.requires_grad_(False)
    acc.wait_for_everyone()
    summary = {"kind": "vae-decoder", "init_from": cfg.decoder.init_from, "steps": steps.last["step"],
               "batch_size": c.batch_size, "loss": steps.last["loss"],
               **({"round_trip_before": before, "round_trip": result} if shapes
                  else {"mouth_round_trip_before": before, "mouth_round_trip": result}), "minutes": round((time.perf_counter() - t_start) / 60, 1),
               "config": json.loads(cfg.model_dump_json())}
    if steps.main:
        atomic_save_dir(Path(run_dir) / "vae", vae.save_pretrained, overwrite=True)
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        log(f"done: {Path(run_dir) / 'vae'}")
    return summary
