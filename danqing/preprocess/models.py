"""Model-based preprocessors: depth and normal maps (a user-provided transformers depth model),
and OpenPose skeletons (rendered from pose JSON, or detected by a user-provided ViTPose model,
optionally with a user-provided person detector).

No annotator weights ship with danqing and none can be downloaded: each function says which
files it needs and where to put them when they are absent. A greyscale picture (R = G = B) is
taken as an already made depth map, so a user can always supply the map instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

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


# -- OpenPose keypoint detection (ViTPose, top-down) --------------------------------------------------
POSE_FOLDER = "openpose"           # models_dir/preprocessors/openpose/: a transformers ViTPose folder
PERSON_FOLDER = "person_detector"  # models_dir/preprocessors/person_detector/: optional object detector
POSE_FILES = "config.json, model.safetensors and preprocessor_config.json"

# COCO-17 (Lin et al. 2014, the keypoint order of COCO's person category, which ViTPose predicts):
COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle")
# OpenPose-18 (Cao et al. 2019, the order of OpenPose's 18-keypoint COCO body model; what ControlNet's
# annotator draws, and what LIMBS / COLOURS above index):
OPENPOSE_KEYPOINTS = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
                      "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
                      "right_eye", "left_eye", "right_ear", "left_ear")


def coco_to_openpose(keypoints, scores, threshold: float = 0.3) -> list[float]:
    """COCO-17 keypoints -> OpenPose-18 ``pose_keypoints_2d`` (18 x (x, y, confidence), flat).

    COCO order (``COCO_KEYPOINTS``): nose, l/r eye, l/r ear, l/r shoulder, l/r elbow, l/r wrist,
    l/r hip, l/r knee, l/r ankle. OpenPose order (``OPENPOSE_KEYPOINTS``): nose, neck, r-shoulder,
    r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist, r-hip, r-knee, r-ankle, l-hip, l-knee,
    l-ankle, r-eye, l-eye, r-ear, l-ear. The neck, which COCO lacks, is the midpoint of the two
    shoulders when both are confident (the rule DWPose uses in controlnet_aux); its confidence is
    the lower of the two (our choice). A keypoint under ``threshold`` is dropped: written as
    (0, 0, 0), which the renderer skips.

    Args:
        keypoints: (17, 2) pixel coordinates (x, y) in COCO order.
        scores: (17,) confidences.
        threshold: the lowest confidence kept.
    """
    kp = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)[:17]
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)[:17]
    if len(kp) != 17 or len(sc) != 17:
        raise InvalidRequest("pose", f"expected 17 COCO keypoints and scores, got {len(kp)} and {len(sc)}")
    index = {name: i for i, name in enumerate(COCO_KEYPOINTS)}
    flat: list[float] = []
    for name in OPENPOSE_KEYPOINTS:
        if name == "neck":
            ls, rs = index["left_shoulder"], index["right_shoulder"]
            ok = sc[ls] >= threshold and sc[rs] >= threshold
            x, y = (kp[ls] + kp[rs]) / 2
            c = min(sc[ls], sc[rs])
        else:
            i = index[name]
            ok = sc[i] >= threshold
            (x, y), c = kp[i], sc[i]
        flat += [float(x), float(y), float(c)] if ok else [0.0, 0.0, 0.0]
    return flat


def _wholebody_parts(keypoints, scores, threshold: float) -> dict:
    """COCO-WholeBody (133 points: 17 body, 6 feet, 68 face, 21 left hand, 21 right hand; Jin et
    al. 2020) -> OpenPose's ``face_keypoints_2d`` (its first 68 points) and hand keypoints."""
    def flat(lo, hi):
        out = []
        for (x, y), c in zip(np.asarray(keypoints)[lo:hi], np.asarray(scores)[lo:hi]):
            out += [float(x), float(y), float(c)] if c >= threshold else [0.0, 0.0, 0.0]
        return out

    return {"face_keypoints_2d": flat(23, 91), "hand_left_keypoints_2d": flat(91, 112),
            "hand_right_keypoints_2d": flat(112, 133)}


def _missing_pose(models_dir) -> ModelNotFound:
    where = (Path(models_dir) / PREPROCESSOR_DIR / POSE_FOLDER if models_dir
             else f"<models>/{PREPROCESSOR_DIR}/{POSE_FOLDER}")
    return ModelNotFound(f"openpose keypoint detection needs a transformers ViTPose model folder in {where}/ "
                         f"({POSE_FILES}, e.g. usyd-community/vitpose-base-simple saved with save_pretrained; "
                         f"local files only); or give the pose as an OpenPose JSON file instead of a picture")


