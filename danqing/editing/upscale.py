"""Picture upscalers: Lanczos and nearest built in, model upscalers (ESRGAN, Real-ESRGAN,
SwinIR, ... from the models folder, ``danqing.editing.upscalers``), and tiled "SD upscale"
(A1111's script): upscale, then img2img every overlapping tile at a low strength, so detail is
added at a memory cost that depends on the tile, not on the picture.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from danqing.editing.upscalers import BUILTIN, DEFAULT_OVERLAP, DEFAULT_TILE, tile_boxes, tile_weight
from danqing.errors import InvalidRequest


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
    return library.upscale(img, width, height, name, tile=DEFAULT_TILE if tile is None else tile,
                           overlap=DEFAULT_OVERLAP if overlap is None else overlap)


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
