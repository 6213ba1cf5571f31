"""Pixel-side helpers of img2img, inpaint and outpaint: pure functions on PIL images and arrays.

Conventions: masks are float32 arrays (H, W) in [0, 1] where 1 = repaint (white in a mask file,
as in A1111 and diffusers); images are RGB PIL images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Picture files and resize modes live in danqing.pictures (control maps, below the editing layer,
# need them too); the editing passes and the shells import them from here as well.
from danqing.pictures import MAX_PIXELS, RESIZE_MODES, load_image, load_mask, resize_image  # noqa: F401


def mask_array(mask: Image.Image, *, invert: bool = False) -> np.ndarray:
    """(H, W) float32 in [0, 1], 1 = repaint; soft (grey) masks stay soft."""
    m = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return 1.0 - m if invert else m


def feather_inward(mask: np.ndarray, blur: int) -> np.ndarray:
    """The blend weight of the generated picture: the mask blurred with a Gaussian of
    ``blur`` pixels (A1111's mask blur), then cut to zero wherever the mask is zero.

    A1111 blurs both ways, so its blend also changes pixels just outside the mask; cutting the
    blur at the mask's edge keeps every unmasked pixel exactly as it was, and the seam is
    feathered inside the mask instead.
    """
    if blur <= 0:
        return mask.astype(np.float32)
    import cv2

    k = 2 * int(2.5 * blur + 0.5) + 1
    soft = cv2.GaussianBlur(mask.astype(np.float32), (k, k), blur)
    return np.where(mask > 0, soft, 0).astype(np.float32)


def fill_masked(img: Image.Image, mask: np.ndarray) -> Image.Image:
    """A1111's "fill" masked content: the masked area painted from its surroundings (OpenCV's
    Telea inpainting), so the sampler starts from the colours around the hole."""
    import cv2

    hole = (mask > 0.5).astype(np.uint8)
    if not hole.any():
        return img.copy()
    return Image.fromarray(cv2.inpaint(np.asarray(img), hole, 5, cv2.INPAINT_TELEA))


def composite(original: Image.Image, generated: Image.Image, weight: np.ndarray) -> Image.Image:
    """original * (1 - weight) + generated * weight, rounded; weight 0 keeps a pixel exactly."""
    a = np.asarray(original, dtype=np.float32)
    b = np.asarray(generated.resize(original.size, Image.LANCZOS) if generated.size != original.size else generated,
                   dtype=np.float32)
    w = weight[..., None]
    out = np.where(w > 0, a * (1 - w) + b * w, a)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def crop_region(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's "only masked" region: the mask's bounding box grown by ``padding`` pixels, then
    grown further to the aspect ratio of width x height, kept inside the image.
    Returns (x1, y1, x2, y2), exclusive ends."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask > 0)
    x1, y1 = max(int(xs.min()) - padding, 0), max(int(ys.min()) - padding, 0)
    x2, y2 = min(int(xs.max()) + 1 + padding, W), min(int(ys.max()) + 1 + padding, H)
    ratio = width / height
    w, h = x2 - x1, y2 - y1
    if w / h < ratio:                      # too tall: widen
        grow = round(h * ratio) - w
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
        if x1 < 0:
            x2, x1 = min(x2 - x1, W), 0
        if x2 > W:
            x1, x2 = max(x1 - (x2 - W), 0), W
    else:                                  # too wide: heighten
        grow = round(w / ratio) - h
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
        if y1 < 0:
            y2, y1 = min(y2 - y1, H), 0
        if y2 > H:
            y1, y2 = max(y1 - (y2 - H), 0), H
    return x1, y1, x2, y2


def outpaint_canvas(img: Image.Image, left: int, right: int, up: int, down: int,
                    feather: int) -> tuple[Image.Image, Image.Image]:
    """The picture on a larger canvas, the new area pre-filled from the edge (OpenCV inpaint),
    and the mask: white over the new area, fading to black ``feather`` pixels into the old
    picture so the seam is repainted softly. Returns (canvas, mask)."""
    W, H = img.width + left + right, img.height + up + down
    canvas = np.zeros((H, W, 3), np.uint8)
    canvas[up:up + img.height, left:left + img.width] = np.asarray(img)
    new = np.ones((H, W), np.float32)
    new[up:up + img.height, left:left + img.width] = 0
    if feather > 0:
        import cv2

        # distance (pixels) from the new area, inside the old picture; 0 in the new area
        dist = cv2.distanceTransform((new == 0).astype(np.uint8), cv2.DIST_L2, 5)
        mask = np.maximum(new, np.clip(1 - dist / feather, 0, 1) * (new == 0))
    else:
        mask = new
    filled = fill_masked(Image.fromarray(canvas), new)
    return filled, Image.fromarray(np.round(mask * 255).astype(np.uint8))
