"""danqing-tiny-clip: a contrastive image-text model of the shapes world, CLIP's recipe.

Two encoders -- a ViT over 8x8 patches of the 64x64 picture and a causal text transformer over
CLIP's BPE tokens -- project into one space; the loss is CLIP's symmetric InfoNCE over the batch
with a learned temperature (Radford et al. 2021). Each picture's row of logits also holds
captions of its own scene with one attribute changed (another colour or shape of one object,
another position, relation or layout): hard negatives, as NegCLIP (Yuksekgonul et al. 2023)
adds them, because a batch of random scenes rarely asks the model to bind a colour to its shape.

The result is a transformers ``CLIPModel`` folder (``config.json``, ``model.safetensors``,
``preprocessor_config.json``), so ``CLIPModel``, ``CLIPVisionModelWithProjection`` and
``CLIPTextModel`` load it; its tokenizer is OpenAI CLIP's BPE (``models.tokenizer``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from danqing.errors import InvalidRequest
from danqing.models.clip_model import CLIP_MEAN, CLIP_STD, ClipModel, clip_folder, projected
from danqing.synthetic.captions import caption
from danqing.synthetic.scenes import Scene, change_kind, eval_scenes, one_attribute_changes, place_twin, scenes

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# The retrieval test: pick a scene's caption among captions that change one attribute
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalItem:
    """One held-out scene and its candidates: the scene itself first, then the distractors."""

    scene: Scene
    candidates: tuple[Scene, ...]


def retrieval_items(n: int = 200, distractors: int = 9, seed: int = 0) -> list[RetrievalItem]:
    """The held-out scenes of the evaluator (``eval_scenes``), each with ``distractors`` scenes
    that differ in one attribute of their caption (drawn with ``seed``)."""
    rng = random.Random(f"retrieval:{seed}")
    out = []
    for sc in eval_scenes(n):
        changes = one_attribute_changes(sc)
        out.append(RetrievalItem(sc, (sc, *rng.sample(changes, min(distractors, len(changes))))))
    return out


@torch.no_grad()
def retrieval_scores(clip: ClipModel, items: list[RetrievalItem], images: torch.Tensor, lang: str) -> dict:
    """How the model ranks each item's own canonical caption (in ``lang``) against its
    distractors: ``top1`` (the share of items where it ranks first) and, per kind of change
    (colour, shape, place), the share of distractors it beats. ``images`` (N, 3, H, W) uint8 are
    the items' pictures."""
    feats = clip.image_features(images)
    right, won, seen = 0, {}, {}
    for f, item in zip(feats, items):
        sims = clip.text_features([caption(c, lang) for c in item.candidates]) @ f
        right += int(torch.argmax(sims) == 0)
        for c, v in zip(item.candidates[1:], sims[1:]):
            kind = change_kind(item.scene, c)
            seen[kind] = seen.get(kind, 0) + 1
            won[kind] = won.get(kind, 0) + int(sims[0] > v)
    return {"top1": right / len(items), **{f"beats_{k}": round(won[k] / seen[k], 4) for k in sorted(seen)}}


# ---------------------------------------------------------------------------------------------
# Training data: pictures, phrasings and their hard negatives, tokenized once
# ---------------------------------------------------------------------------------------------
@dataclass
class ClipData:
    images: torch.Tensor   # (N, 3, S, S) uint8
    ids: torch.Tensor      # (N, K, 1 + H, 77) int32: per phrasing, the caption then H negatives


