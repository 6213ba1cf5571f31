"""Picture upscalers: Lanczos and nearest built in, model upscalers (ESRGAN, Real-ESRGAN,
SwinIR, ... from the models folder, ``danqing.editing.upscalers``), and tiled "SD upscale"
(A1111's script): upscale, then img2img every overlapping tile at a low strength, so detail is
added at a memory cost that depends on the tile, not on the picture.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from danqing.errors import InvalidRequest

BUILTIN = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


def upscaler_names(library=None) -> list[str]:
    """The built-in upscalers, and the installed model upscalers of ``library`` (an
    ``UpscalerLibrary``, e.g. ``studio.upscalers``) when given."""
    return library.names() if library is not None else list(BUILTIN)


def upscale_image(img: Image.Image, width: int, height: int, name: str = "Lanczos", library=None, *,
                  tile: int | None = None, overlap: int | None = None) -> Image.Image:
    """``img`` resized to width x height by a built-in upscaler or, with ``library``, an installed
    model (run tiled: ``tile`` x ``tile`` input pixels overlapping by ``overlap``; None = the
    defaults of ``danqing.editing.upscalers``, ``tile`` 0 = untiled)."""
    if name in BUILTIN:
        return img.resize((width, height), BUILTIN[name])
    if library is None:
        raise InvalidRequest("upscaler", f"unknown upscaler {name!r}; installed: {', '.join(upscaler_names())}")
    from danqing.editing.upscalers import DEFAULT_OVERLAP, DEFAULT_TILE

    return library.upscale(img, width, height, name, tile=DEFAULT_TILE if tile is None else tile,
                           overlap=DEFAULT_OVERLAP if overlap is None else overlap)


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles of tile x tile covering width x height, each overlapping its neighbours by at least
    ``overlap`` pixels; the last row/column is moved in to end at the edge."""
    def starts(total: int) -> list[int]:
        if total <= tile:
            return [0]
        step = tile - overlap
        n = -(-(total - overlap) // step)
        return [min(i * step, total - tile) for i in range(n)]

    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in starts(height) for x in starts(width)]


def tile_weight(w: int, h: int, overlap: int) -> np.ndarray:
    """A tile's blend weight: 1 inside, ramping linearly to ~0 over ``overlap`` pixels at the edges."""
    if overlap <= 0:
        return np.ones((h, w), np.float32)
    rx = np.minimum(np.arange(w) + 1, np.arange(w)[::-1] + 1) / (overlap + 1)
    ry = np.minimum(np.arange(h) + 1, np.arange(h)[::-1] + 1) / (overlap + 1)
    return np.clip(np.outer(ry, rx), 0, 1).astype(np.float32)


def sd_upscale(studio, image: Image.Image, request, *, scale: float, tile: int, overlap: int,
               upscaler: str = "Lanczos", on_tile=None) -> Image.Image:
    """Upscale ``image`` by ``scale`` with ``upscaler``, then img2img each tile x tile piece with
    ``request`` (its prompt, seed, steps, denoising_strength; width/height are set to the tile)
    and blend the pieces with feathered overlaps. Tile i uses seed + i."""
    W, H = int(image.width * scale) // 8 * 8, int(image.height * scale) // 8 * 8
    if tile % 8 or tile < 64:
        raise InvalidRequest("tile", f"must be a multiple of 8, at least 64, got {tile}")
    if not 0 <= overlap < tile // 2:
        raise InvalidRequest("overlap", f"must be between 0 and {tile // 2 - 1} pixels, got {overlap}")
    big = upscale_image(image, W, H, upscaler, studio.upscalers)
    acc = np.zeros((H, W, 3), np.float64)
    wsum = np.zeros((H, W, 1), np.float64)
    boxes = tile_boxes(W, H, tile, overlap)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        piece = big.crop((x1, y1, x2, y2))
        req = request.replace(width=x2 - x1, height=y2 - y1, seed=request.seed + i, batch_size=1, batch_count=1,
                              init_image=None, mask=None)
        out = studio.generate(req, init_image=piece).images[0]
        wgt = tile_weight(x2 - x1, y2 - y1, overlap if len(boxes) > 1 else 0)[..., None]
        acc[y1:y2, x1:x2] += np.asarray(out, np.float64) * wgt
        wsum[y1:y2, x1:x2] += wgt
        if on_tile:
            on_tile(i + 1, len(boxes))
    return Image.fromarray(np.clip(np.round(acc / np.maximum(wsum, 1e-8)), 0, 255).astype(np.uint8))