def detect_people(img: Image.Image, folder: Path, threshold: float = 0.5) -> list[list[float]]:
    """Person boxes, COCO (x, y, width, height) in pixels, from a transformers object-detection
    folder (RT-DETR, DETR, ...; its ``id2label`` must have a "person" class)."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    person = [int(i) for i, name in model.config.id2label.items() if str(name).lower() == "person"]
    if not person:
        raise InvalidRequest("pose", f"{folder}: the object detector has no 'person' class (its classes: "
                             f"{', '.join(list(map(str, model.config.id2label.values()))[:8])}, ...)")
    with torch.no_grad():
        out = model(**processor(images=img.convert("RGB"), return_tensors="pt"))
    res = processor.post_process_object_detection(out, threshold=threshold, target_sizes=[(img.height, img.width)])[0]
    boxes = []
    for label, (x1, y1, x2, y2) in zip(res["labels"].tolist(), res["boxes"].tolist()):
        if label in person:
            x1, y1 = max(0.0, x1), max(0.0, y1)
            x2, y2 = min(float(img.width), x2), min(float(img.height), y2)
            if x2 - x1 >= 1 and y2 - y1 >= 1:
                boxes.append([x1, y1, x2 - x1, y2 - y1])
    return boxes


def load_pose_model(folder: Path):
    """(VitPoseForPoseEstimation, VitPoseImageProcessorPil) from a local folder."""
    from transformers import VitPoseForPoseEstimation, VitPoseImageProcessorPil

    try:
        model = VitPoseForPoseEstimation.from_pretrained(folder, local_files_only=True).eval()
        processor = VitPoseImageProcessorPil.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{folder}: not a complete ViTPose folder; it needs {POSE_FILES} "
                            f"({str(exc).splitlines()[0][:160]})") from None
    return model, processor


def estimate_poses(img: Image.Image, model, processor, boxes: list[list[float]]):
    """ViTPose (Xu et al. 2022), top-down: each person box is cropped and warped to the model's
    input size, heatmaps predicted, and decoded back to picture pixels by the image processor's
    ``post_process_pose_estimation`` (argmax + DARK refinement, then the box's affine inverse).

    Args:
        boxes: COCO boxes (x, y, width, height) in ``img``'s pixels.

    Returns:
        one (keypoints (K, 2) pixels, scores (K,)) per box.
    """
    import torch

    if not boxes:
        return []
    inputs = processor(img.convert("RGB"), boxes=[boxes], return_tensors="pt")
    kwargs = {}
    if getattr(model.config.backbone_config, "num_experts", 1) > 1:  # ViTPose+ : expert 0 is COCO
        kwargs["dataset_index"] = torch.zeros(len(boxes), dtype=torch.long)
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    return decode_heatmaps(processor, out.heatmaps, boxes)


def decode_heatmaps(processor, heatmaps, boxes: list[list[float]]):
    """(N, K, h, w) ViTPose heatmaps of N person boxes -> one (keypoints (K, 2) in picture
    pixels, scores (K,)) per box, through the image processor's ``post_process_pose_estimation``
    (the box's centre and scale, padded by 1.25 and widened to the model's aspect ratio exactly
    as its preprocessing cropped it)."""
    from transformers.models.vitpose.modeling_vitpose import VitPoseEstimatorOutput

    results = processor.post_process_pose_estimation(VitPoseEstimatorOutput(heatmaps=heatmaps), boxes=[boxes])[0]
    return [(r["keypoints"].numpy(), r["scores"].numpy()) for r in results]


def detect_openpose(img: Image.Image, models_dir, threshold: float = 0.3, person_threshold: float = 0.5) -> dict:
    """An OpenPose JSON document ({"canvas_width", "canvas_height", "people": [...]}, pixel
    coordinates) of the people in ``img``: person boxes from ``preprocessors/person_detector/``
    when that folder holds a model, else the whole picture as one person; keypoints from the
    ViTPose model in ``preprocessors/openpose/``; COCO-17 mapped to OpenPose-18
    (``coco_to_openpose``); COCO-WholeBody models also give hands and face."""
    folder = model_folder(POSE_FOLDER, models_dir)
    if folder is None:
        raise _missing_pose(models_dir)
    img = img.convert("RGB")
    detector = model_folder(PERSON_FOLDER, models_dir)
    whole = [[0.0, 0.0, float(img.width), float(img.height)]]  # no detector: the picture is one person's box
    boxes = detect_people(img, detector, person_threshold) if detector else whole
    model, processor = load_pose_model(folder)
    people = []
    for kp, sc in estimate_poses(img, model, processor, boxes):
        if len(kp) < 17:
            raise InvalidRequest("pose", f"{folder}: the pose model predicts {len(kp)} keypoints; OpenPose needs "
                                 f"the 17 COCO body keypoints (or 133 COCO-WholeBody)")
        person = {"pose_keypoints_2d": coco_to_openpose(kp[:17], sc[:17], threshold)}
        if len(kp) == 133:
            person.update(_wholebody_parts(kp, sc, threshold))
        people.append(person)
    return {"canvas_width": img.width, "canvas_height": img.height, "people": people}


def openpose(img, a=None, b=None, models_dir=None, **_) -> Image.Image:
    """OpenPose map: a pose JSON path is rendered; a picture's keypoints are detected by the
    ViTPose model in ``models_dir/preprocessors/openpose/`` (``a``: keypoint confidence
    threshold, ``b``: person-box threshold). The detected JSON document is kept in the
    image's ``info["openpose"]``."""
    if isinstance(img, (str, Path)):
        return render_pose_json(img)
    pose = detect_openpose(img, models_dir, 0.3 if a is None else float(a), 0.5 if b is None else float(b))
    out = render_pose(pose["people"], pose["canvas_width"], pose["canvas_height"])
    out.info["openpose"] = json.dumps(pose)
    return out