def build_data(cfg, tokenizer, log: Log = print) -> ClipData:
    """Render the scenes and write K phrasings of each (English and Chinese in turn), each with
    H captions of one-attribute changes phrased by the same random choices."""
    from danqing.synthetic.scenes import sample_scene
    from danqing.training.data import render_batch

    d = cfg.data
    t = time.perf_counter()
    if d.split == "train":
        sc = scenes(d.seed, d.n_images, "train")
    else:  # every pair: a third of the scenes from the held-out pairs' split
        rng = random.Random(f"clip-all:{d.seed}")
        sc = [sample_scene(rng, "heldout" if i % 3 == 2 else "train") for i in range(d.n_images)]
    if d.place_twins:  # the twins keep their scene's seed, so their captions are phrased alike
        moves = random.Random(f"clip-twins:{d.seed}")
        sc += [place_twin(s, moves) for s in sc]
    images = render_batch(sc, d.size)
    texts: list[str] = []
    pick = random.Random(f"clip-negatives:{d.seed}")
    for s in sc:
        changes = one_attribute_changes(s)
        for k in range(d.captions_per_image):
            lang = ("en", "zh")[k % 2]
            phrasing = f"{s.seed}:{k}"
            own = caption(s, lang, random.Random(phrasing))
            negatives = []
            for c in negative_order(s, changes, pick, d.negative_kinds):
                text = caption(c, lang, random.Random(phrasing))
                # a phrasing that leaves the changed attribute unsaid ("a red circle" for a
                # circle on the left) gives the change the same text: not a negative
                if text != own and text not in negatives:
                    negatives.append(text)
                if len(negatives) == d.hard_negatives:
                    break
            negatives += [negatives[i % len(negatives)] for i in range(d.hard_negatives - len(negatives))]
            texts += [own, *negatives]
    unique = list(dict.fromkeys(texts))
    rows = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    where = {c: i for i, c in enumerate(unique)}
    ids = rows[torch.tensor([where[c] for c in texts])].to(torch.int32)
    ids = ids.view(len(sc), d.captions_per_image, 1 + d.hard_negatives, 77)
    log(f"data: {len(sc)} scenes, {len(texts)} captions ({len(unique)} distinct) in {time.perf_counter() - t:.1f} s")
    return ClipData(images, ids)


def negative_order(scene: Scene, changes: list[Scene], rng: random.Random, kinds: str) -> list[Scene]:
    """The order in which a scene's one-attribute changes are taken as hard negatives: shuffled
    ("uniform"), or ("even") shuffled within each kind of change (colour, shape, place) and then
    taken from the kinds in turn, in a shuffled order of kinds, so the few place changes come as
    often as the many colour ones."""
    order = rng.sample(changes, len(changes))
    if kinds == "uniform":
        return order
    groups: dict[str, list[Scene]] = {}
    for c in order:
        groups.setdefault(change_kind(scene, c), []).append(c)
    turn = rng.sample(sorted(groups), len(groups))
    out = []
    for i in range(max((len(v) for v in groups.values()), default=0)):
        out += [groups[k][i] for k in turn if i < len(groups[k])]
    return out


def trim(ids: torch.Tensor) -> torch.Tensor:
    """Token rows cut after the batch's longest caption: the text model is causal and reads its
    features at each row's first end token, so the padding after it changes nothing."""
    length = int((ids != ids[:, -1:]).sum(1).max()) + 2 if ids.shape[0] else 1
    return ids[:, : min(ids.shape[1], max(length, 2))].long()


def soften(x: torch.Tensor, g: torch.Generator, share: float) -> torch.Tensor:
    """Blur (sigma 0-1.2 px) and noise (std 0-0.04) a random ``share`` of pictures in [0, 1]:
    generated pictures come out of a VAE, softer than the renders."""
    n = x.shape[0]
    which = torch.rand(n, generator=g) < share
    if not which.any():
        return x
    sigma = torch.rand(n, generator=g) * 1.2 + 1e-3
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)                                    # (n, 5)
    c = x.shape[1]
    y = x.reshape(1, n * c, *x.shape[2:])
    kh = k.repeat_interleave(c, 0).view(n * c, 1, 1, 5)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kh, groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kh.transpose(2, 3), groups=n * c)
    y = y.view_as(x) + torch.randn(x.shape, generator=g) * (torch.rand(n, generator=g) * 0.04).view(-1, 1, 1, 1)
    return torch.where(which.view(-1, 1, 1, 1), y.clamp(0, 1), x)


