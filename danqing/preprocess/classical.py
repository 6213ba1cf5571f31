"""Classical control-map preprocessors: pure functions of a PIL picture (OpenCV + numpy).

Every function takes the picture (already at the processor resolution) and the unit's two
parameters ``a`` and ``b`` and returns an RGB PIL image of the same size, 8-bit, white (or
coloured) structure on black as ControlNet 1.1's annotators draw it. Where sd-webui-controlnet
uses a neural annotator (HED/PiDiNet soft edges, MLSD, the line-art GANs) these are classical
stand-ins written by hand -- no annotator weights can be downloaded here -- and say so.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _grey(img: Image.Image) -> np.ndarray:
    import cv2

    return cv2.cvtColor(_rgb(img), cv2.COLOR_RGB2GRAY)


def _out(a: np.ndarray) -> Image.Image:
    """(H, W) or (H, W, 3) uint8 -> RGB PIL."""
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)), "RGB")


def fit_short_side(img: Image.Image, resolution: int) -> Image.Image:
    """Scale so the short side is ``resolution`` (INTER_AREA down, INTER_CUBIC up), as
    sd-webui-controlnet's ``resize_image_with_pad`` does before an annotator (without its pad)."""
    import cv2

    w, h = img.size
    k = resolution / min(w, h)
    if abs(k - 1) < 1e-6:
        return img.convert("RGB")
    size = (max(1, round(w * k)), max(1, round(h * k)))
    return Image.fromarray(cv2.resize(_rgb(img), size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC))


def passthrough(img: Image.Image, **_) -> Image.Image:
    return img.convert("RGB")


def invert(img: Image.Image, **_) -> Image.Image:
    """255 - x: a black-on-white drawing becomes the white-on-black map ControlNets expect."""
    return _out(255 - _rgb(img))


def canny(img: Image.Image, a: float = 100, b: float = 200, **_) -> Image.Image:
    """Canny (1986) edges with low/high hysteresis thresholds ``a``/``b``: OpenCV's ``cv2.Canny``
    on the RGB picture, exactly as sd-webui-controlnet's canny module calls it."""
    import cv2

    return _out(cv2.Canny(_rgb(img), int(a), int(b)))


def xdog(grey: np.ndarray, sigma: float = 1.0, phi: float = 200.0, k: float = 1.6, tau: float = 0.98,
         eps: float = -0.01) -> np.ndarray:
    """Extended difference of Gaussians (Winnemoeller et al. 2012, "XDoG"), (H, W) in [0, 1]
    with 1 = line: D = G_sigma - tau * G_{k sigma}; line strength = 1 - soft threshold of D.

    Args:
        grey: (H, W) uint8 luminance.
        sigma: scale of the finer Gaussian (thicker lines when larger).
        phi: sharpness of the soft threshold.
    """
    import cv2

    g = grey.astype(np.float32) / 255.0
    g1 = cv2.GaussianBlur(g, (0, 0), sigma)
    g2 = cv2.GaussianBlur(g, (0, 0), sigma * k)
    d = g1 - tau * g2
    white = np.where(d >= eps, 1.0, 1.0 + np.tanh(phi * (d - eps)))  # 1 = paper, <1 = ink
    return np.clip(1.0 - white, 0.0, 1.0)


def lineart(img: Image.Image, a: float = 1.0, b: float = 200.0, **_) -> Image.Image:
    """Line art (white lines on black) by XDoG: a classical stand-in for ControlNet 1.1's
    line-art GAN annotator. ``a`` = sigma, ``b`` = sharpness."""
    lines = xdog(_grey(img), sigma=float(a), phi=float(b))
    return _out(np.round(lines * 255))


def lineart_anime(img: Image.Image, a: float = 0.7, b: float = 300.0, **_) -> Image.Image:
    """Thinner, crisper line art (XDoG at a finer scale, hard threshold at 0.5)."""
    lines = xdog(_grey(img), sigma=float(a), phi=float(b))
    return _out(np.where(lines > 0.5, 255, 0))


