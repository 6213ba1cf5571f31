"""Face restoration (A1111's "Restore faces" with GFPGAN): find the faces, restore each one at
the model's 512 x 512, paste it back with a feathered edge, blended by ``visibility``.

Faces are found by the LBP frontal-face cascade that scikit-image ships
(``skimage.data.lbp_frontal_face_cascade_filename()``, OpenCV's own cascade file; OpenCV 5
dropped ``CascadeClassifier`` and its pip wheel ships no cascade files). Nothing is downloaded.
Unlike A1111 (facexlib's RetinaFace and a 5-point alignment), faces are not aligned: the square
around the detected box goes to the model as it is, so tilted faces restore less well.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from danqing.editing.upscalers import tile_weight, to_image, to_tensor
from danqing.errors import InvalidRequest, ModelError

FACE_MARGIN = 0.5  # the square crop is the face box grown by this fraction on each side
FEATHER = 0.125    # the pasted square fades out over this fraction of its side
CODEFORMER_WEIGHT = 0.5  # A1111's code_former_weight default: 0 = the most restoration, 1 = the least
MIN_FACE = 32      # smaller faces (and 1/16 of the short side) are not looked for: fewer false finds


def detect_faces(img: Image.Image) -> list[tuple[int, int, int, int]]:
    """Frontal faces of ``img`` as (x, y, w, h) boxes, largest first; faces smaller than
    ``MIN_FACE`` pixels or 1/16 of the picture's short side are not looked for."""
    try:  # optional: scikit-image is only needed for face restoration
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade
    except ImportError:
        raise ModelError("face detection needs scikit-image (pip install scikit-image==0.26.0)") from None

    gray = np.asarray(img.convert("L"), np.float32) / 255.0
    side = min(img.size)
    found = Cascade(lbp_frontal_face_cascade_filename()).detect_multi_scale(
        img=gray, scale_factor=1.2, step_ratio=1, min_size=(max(MIN_FACE, side // 16),) * 2, max_size=(side, side))
    boxes = [(int(f["c"]), int(f["r"]), int(f["width"]), int(f["height"])) for f in found]
    return sorted(boxes, key=lambda b: -b[2] * b[3])


def face_square(box: tuple[int, int, int, int], width: int, height: int,
                margin: float = FACE_MARGIN) -> tuple[int, int, int, int]:
    """The square (x1, y1, x2, y2) around a face box (x, y, w, h): side max(w, h) * (1 + 2 *
    margin), centred on the box, shrunk to fit the picture and moved inside it."""
    x, y, w, h = box
    side = min(int(round(max(w, h) * (1 + 2 * margin))), width, height)
    cx, cy = x + w / 2, y + h / 2
    x1 = int(min(max(round(cx - side / 2), 0), width - side))
    y1 = int(min(max(round(cy - side / 2), 0), height - side))
    return x1, y1, x1 + side, y1 + side


def face_fn(desc):
    """(1, 3, 512, 512) in [0, 1] -> restored, same shape, for a placed spandrel face model.

    GFPGAN and CodeFormer work in [-1, 1] (GFPGAN's ``GFPGANer.enhance`` and A1111's CodeFormer
    code normalise with mean 0.5, std 0.5), so the module is called directly, not through the
    descriptor (which clamps to [0, 1]). GFPGAN's StyleGAN noise is its fixed buffers
    (``randomize_noise=False``), so runs repeat; CodeFormer runs at ``CODEFORMER_WEIGHT``."""
    arch = desc.architecture.id
    if arch == "GFPGAN":
        net = lambda x: desc.model(x, return_rgb=False, randomize_noise=False)[0]  # noqa: E731
    elif arch == "CodeFormer":
        net = lambda x: desc.model(x, weight=CODEFORMER_WEIGHT)[0]  # noqa: E731
    else:
        raise InvalidRequest("face_restoration_model", f"a {desc.architecture.name} model; face restoration "
                             f"supports GFPGAN and CodeFormer files")

    def run(x: torch.Tensor) -> torch.Tensor:
        return ((net(x * 2 - 1) + 1) / 2).clamp(0, 1)

    return run


def restore_faces(img: Image.Image, desc, *, visibility: float = 1.0) -> tuple[Image.Image, list[str]]:
    """Every face of ``img`` restored by the face model ``desc`` and pasted back.

    Args:
        img: the picture (its size is kept).
        desc: a placed spandrel face model (``studio.upscalers.face_model(name)``).
        visibility: 0 keeps the picture, 1 takes the restored faces (A1111's ``gfpgan_visibility``).

    Returns:
        (the picture, warnings): "no face found" when there is none (the picture unchanged).
    """
    if not 0 <= visibility <= 1:
        raise InvalidRequest("face_visibility", f"must be between 0 and 1, got {visibility:g}")
    img = img.convert("RGB")
    boxes = detect_faces(img)
    if not boxes:
        return img, ["restore faces: no face found; the picture is unchanged"]
    if visibility == 0:
        return img, []
    run = face_fn(desc)
    size = max(512, desc.size_requirements.minimum)
    out = np.asarray(img, np.float64).copy()
    for box in boxes:
        x1, y1, x2, y2 = face_square(box, img.width, img.height)
        side = x2 - x1
        crop = img.crop((x1, y1, x2, y2)).resize((size, size), Image.LANCZOS)
        with torch.inference_mode():
            restored = run(to_tensor(crop).to(device=desc.device, dtype=desc.dtype))
        face = np.asarray(to_image(restored).resize((side, side), Image.LANCZOS), np.float64)
        m = visibility * tile_weight(side, side, max(1, int(side * FEATHER)))[..., None]  # (side, side, 1)
        out[y1:y2, x1:x2] = out[y1:y2, x1:x2] * (1 - m) + face * m
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8)), []
