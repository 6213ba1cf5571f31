"""Model-based preprocessors: depth and normal maps (a user-provided transformers depth model),
and OpenPose skeletons (rendered from pose JSON; keypoint detection needs a user model).

No annotator weights ship with danqing and none can be downloaded: each function says which
files it needs and where to put them when they are absent. A greyscale picture (R = G = B) is
taken as an already made depth map, so a user can always supply the map instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from danqing.errors import InvalidRequest, ModelNotFound

PREPROCESSOR_DIR = "preprocessors"  # models_dir/preprocessors/<name>/


def model_folder(name: str, models_dir) -> Path | None:
    """``models_dir/preprocessors/<name>/`` if it holds a model (config.json), else None."""
    if models_dir is None:
        return None
    p = Path(models_dir) / PREPROCESSOR_DIR / name
    return p if (p / "config.json").is_file() else None


def _is_grey(img: Image.Image) -> bool:
    a = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool(np.abs(a[..., 0] - a[..., 1]).max() <= 2 and np.abs(a[..., 1] - a[..., 2]).max() <= 2)


def _missing(name: str, models_dir, what: str) -> ModelNotFound:
    where = Path(models_dir) / PREPROCESSOR_DIR / name if models_dir else f"<models>/{PREPROCESSOR_DIR}/{name}"
    return ModelNotFound(f"the {name} preprocessor needs {what} in {where}/ (config.json and its weights, "
                         f"local files only); or give an already made {name} map as a greyscale picture")


def estimate_depth(img: Image.Image, folder: Path) -> np.ndarray:
    """(H, W) float32 relative inverse depth in [0, 1] (near = 1, as MiDaS maps) from a
    transformers depth-estimation model folder (DPT/MiDaS, Depth Anything, ...)."""
    from transformers import pipeline

    pipe = pipeline("depth-estimation", model=str(folder), local_files_only=True, device="cpu")
    out = pipe(img.convert("RGB"))
    d = np.asarray(out["depth"].resize(img.size, Image.BICUBIC), dtype=np.float32)
    d = d - d.min()
    return d / max(float(d.max()), 1e-6)


def _depth_array(img: Image.Image, models_dir) -> np.ndarray:
    folder = model_folder("depth", models_dir)
    if folder is not None:
        return estimate_depth(img, folder)
    if _is_grey(img):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    raise _missing("depth", models_dir, "a transformers depth-estimation model folder (e.g. DPT-hybrid MiDaS or "
                   "Depth Anything small)")


def depth(img: Image.Image, a=None, b=None, models_dir=None, **_) -> Image.Image:
    """Depth map (white = near), 8-bit RGB, from ``models_dir/preprocessors/depth/`` or the
    picture itself when it already is a greyscale depth map."""
    d = _depth_array(img, models_dir)
    return Image.fromarray(np.repeat(np.round(d * 255).astype(np.uint8)[:, :, None], 3, axis=2), "RGB")


def normal_from_depth(d: np.ndarray, bg_threshold: float = 0.1) -> np.ndarray:
    """Normal map from (H, W) inverse depth in [0, 1], as sd-webui-controlnet's midas normal:
    n = normalise(-dD/dx, -dD/dy, 2 pi) (Sobel, on depth scaled to 0-255), background (depth <
    threshold) flat; returned as (H, W, 3) uint8 with RGB = (n + 1) / 2."""
    import cv2

    d255 = d.astype(np.float32) * 255.0
    x = cv2.Sobel(d255, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(d255, cv2.CV_32F, 0, 1, ksize=3)
    x[d < bg_threshold] = 0
    y[d < bg_threshold] = 0
    z = np.full_like(d255, 2 * np.pi)
    n = np.stack([x, y, z], axis=2)
    n /= np.sqrt(np.sum(n ** 2, axis=2, keepdims=True))
    return np.clip(np.round((n * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)


def normal(img: Image.Image, a: float = 0.1, b=None, models_dir=None, **_) -> Image.Image:
    return Image.fromarray(normal_from_depth(_depth_array(img, models_dir), float(a if a is not None else 0.1)), "RGB")


# -- OpenPose ------------------------------------------------------------------------------------
# The 18-keypoint COCO body of OpenPose (Cao et al. 2019): Nose, Neck, RShoulder, RElbow, RWrist,
# LShoulder, LElbow, LWrist, RHip, RKnee, RAnkle, LHip, LKnee, LAnkle, REye, LEye, REar, LEar.
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]  # 1-based, as ControlNet's annotator util
COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]


def _points(flat, n: int, w: int, h: int, normalised: bool):
    pts = []
    for k in range(min(n, len(flat) // 3)):
        x, y, c = flat[3 * k:3 * k + 3]
        if c is None or c <= 0:
            pts.append(None)
            continue
        pts.append((x * w, y * h) if normalised else (x, y))
    return pts + [None] * (n - len(pts))


def render_pose(people: list[dict], width: int, height: int, *, normalised: bool = False) -> Image.Image:
    """Draw OpenPose people (``pose_keypoints_2d`` 18 x (x, y, confidence), optional
    ``hand_left/right_keypoints_2d`` 21 points and ``face_keypoints_2d`` 70 points) as ControlNet's
    annotator does: limbs as ellipses in the 18 OpenPose colours at 60%, joints as dots (radius 4),
    hands as HSV-coloured bones with blue joints, faces as white dots; on black."""
    import cv2

    canvas = np.zeros((height, width, 3), np.uint8)
    stick = 4
    for person in people:
        body = _points(person.get("pose_keypoints_2d", []), 18, width, height, normalised)
        for i, (a, b) in enumerate(LIMBS):
            pa, pb = body[a - 1], body[b - 1]
            if pa is None or pb is None:
                continue
            layer = canvas.copy()
            mx, my = (pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2
            length = math.hypot(pa[0] - pb[0], pa[1] - pb[1])
            angle = math.degrees(math.atan2(pa[1] - pb[1], pa[0] - pb[0]))
            poly = cv2.ellipse2Poly((int(mx), int(my)), (int(length / 2), stick), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(layer, poly, COLOURS[i])
            canvas = cv2.addWeighted(canvas, 0.4, layer, 0.6, 0)
        for i, p in enumerate(body):
            if p is not None:
                cv2.circle(canvas, (int(p[0]), int(p[1])), 4, COLOURS[i], thickness=-1)
        for key in ("hand_left_keypoints_2d", "hand_right_keypoints_2d"):
            hand = _points(person.get(key) or [], 21, width, height, normalised)
            for e, (a, b) in enumerate(HAND_EDGES):
                if hand[a] is None or hand[b] is None:
                    continue
                hsv = np.uint8([[[int(180 * e / len(HAND_EDGES)), 255, 255]]])
                colour = tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
                cv2.line(canvas, tuple(int(v) for v in hand[a]), tuple(int(v) for v in hand[b]), colour, 2)
            for p in hand:
                if p is not None:
                    cv2.circle(canvas, (int(p[0]), int(p[1])), 4, (0, 0, 255), thickness=-1)
        for p in _points(person.get("face_keypoints_2d") or [], 70, width, height, normalised):
            if p is not None:
                cv2.circle(canvas, (int(p[0]), int(p[1])), 3, (255, 255, 255), thickness=-1)
    return Image.fromarray(canvas, "RGB")


def render_pose_json(path, width: int | None = None, height: int | None = None) -> Image.Image:
    """Render an OpenPose JSON file ({"people": [...], "canvas_width": W, "canvas_height": H};
    coordinates in pixels, or in 0-1 when every one is <= 1) at its canvas size or width x height."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        people = data["people"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest("pose", f"{p}: not an OpenPose JSON file with a 'people' list ({exc})") from None
    coords = [v for person in people for k in ("pose_keypoints_2d",) for i, v in enumerate(person.get(k, [])) if i % 3 < 2]
    normalised = bool(coords) and max(coords) <= 1.0
    W = int(data.get("canvas_width") or width or 512)
    H = int(data.get("canvas_height") or height or 512)
    img = render_pose(people, W, H, normalised=normalised)
    if width and height and (W, H) != (width, height):
        img = img.resize((width, height), Image.NEAREST)
    return img


def openpose(img, a=None, b=None, models_dir=None, **_) -> Image.Image:
    """OpenPose map: a pose JSON path is rendered; a picture needs a pose-detection model."""
    if isinstance(img, (str, Path)):
        return render_pose_json(img)
    raise ModelNotFound("openpose keypoint detection needs a pose model, and danqing has none that runs offline "
                        "(mediapipe's bundled models need numpy<2); give the pose as an OpenPose JSON file "
                        "(people[].pose_keypoints_2d, 18 x (x, y, confidence)) instead of a picture")
