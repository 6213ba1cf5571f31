"""Pure functions of a face's landmarks and pixels: the similarity transform that levels the
eyes and frames a crop, how far a face is turned, how sharp it is, and the face region."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from danqing.faces.backend import Face

SHARPNESS_SIDE = 128  # the face box is measured at 128 x 128 pixels


@dataclass(frozen=True)
class Framing:
    """Where the eyes go in a square crop of side ``size``.

    Attributes:
        eye_span: the face's span (the distance between the eye centres, or more for a turned
            face: ``face_span``) as a fraction of the side.
        eye_y: the height of the eye line as a fraction of the side (from the top).
    """

    eye_span: float
    eye_y: float


FACE = Framing(eye_span=0.25, eye_y=0.42)            # the face fills the crop (brows to chin)
HEAD_AND_SHOULDERS = Framing(eye_span=0.11, eye_y=0.36)  # the head, neck and shoulders


def eye_angle(face: Face) -> float:
    """The eye line's angle in degrees (0 = level; positive: the picture-right eye is lower)."""
    (lx, ly), (rx, ry) = face.left_eye, face.right_eye
    return float(np.degrees(np.arctan2(ry - ly, rx - lx)))


def face_span(face: Face) -> float:
    """The face's size in pixels for framing: the eye distance, or 1.35 x the drop from the eye
    line's middle to the nose when that is larger (a turned face's eyes come closer together;
    on a frontal face the drop is about 0.75 of the eye distance)."""
    le, re, nose = (np.asarray(p, np.float64) for p in (face.left_eye, face.right_eye, face.nose))
    return float(max(np.linalg.norm(re - le), 1.35 * np.linalg.norm(nose - (le + re) / 2), 1.0))


def align_matrix(face: Face, size: int, framing: Framing = FACE) -> np.ndarray:
    """The (2, 3) similarity transform (rotation, uniform scale, shift) from the photo to a
    ``size`` x ``size`` crop with the eyes level, centred, at ``framing``'s place and scale.

    For p in the photo, ``M @ (x, y, 1)`` is its place in the crop.
    """
    le, re = np.asarray(face.left_eye, np.float64), np.asarray(face.right_eye, np.float64)
    theta = np.radians(eye_angle(face))
    k = framing.eye_span * size / face_span(face)
    c, s = np.cos(theta), np.sin(theta)
    rot = k * np.array([[c, s], [-s, c]])  # turns the eye line (cos t, sin t) onto the x axis
    target = np.array([size / 2, framing.eye_y * size])
    return np.hstack([rot, (target - rot @ ((le + re) / 2))[:, None]])


def aligned_crop(image: np.ndarray, face: Face, size: int, framing: Framing = FACE) -> np.ndarray:
    """The ``size`` x ``size`` crop of ``align_matrix``; beyond the photo's edges the edge
    pixels are repeated. A large photo is first scaled down with area averaging (no aliasing)."""
    import cv2

    m = align_matrix(face, size, framing)
    k = float(np.hypot(*m[:, 0]))
    if k < 0.5:  # shrink with INTER_AREA first, then warp the rest of the way
        image = cv2.resize(image, None, fx=2 * k, fy=2 * k, interpolation=cv2.INTER_AREA)
        m = m.copy()
        m[:, :2] /= 2 * k
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def yaw(face: Face) -> float:
    """How far the face is turned, from its landmarks: the nose's place along the eye line,
    -1 (at the picture-left eye) .. 0 (between the eyes: frontal) .. 1 (at the picture-right eye)."""
    le, re, nose = (np.asarray(p, np.float64) for p in (face.left_eye, face.right_eye, face.nose))
    u = re - le
    t = float((nose - le) @ u / max(u @ u, 1e-9))  # 0 at the left eye, 1 at the right
    return 2 * t - 1


def sharpness(image: np.ndarray, face: Face) -> float:
    """Variance of the Laplacian of the face box (grey, scaled to 128 x 128) divided by the
    box's grey variance, x 100: contrast and brightness cancel out. Sharp photos measure about
    6-15; a Gaussian blur of sigma 1 px at a 90 px face gives about 2, sigma 2 px about 0.7."""
    import cv2

    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in face.box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return 0.0
    grey = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1, :3]), cv2.COLOR_RGB2GRAY).astype(np.float32)
    grey = cv2.resize(grey, (SHARPNESS_SIDE, SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_32F).var() / max(grey.var(), 1e-6) * 100)


def face_mask(shape: tuple[int, int], face: Face, *, grow: float = 0.0) -> np.ndarray:
    """A (H, W) uint8 mask (255 inside) of the face: an ellipse around the eyes and nose,
    turned with the eye line, ``grow`` x the face span wider on every side."""
    import cv2

    span = face_span(face)
    le, re, nose = (np.asarray(p, np.float64) for p in (face.left_eye, face.right_eye, face.nose))
    mid = (le + re) / 2
    centre = mid + 0.8 * (nose - mid)  # the middle of brows to chin, just above the nose point
    axes = (span * (0.95 + grow), span * (1.25 + grow))
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))), (int(round(axes[0])), int(round(axes[1]))),
                eye_angle(face), 0, 360, 255, -1)
    return mask
