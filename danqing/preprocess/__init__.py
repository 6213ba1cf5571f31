"""Control-image preprocessors (sd-webui-controlnet's "modules"): picture -> control map.

Classical ones are pure functions of a PIL picture in ``classical.py`` (OpenCV, scikit-image-free
numpy); model-based ones (depth, normal, pose detection) load a user-provided model folder in
``models.py`` and say which file they need when it is absent. ``PREPROCESSORS`` maps each name
to its function and the meaning of its two parameters (threshold_a / threshold_b).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from danqing.errors import InvalidRequest
from danqing.preprocess import classical, models
from danqing.preprocess.classical import fit_short_side


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessor: ``fn(image, resolution, a, b) -> PIL image``; ``a``/``b`` default to
    ``a_default``/``b_default`` and mean ``a_name``/``b_name``."""

    name: str
    fn: Callable
    help: str
    a_name: str | None = None
    a_default: float | None = None
    b_name: str | None = None
    b_default: float | None = None


def _table() -> dict[str, Preprocessor]:
    P, c, m = Preprocessor, classical, models  # short names for the table
    rows = [
        P("none", c.passthrough, "the picture is already a control map"),
        P("invert", c.invert, "white lines on black from black lines on white"),
        P("canny", c.canny, "Canny edges (OpenCV)", "low threshold", 100, "high threshold", 200),
        P("lineart", c.lineart, "line art by XDoG (difference of Gaussians), white lines on black", "sigma", 1.0, "sharpness", 200.0),
        P("lineart_anime", c.lineart_anime, "thin anime-style line art (XDoG, finer scale)", "sigma", 0.7, "sharpness", 300.0),
        P("scribble", c.scribble, "thick rough strokes from edges", "stroke width", 5, None, None),
        P("softedge", c.softedge, "soft edges: the Sobel gradient magnitude, blurred", "blur sigma", 1.5, None, None),
        P("mlsd", c.mlsd, "straight lines only (probabilistic Hough on Canny edges)", "min length", 0.1, "max gap", 0.02),
        P("tile", c.tile, "blurred, downsampled picture (tile / blur)", "down factor", 4, "blur sigma", 1.0),
        P("blur", c.blur, "Gaussian blur", "sigma", 4.0, None, None),
        P("shuffle", c.shuffle, "content shuffle: the picture warped by a random smooth flow", "seed", 0, None, None),
        P("segmentation", c.segmentation, "a colour-map segmentation (passed through, colours quantised)", "colours", 0, None, None),
        P("inpaint", c.passthrough, "inpaint: the picture with the mask's area marked -1 (needs a mask)"),
        P("depth", m.depth, "depth map from a depth-estimation model folder (transformers) or a depth map given as the picture"),
        P("normal", m.normal, "normal map from a depth model (or a depth map given as the picture)", "background threshold", 0.1, None, None),
        P("openpose", m.openpose, "18-keypoint skeleton from a pose JSON file (OpenPose format), or detected by a ViTPose model",
          "keypoint threshold", 0.3, "person threshold", 0.5),
    ]
    return {r.name: r for r in rows}


_CACHE: dict[str, Preprocessor] = {}


def preprocessors() -> dict[str, Preprocessor]:
    if not _CACHE:
        _CACHE.update(_table())
    return _CACHE


def preprocessor_names() -> list[str]:
    return list(preprocessors())


def get_preprocessor(name: str) -> Preprocessor:
    table = preprocessors()
    if name not in table:
        raise InvalidRequest("preprocessor", f"unknown preprocessor {name!r}; available: {', '.join(table)}")
    return table[name]


def run_preprocessor(name: str, image, *, resolution: int = 512, a: float | None = None, b: float | None = None,
                     **kwargs):
    """Run preprocessor ``name`` on a PIL picture whose short side is first scaled to
    ``resolution`` (sd-webui-controlnet's processor resolution). Returns a PIL image."""
    p = get_preprocessor(name)
    a = p.a_default if a is None else a
    b = p.b_default if b is None else b
    if name not in ("none", "inpaint", "segmentation") and not isinstance(image, (str, Path)):
        image = fit_short_side(image, resolution)
    return p.fn(image, a=a, b=b, **kwargs)


def inpaint_condition(image, mask=None):
    """ControlNet 1.1 inpaint's condition: (H, W, 3) float32 in [0, 1], -1 where ``mask`` > 0.5
    (diffusers' ``make_inpaint_condition``; sd-webui-controlnet's "inpaint_only")."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if mask is not None:
        a = a.copy()
        a[np.asarray(mask) > 0.5] = -1.0
    return a
