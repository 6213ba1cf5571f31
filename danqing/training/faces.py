"""danqing-portrait-faces: the portrait world's face recogniser (``faces.world_backend``), trained
as photo face recognisers are -- CosFace (Wang et al. 2018): a cosine classifier over the
training people, with a margin -- on rendered pictures of the 1,610 training-split people in
other clothes, expressions, poses, backgrounds and renderings.

It is measured on people it never saw (the held-out split): how close two pictures of one
person are against two of different people (the equal-error threshold, kept in the model's
config as ``same_person_distance``), and whether the similarity falls as people differ in more
identity attributes (Spearman's rho), which is what ranking by similarity needs.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from danqing.faces.world_backend import build_net, context_crop, embed_crops, framed_face
from danqing.synthetic.portraits import IDENTITY, pictures_of, portraits, render_portrait, split_people
from danqing.synthetic.render import degrade

Log = Callable[[str], None]


def crops(pictures: list, size: int, context: float) -> np.ndarray:
    """The recogniser's crops (N, size, size, 3) uint8 of rendered portraits (or PIL pictures)."""
    out = []
    for p in pictures:
        img = np.asarray(p.convert("RGB") if isinstance(p, Image.Image) else render_portrait(p, size))
        out.append(context_crop(img, framed_face(img.shape[1], img.shape[0]), size, context))
    return np.stack(out)


def _held_out_sets(n_people: int, per_person: int, size: int, seed: int = 7):
    """(people, their pictures (N,) as PIL, whose (N,)): held-out people, ``per_person`` pictures
    each in varied styles, every other one blurred and noised."""
    rng = random.Random(f"faces-eval:{seed}")
    who = rng.sample(list(split_people("heldout")), n_people)
    pics, owner = [], []
    for i, p in enumerate(who):
        for j, q in enumerate(pictures_of(p, per_person, seed=seed)):
            img = render_portrait(q, size)
            pics.append(degrade(img, rng) if (i + j) % 2 else img)
            owner.append(i)
    return who, pics, np.array(owner)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def verification(embed: Callable[[list], np.ndarray], n_people: int = 120, size: int = 64, seed: int = 7) -> dict:
    """``embed`` (PIL pictures -> unit embeddings) on held-out people, 4 pictures each: the mean
    cosine of same-person and of different-person pairs, the equal-error threshold and its
    accuracy, rank-1 identification (the nearest other picture is the same person's), and
    Spearman's rho between the similarity and how many identity attributes two people share."""
    who, pics, owner = _held_out_sets(n_people, 4, size, seed)
    e = embed(pics)
    sim = e @ e.T
    iu = np.triu_indices(len(pics), 1)
    s, same = sim[iu], (owner[:, None] == owner[None, :])[iu]
    shared = np.array([[sum(getattr(a, k) == getattr(b, k) for k in IDENTITY) for b in who] for a in who])
    shared_pairs = shared[owner[:, None], owner[None, :]][iu]
    ts = np.quantile(s, np.linspace(0.01, 0.99, 197))
    far = np.array([(s[~same] >= t).mean() for t in ts])
    frr = np.array([(s[same] < t).mean() for t in ts])
    k = int(np.argmin(np.abs(far - frr)))
    np.fill_diagonal(sim, -2)
    return {"people": n_people, "pictures": len(pics), "same": round(float(s[same].mean()), 4),
            "different": round(float(s[~same].mean()), 4), "threshold": round(float(ts[k]), 4),
            "eer": round(float((far[k] + frr[k]) / 2), 4),
            "rank1": round(float((owner[sim.argmax(1)] == owner).mean()), 4),
            "rho_shared": round(_spearman(s, shared_pairs), 4)}


def _cosface(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    logits = F.normalize(emb) @ F.normalize(weight).T
    logits = logits - margin * F.one_hot(labels, logits.shape[1])
    return F.cross_entropy(scale * logits, labels)


def _shifted(x: torch.Tensor, g: torch.Generator, shift: int) -> torch.Tensor:
    """Each picture moved by up to ``shift`` pixels each way (edges repeated)."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * shift + 1, (n,), generator=g), torch.randint(0, 2 * shift + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def export(net, cfg, folder: Path, summary: dict) -> Path:
    """The model folder the backend loads: ``model.safetensors`` and ``config.json``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
    m = cfg.model
    ver = summary["heldout"]
    config = {"widths": list(m.widths), "dim": m.dim, "size": cfg.data.size, "context": m.context,
              "same_person_distance": round(1 - ver["threshold"], 4),
              "trained": {"steps": summary["steps"], "images": summary["images"], "people": summary["people"],
                          "heldout": ver}}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return folder


def train_faces(cfg, *, log: Log = print) -> dict:
    """Train danqing-portrait-faces as ``cfg`` (``FacesTrainConfig``) says; writes the model
    folder to ``cfg.output.output_dir/model`` and returns the summary (with the held-out figures)."""
    from danqing.training.clip import soften
    from danqing.training.data import render_batch

    out, tr, m, d = cfg.output, cfg.train, cfg.model, cfg.data
    if out.num_threads:
        torch.set_num_threads(out.num_threads)
    run_dir = Path(out.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_people = {p: i for i, p in enumerate(split_people("train"))}
    ps = portraits(d.seed, d.n_images, "train")
    images = render_batch(ps, d.size).permute(0, 2, 3, 1).numpy()
    x_all = torch.from_numpy(np.stack([context_crop(im, framed_face(d.size, d.size), d.size, m.context) for im in images]))
    labels = torch.tensor([train_people[p.person] for p in ps])
    log(f"data: {len(ps)} portraits of {len(set(labels.tolist()))} people ({time.perf_counter() - t0:.1f} s)")
    torch.manual_seed(tr.seed)
    net = build_net(tuple(m.widths), m.dim, d.size)
    weight = torch.nn.Parameter(torch.randn(len(train_people), m.dim) * 0.01)
    log(f"model: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW([*net.parameters(), weight], lr=tr.lr, weight_decay=tr.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tr.warmup_steps)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / tr.steps))))
    g = torch.Generator().manual_seed(tr.seed)

    def embed(pics: list) -> np.ndarray:
        return embed_crops(net.eval(), crops(pics, d.size, m.context))

    avg, history = None, []
    for step in range(tr.steps):
        net.train()
        idx = torch.randint(len(ps), (tr.batch_size,), generator=g)
        x = x_all[idx].permute(0, 3, 1, 2).float() / 255
        x = _shifted(soften(x, g, d.augment), g, d.shift) * 2 - 1
        loss = _cosface(net(x), weight, labels[idx], m.margin, m.scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        avg = value if avg is None else 0.98 * avg + 0.02 * value
        done = step + 1
        if done % out.log_every == 0 or done == tr.steps:
            log(f"step {done}/{tr.steps} loss {avg:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"({(time.perf_counter() - t0) / 60:.1f} min)")
        if done % out.eval_every == 0 or done == tr.steps:
            ver = verification(embed, out.eval_people, d.size)
            history.append({"step": done, **ver})
            log(f"held-out people at step {done}: {json.dumps(ver)}")
    summary = {"steps": tr.steps, "images": len(ps), "people": len(train_people),
               "minutes": round((time.perf_counter() - t0) / 60, 1), "heldout": history[-1], "history": history}
    export(net.eval(), cfg, run_dir / "model", summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


__all__ = ["crops", "export", "train_faces", "verification"]