# ---------------------------------------------------------------------------------------------
# The model and its loss
# ---------------------------------------------------------------------------------------------
def build_model(cfg, seed: int):
    """A randomly initialised transformers ``CLIPModel`` of ``cfg.model``'s shape."""
    from transformers import CLIPConfig, CLIPModel

    m = cfg.model
    text = dict(vocab_size=49408, hidden_size=m.text_hidden, intermediate_size=4 * m.text_hidden,
                num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads, max_position_embeddings=77,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=m.projection_dim)
    vision = dict(image_size=cfg.data.size, patch_size=m.patch_size, hidden_size=m.vision_hidden,
                  intermediate_size=4 * m.vision_hidden, num_hidden_layers=m.vision_layers,
                  num_attention_heads=m.vision_heads, projection_dim=m.projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=m.projection_dim))
    if m.vision_positions == "sincos":
        with torch.no_grad():
            side = cfg.data.size // m.patch_size
            table = model.vision_model.embeddings.position_embedding.weight
            table[0] = 0.0  # the class token's own position
            table[1:] = sincos_2d(side, m.vision_hidden)
    return model


def continued(fresh, name: str):
    """The CLIP model ``name`` (a bundled one or a ``CLIPModel`` folder, as ``clip_folder``) in
    float32, to train further; refused unless it has ``fresh``'s shape (the config's)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_folder(name), local_files_only=True, dtype=torch.float32)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise InvalidRequest("model.init_from", f"{name!r} is not of the config's [model] shape: {len(diff)} weights "
                             f"differ, e.g. {diff[0]} {have.get(diff[0])} (config: {want.get(diff[0])})")
    return model


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side * side, dim) position embeddings of a side x side patch grid, row-major as the ViT
    flattens it: the first half of each vector encodes the row, the second the column, each as
    sines and cosines of dim / 4 frequencies from 1 to 1 / 10000 (MAE's 2D table)."""
    if dim % 4:
        raise ValueError(f"sine-cosine positions need a width divisible by 4, not {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    def axis(v):
        a = v.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], 1)
    return torch.cat([axis(rows), axis(cols)], 1).float()


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, neg: torch.Tensor, scale: torch.Tensor,
                     same: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with hard negatives.

    Args:
        img, txt: (B, D) unit features of the pictures and their captions.
        neg: (B, M, D) unit features of each picture's hard-negative captions.
        scale: the learned logit scale (exp of the log temperature).
        same: (B, B) True where two captions of the batch are the same text (not negatives).
    """
    b = img.shape[0]
    eye = torch.eye(b, dtype=torch.bool)
    logits = scale * img @ txt.T
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    hard = scale * torch.einsum("bd,bmd->bm", img, neg)
    target = torch.arange(b)
    return 0.5 * (F.cross_entropy(torch.cat([logits, hard], 1), target) + F.cross_entropy(logits.T, target))


def _features(model, pixels: torch.Tensor, ids: torch.Tensor, chunks: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and text features; the captions run sorted by length in ``chunks`` groups, each
    cut after its own longest caption (``trim``): Chinese captions are about 3x as long in BPE
    tokens as English ones, and padding every caption to the longest costs as much again."""
    img = F.normalize(projected(model.get_image_features(pixel_values=pixels)), dim=-1)
    lengths = (ids != ids[:, -1:]).sum(1)
    order = torch.argsort(lengths)
    parts = [projected(model.get_text_features(input_ids=trim(ids[o]))) for o in order.chunk(chunks)]
    txt = torch.empty(ids.shape[0], parts[0].shape[-1], dtype=parts[0].dtype)
    txt = txt.index_copy(0, order, torch.cat(parts))
    return img, F.normalize(txt, dim=-1)


