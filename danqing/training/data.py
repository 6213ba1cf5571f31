"""Training data: the synthetic shapes set, the portrait set (or a mix of both) or a user folder
of captioned images, as tensors.

A :class:`CaptionedImages` holds every image as uint8 (N, 3, H, W) and several captions per
image; it is small enough to live in memory at the sizes danqing trains from scratch.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from danqing.errors import InvalidRequest
from danqing.synthetic.captions import caption
from danqing.synthetic.recaption import STYLES, styled_caption
from danqing.synthetic.concepts import concept_scenes
from danqing.synthetic.portraits import Portrait, portraits, render_portrait
from danqing.synthetic.portraits_captions import portrait_caption
from danqing.synthetic.render import render, render_mask
from danqing.synthetic.scenes import scenes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WORLDS = ("shapes", "portraits", "mix")


@dataclass
class CaptionedImages:
    images: torch.Tensor              # (N, 3, H, W) uint8
    captions: list[list[str]]         # N lists of captions
    scenes: list | None = None        # synthetic: the Scene (or Portrait) of each image

    def __len__(self) -> int:
        return self.images.shape[0]


def _render_chunk(args) -> np.ndarray:
    scenes, size = args
    return np.stack([np.asarray(render_portrait(s, size) if isinstance(s, Portrait) else render(s, size)) for s in scenes])


def render_batch(scenes, size: int, workers: int | None = None) -> torch.Tensor:
    """Scenes (or portraits) rendered to one uint8 tensor (N, 3, size, size).

    Large sets are rendered by ``workers`` processes (default: one per CPU core); rendering is a
    pure function of the scene, so the result does not depend on how the work is split.
    """
    scenes = list(scenes)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(scenes) < 4096:
        arr = _render_chunk((scenes, size))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        step = -(-len(scenes) // (workers * 4))
        chunks = [(scenes[i:i + step], size) for i in range(0, len(scenes), step)]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            arr = np.concatenate(list(pool.map(_render_chunk, chunks)))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def synthetic_dataset(n: int, size: int = 64, seed: int = 0, captions_per_image: int = 6, *, world: str = "shapes",
                      portrait_share: float = 0.5, captions: str = "varied", portrait_drop: float = 0.0) -> CaptionedImages:
    """``n`` training-split pictures rendered at ``size``, each with ``captions_per_image`` captions
    (alternating English and Chinese phrasings). Deterministic from ``seed``.

    Args:
        world: "shapes" (the shapes world), "portraits" (the portrait world) or "mix": the first
            ``n * (1 - portrait_share)`` shapes scenes of ``seed`` and then portraits.
        captions: the shapes scenes' caption style (``synthetic.recaption.STYLES``): "varied"
            phrasings, "short" (the objects only) or "detailed" (everything, one fixed order).
        portrait_drop: the portraits' attribute dropout (``portrait_caption``'s ``drop``).
    """
    if world not in WORLDS:
        raise InvalidRequest("data.world", f"unknown world {world!r}; allowed: {', '.join(WORLDS)}")
    n_portraits = {"shapes": 0, "portraits": n, "mix": round(n * portrait_share)}[world]
    sc = scenes(seed, n - n_portraits, "train") if n_portraits < n else []
    rng = random.Random(f"captions:{seed}")
    if captions not in STYLES:
        raise InvalidRequest("data.captions", f"unknown caption style {captions!r}; allowed: {', '.join(STYLES)}")
    caps = [[styled_caption(s, ("en", "zh")[k % 2], captions, rng) for k in range(captions_per_image)] for s in sc]
    if n_portraits:
        ps = portraits(seed, n_portraits, "train")
        prng = random.Random(f"portrait-captions:{seed}")
        caps += [[portrait_caption(p, ("en", "zh")[k % 2], prng, portrait_drop) for k in range(captions_per_image)] for p in ps]
        sc = sc + ps
    return CaptionedImages(render_batch(sc, size), caps, sc)


def folder_dataset(folder: str | Path, size: int) -> CaptionedImages:
    """Images of a folder (``caption_folder``'s layouts: ``metadata.jsonl``, kohya
    ``N_concept/`` sub-folders, or a ``.txt`` beside each image), each resized on the short side
    and centre-cropped to size x size; one caption per image (kohya repeats are not used here).

    Raises:
        InvalidRequest: as ``caption_folder`` (missing or empty folder, unreadable images, images
            without captions: how many and which).
    """
    items = caption_folder(folder)
    arr = np.stack([np.asarray(fit_bucket(it.image, None, size)) for it in items]).transpose(0, 3, 1, 2)
    return CaptionedImages(torch.from_numpy(np.ascontiguousarray(arr)), [list(it.captions) for it in items])


def tokenize_captions(tokenizer, captions: list[list[str]], *, empty: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, K, 77) int32, empty-prompt ids (77,)) -- every image padded to K captions by
    repeating its own, so a random caption index is always valid."""
    k = max(len(c) for c in captions)
    flat = [c[i % len(c)] for c in captions for i in range(k)]
    unique = list(dict.fromkeys(flat))          # synthetic captions repeat a lot: tokenize each once
    rows = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
    where = {c: i for i, c in enumerate(unique)}
    ids = rows[torch.tensor([where[c] for c in flat], dtype=torch.long)]
    none = tokenizer([empty], padding="max_length", max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids[0]
    return ids.view(len(captions), k, -1).to(torch.int32), none.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Fine-tuning data (LoRA, DreamBooth, textual inversion): captioned folders, buckets, captions
# ---------------------------------------------------------------------------------------------
@dataclass
class CaptionedItem:
    """One training image with its caption(s) and how often an epoch repeats it."""

    image: Image.Image
    captions: list[str]
    repeats: int = 1
    name: str = ""
    mask: Image.Image | None = None  # "L": where a masked loss weights more (alpha channel, rendered objects)


def _read_caption(path: Path, ext: str) -> str | None:
    cap = path.with_suffix(ext)
    return cap.read_text(encoding="utf-8").strip() if cap.is_file() else None


def _open_rgb(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """(RGB picture, its alpha channel as a mask or None)."""
    try:
        with Image.open(path) as im:
            alpha = im.getchannel("A") if "A" in im.getbands() else None
            return im.convert("RGB"), alpha
    except (OSError, ValueError) as exc:
        raise InvalidRequest("data.source", f"{path}: unreadable image ({type(exc).__name__})") from None


def caption_folder(folder: str | Path, *, caption_ext: str = ".txt", repeats: int = 1) -> list[CaptionedItem]:
    """The images of a folder with their captions, in one of three layouts:

    * ``metadata.jsonl`` ({"file_name", "text"} per line, diffusers' ImageFolder);
    * kohya: sub-folders ``N_concept/`` whose images repeat N times per epoch;
    * plain: a caption file (``caption_ext``) beside each image.

    Raises:
        InvalidRequest: missing or empty folder, unreadable images, images without captions
            (how many and which), a malformed metadata line.
    """
    import re

    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidRequest("data.source", f"{folder}: not a folder (a folder of captioned images, or concept:<shape>)")
    meta = folder / "metadata.jsonl"
    items: list[CaptionedItem] = []
    if meta.is_file():
        for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path, text = folder / row["file_name"], str(row["text"])
            except (ValueError, KeyError, TypeError):
                raise InvalidRequest("data.source", f"{meta}:{i}: need a JSON object with file_name and text") from None
            rgb, alpha = _open_rgb(path)
            items.append(CaptionedItem(rgb, [text], repeats, path.name, alpha))
    else:
        kohya = [d for d in sorted(folder.iterdir()) if d.is_dir() and re.fullmatch(r"\d+_.+", d.name)]
        groups = [(d, int(d.name.split("_", 1)[0])) for d in kohya] if kohya else [(folder, repeats)]
        files = [(p, n) for d, n in groups for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        missing = [p for p, _ in files if _read_caption(p, caption_ext) is None]
        if missing:
            names = ", ".join(p.relative_to(folder).as_posix() for p in missing[:5])
            raise InvalidRequest("data.source", f"{len(missing)} of {len(files)} images have no {caption_ext} caption "
                                 f"({names}{', ...' if len(missing) > 5 else ''}); add captions or a metadata.jsonl")
        for p, n in files:
            if n < 1:
                raise InvalidRequest("data.source", f"{p.parent.name}: a kohya folder repeats its images N >= 1 times")
            rgb, alpha = _open_rgb(p)
            items.append(CaptionedItem(rgb, [_read_caption(p, caption_ext)], n, p.name, alpha))
    if not items:
        raise InvalidRequest("data.source", f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return items


def concept_items(concept: str, n: int, *, size: int, captions_per_image: int = 4, seed: int = 0,
                  pair_share: float = 1 / 3, relations: tuple[str, ...] = ("left", "right")) -> list[CaptionedItem]:
    """Rendered training scenes of a novel synthetic shape or colour, each with English phrasings
    (``pair_share``, ``relations``: ``danqing.synthetic.concepts.concept_scenes``)."""
    rng = random.Random(f"concept-captions:{seed}")
    out = []
    for i, s in enumerate(concept_scenes(n, concept=concept, seed=seed, pair_share=pair_share, relations=relations)):
        caps = [caption(s, "en")] + [caption(s, "en", rng) for _ in range(captions_per_image - 1)]
        out.append(CaptionedItem(render(s, size), list(dict.fromkeys(caps)), 1, f"{concept}-{i:03d}",
                                 render_mask(s, size)))
    return out


def world_items(world: str, n: int, *, size: int, captions_per_image: int = 4, seed: int = 0) -> list[CaptionedItem]:
    """``n`` training-split pictures of a synthetic world ("shapes", "portraits", "mix") with
    English and Chinese captions (``synthetic_dataset``), as captioned items."""
    data = synthetic_dataset(n, size, seed, captions_per_image, world=world)
    return [CaptionedItem(Image.fromarray(data.images[i].permute(1, 2, 0).numpy()), list(dict.fromkeys(caps)), 1,
                          f"{world}-{i:05d}") for i, caps in enumerate(data.captions)]


def bucket_sizes(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of at most ``resolution``^2 pixels, sides multiples of ``step``,
    aspect ratios up to ``max_ratio`` (kohya's / NovelAI's aspect-ratio bucketing)."""
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += step
    return sorted(out)


def fit_bucket(image: Image.Image, buckets: list[tuple[int, int]] | None, resolution: int,
               size: tuple[int, int] | None = None) -> Image.Image:
    """The image resized to cover the bucket nearest its aspect ratio and centre-cropped to it
    (``buckets`` None: a resolution x resolution centre crop; ``size``: that bucket, for a mask
    that must follow its picture)."""
    import math

    w, h = image.size
    if size is not None:
        bw, bh = size
    elif buckets:
        bw, bh = min(buckets, key=lambda b: (abs(math.log((b[0] / b[1]) / (w / h))), -b[0] * b[1]))
    else:
        bw = bh = resolution
    s = max(bw / w, bh / h)
    im = image.resize((max(bw, round(w * s)), max(bh, round(h * s))), Image.LANCZOS)
    left, top = (im.width - bw) // 2, (im.height - bh) // 2
    return im.crop((left, top, left + bw, top + bh))


def process_caption(text: str, rng: random.Random, *, dropout: float = 0.0, shuffle: bool = False,
                    keep: int = 0) -> str:
    """One training caption: dropped to "" with probability ``dropout`` (for classifier-free
    guidance), else its comma-separated tags shuffled, the first ``keep`` staying in place
    (kohya's ``shuffle_caption`` / ``keep_tokens``)."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return text
    tags = [t.strip() for t in text.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def picture_embeddings(encoder, processor, images: torch.Tensor, batch: int = 512, *, plus: bool = False) -> torch.Tensor:
    """(N, D) CLIP image embeddings of rendered pictures (N, 3, H, W) uint8, or with ``plus``
    (N, tokens, C) penultimate hidden states, on the CPU in float32: what
    ``customise.ip_adapter.encode_images`` gives each picture at generation."""
    from danqing.customise.ip_adapter import encode_images

    out = []
    for i in range(0, len(images), batch):
        pics = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images[i:i + batch]]
        out.append(encode_images(encoder, processor, pics, plus=plus).embeds[0].float().cpu())
    return torch.cat(out)