def scribble(img: Image.Image, a: float = 5, b=None, **_) -> Image.Image:
    """Scribble: edges (Canny on a blurred picture) dilated into strokes ``a`` pixels wide."""
    import cv2

    g = cv2.GaussianBlur(_grey(img), (0, 0), 2.0)
    e = cv2.Canny(g, 50, 120)
    w = max(1, int(a))
    e = cv2.dilate(e, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (w, w)))
    return _out(e)


def softedge(img: Image.Image, a: float = 1.5, b=None, **_) -> Image.Image:
    """Soft edges: Sobel gradient magnitude of the blurred picture, normalised to [0, 255] --
    a classical stand-in for HED (Xie & Tu 2015) / PiDiNet."""
    import cv2

    g = cv2.GaussianBlur(_grey(img).astype(np.float32) / 255.0, (0, 0), float(a))
    mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3))
    peak = float(np.percentile(mag, 99.5)) or 1.0
    return _out(np.round(np.clip(mag / peak, 0, 1) * 255))


def mlsd(img: Image.Image, a: float = 0.1, b: float = 0.02, **_) -> Image.Image:
    """Straight line segments (MLSD-style map): probabilistic Hough transform (Matas et al. 2000)
    on Canny edges; ``a`` = shortest segment and ``b`` = largest gap, as fractions of the short
    side. White 1-pixel segments on black."""
    import cv2

    grey = _grey(img)
    edges = cv2.Canny(grey, 50, 150)
    side = min(grey.shape)
    lines = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold=max(10, int(0.05 * side)),
                            minLineLength=max(2, int(a * side)), maxLineGap=max(1, int(b * side)))
    out = np.zeros_like(grey)
    for x1, y1, x2, y2 in ([] if lines is None else np.asarray(lines).reshape(-1, 4)):
        cv2.line(out, (int(x1), int(y1)), (int(x2), int(y2)), 255, 1)
    return _out(out)


def tile(img: Image.Image, a: float = 4, b: float = 1.0, **_) -> Image.Image:
    """Tile / blur condition: the picture downsampled ``a`` times (INTER_AREA), blurred by ``b``
    and scaled back (ControlNet 1.1 tile's resampled input)."""
    import cv2

    rgb = _rgb(img)
    h, w = rgb.shape[:2]
    f = max(1.0, float(a))
    small = cv2.resize(rgb, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    if b and b > 0:
        small = cv2.GaussianBlur(small, (0, 0), float(b))
    return _out(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))


def blur(img: Image.Image, a: float = 4.0, b=None, **_) -> Image.Image:
    import cv2

    return _out(cv2.GaussianBlur(_rgb(img), (0, 0), max(0.1, float(a))))


def shuffle(img: Image.Image, a: float = 0, b=None, **_) -> Image.Image:
    """Content shuffle (ControlNet 1.1 shuffle's annotator): remap the picture through a random
    smooth displacement field (noise upsampled from 1/64 of the size), seeded by ``a``."""
    import cv2

    rgb = _rgb(img)
    h, w = rgb.shape[:2]
    rng = np.random.default_rng(int(a))
    f = 64
    flow = [cv2.resize(rng.random((max(2, h // f), max(2, w // f)), dtype=np.float32), (w, h),
                       interpolation=cv2.INTER_CUBIC) for _ in range(2)]
    x = np.clip(flow[0] * (w - 1), 0, w - 1).astype(np.float32)
    y = np.clip(flow[1] * (h - 1), 0, h - 1).astype(np.float32)
    return _out(cv2.remap(rgb, x, y, interpolation=cv2.INTER_LINEAR))


def segmentation(img: Image.Image, a: float = 0, b=None, **_) -> Image.Image:
    """A colour-map segmentation passed through (nearest-neighbour only: no new colours appear);
    ``a`` > 0 quantises it to that many colours (median cut)."""
    img = img.convert("RGB")
    if a and int(a) > 0:
        img = img.quantize(colors=int(a), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).convert("RGB")
    return img