def train_clip(cfg, *, log: Log = print) -> dict:
    """Train danqing-tiny-clip as ``cfg`` (``ClipTrainConfig``) says; writes the model folder to
    ``cfg.output.output_dir/model`` and returns the summary (steps, minutes, retrieval top-1)."""
    from danqing.models.tokenizer import clip_tokenizer
    from danqing.training.data import render_batch

    out = cfg.output
    if out.num_threads:
        torch.set_num_threads(out.num_threads)
    run_dir = Path(out.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.jsonl").unlink(missing_ok=True)  # a run starts over: no checkpoints to resume
    if cfg.model.init_from:
        clip_folder(cfg.model.init_from)  # a missing model is said before the data is made
    tokenizer = clip_tokenizer()
    data = build_data(cfg, tokenizer, log)
    items = retrieval_items(out.eval_scenes)
    eval_images = render_batch([it.scene for it in items], cfg.data.size)
    model = build_model(cfg, cfg.train.seed)
    if cfg.model.init_from:
        model = continued(model, cfg.model.init_from)
        log(f"continuing {cfg.model.init_from}")
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    tr = cfg.train
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=tr.lr, betas=(0.9, 0.98), eps=1e-6)

    def factor(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < tr.warmup_steps:
            return (step + 1) / tr.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - tr.warmup_steps) / max(1, tr.steps - tr.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(tr.seed)
    n, k, h1 = data.ids.shape[:3]
    t0, avg, history = time.perf_counter(), None, []
    for step in range(tr.steps):
        model.train()
        if cfg.data.place_twins:  # half the batch, each picture beside its place twin (build_data's second half)
            half = torch.randperm(n // 2, generator=g)[: tr.batch_size // 2]
            idx = torch.cat([half, half + n // 2])
        else:
            idx = torch.randperm(n, generator=g)[: tr.batch_size]
        b = idx.shape[0]
        phr = torch.randint(k, (b,), generator=g)
        rows = data.ids[idx, phr]                                     # (B, 1 + H, 77)
        pos = rows[:, 0]
        m = min(tr.negatives_per_image, h1 - 1)
        negs = rows[:, 1:][torch.arange(b)[:, None], torch.argsort(torch.rand(b, h1 - 1, generator=g), 1)[:, :m]]
        ids = torch.cat([pos, negs.reshape(b * m, 77)]).long()
        x = soften(data.images[idx].float() / 255, g, cfg.data.augment)
        img, txt_all = _features(model, (x - mean) / std, ids)
        txt, neg = txt_all[:b], txt_all[b:].view(b, m, -1)
        same = (pos[:, None, :] == pos[None, :, :]).all(-1)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = contrastive_loss(img, txt, neg, scale, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr.max_grad_norm)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        value = float(loss.detach())
        avg = value if avg is None else 0.98 * avg + 0.02 * value
        done = step + 1
        if done % out.log_every == 0 or done == tr.steps:
            log(f"step {done}/{tr.steps} loss {avg:.4f} temperature {1 / float(scale.detach()):.4f} "
                f"{done / (time.perf_counter() - t0):.2f} it/s")
        if done % out.eval_every == 0 or done == tr.steps:
            clip = ClipModel(model.eval(), tokenizer)
            row = {"step": done, "loss": round(avg, 4), "minutes": round((time.perf_counter() - t0) / 60, 2)}
            for lang in ("en", "zh"):
                row.update({f"{k}_{lang}": v for k, v in retrieval_scores(clip, items, eval_images, lang).items()})
            save_clip(model, run_dir / "model")  # the latest model, for a look while it trains
            history.append(row)
            log(f"eval {json.dumps(row)}")
            with (run_dir / "eval.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    folder = run_dir / "model"
    summary = {"steps": tr.steps, "minutes": round((time.perf_counter() - t0) / 60, 2),
               "params": sum(p.numel() for p in model.parameters()), **history[-1]}
    log(f"wrote {folder}: {json.dumps(summary)}")
    return summary


def save_clip(model, folder: Path) -> None:
    """The model as a transformers ``CLIPModel`` folder: fp16 weights, config and CLIP's image
    preprocessing at the model's size."""
    folder.mkdir(parents=True, exist_ok=True)
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=half, safe_serialization=True)  # the model itself stays float32
    size = model.config.vision_config.image_size
    processor = {"do_resize": True, "size": {"shortest_edge": size}, "do_center_crop": True,
                 "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                 "do_convert_rgb": True, "resample": 3, "image_processor_type": "CLIPImageProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")


__all__ = ["RetrievalItem", "retrieval_items", "retrieval_scores", "build_data", "negative_order", "build_model", "continued", "contrastive_loss",
           "train_clip", "save_clip", "soften", "trim"]
