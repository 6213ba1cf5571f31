"""Picture files and A1111's resize modes: the pixel side shared by control maps
(``danqing.conditioning.control``), img2img / inpaint (``danqing.editing``) and the shells.

Images are RGB PIL images; a mask file is read as 8-bit greyscale, white = repaint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from danqing.errors import InvalidRequest

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill", "latent upscale")
MAX_PIXELS = 8192 * 8192


def load_image(path: str | Path, field: str) -> Image.Image:
    """An image file as RGB (EXIF orientation applied), or ``InvalidRequest`` naming ``field``."""
    p = Path(path)
    if not p.is_file():
        raise InvalidRequest(field, f"{p}: no such file")
    try:
        with Image.open(p) as im:
            size = im.size
            if size[0] * size[1] <= MAX_PIXELS:
                im = ImageOps.exif_transpose(im)
                return im.convert("RGBA").convert("RGB") if im.mode in ("P", "LA") else im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(field, f"{p}: unreadable image ({exc})") from None
    raise InvalidRequest(field, f"{p}: {size[0]}x{size[1]} is more than {MAX_PIXELS} pixels")


def load_mask(path: str | Path, field: str = "mask") -> Image.Image:
    """A mask file as 8-bit greyscale: the alpha channel of an image with transparency
    (transparent = repaint, as A1111's inpaint sketch), else its luminance."""
    p = Path(path)
    if not p.is_file():
        raise InvalidRequest(field, f"{p}: no such file")
    try:
        with Image.open(p) as im:
            if im.mode in ("RGBA", "LA", "PA") and im.getchannel("A").getextrema() != (255, 255):
                return ImageOps.invert(im.getchannel("A"))
            return im.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(field, f"{p}: unreadable image ({exc})") from None


def resize_image(img: Image.Image, width: int, height: int, mode: str = "just resize") -> Image.Image:
    """A1111's resize modes (``resize_image``):

    - "just resize": stretch to width x height;
    - "crop and resize": scale to cover, centre-crop the excess;
    - "resize and fill": scale to fit inside, fill the bars by stretching the edge pixels.
    ("latent upscale" resizes latents, not pixels: here it behaves as "just resize".)
    """
    if img.size == (width, height):
        return img.copy()
    if mode in ("just resize", "latent upscale"):
        return img.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, img.width / img.height
    if mode == "crop and resize":
        w, h = (width, round(width / src_ratio)) if ratio > src_ratio else (round(height * src_ratio), height)
        r = img.resize((max(w, width), max(h, height)), Image.LANCZOS)
        left, top = (r.width - width) // 2, (r.height - height) // 2
        return r.crop((left, top, left + width, top + height))
    if mode == "resize and fill":
        w, h = (round(height * src_ratio), height) if ratio > src_ratio else (width, round(width / src_ratio))
        r = np.asarray(img.resize((max(1, w), max(1, h)), Image.LANCZOS))
        top, left = (height - r.shape[0]) // 2, (width - r.shape[1]) // 2
        pad = ((top, height - r.shape[0] - top), (left, width - r.shape[1] - left)) + ((0, 0),) * (r.ndim - 2)
        return Image.fromarray(np.pad(r, pad, mode="edge"))
    raise InvalidRequest("resize_mode", f"must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
