"""The mouth of a real photo moved by a viseme track (docs/apps.md, "Talking portrait").

dlib's 68-point landmarks (``shape_predictor_68_face_landmarks.dat`` from the
``face-recognition-models`` package; its iBUG 300-W training data allows research use only, see
docs/apps.md) give the lips (48-67) and the jaw (0-16). For each frame the lower lip and the chin
move down by the frame's openness and the mouth corners in or out by its width; a piecewise-affine
warp (scikit-image) carries the pixels with them, the opened gap between the lips is shaded as
the inside of a mouth, and the result is blended back inside a feathered mask. The mask is the
hull of the lips and the lower jaw at their widest opening, dilated: every pixel outside it is
the photo's own (changed by 0/255). No lip-sync model is involved: teeth and tongue are not
drawn, and the mouth opens as a stretched photo of a closed one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from danqing.errors import InvalidRequest, ModelNotFound
from danqing.faces.dlib_backend import INSTALL, _import_dlib, model_folder

LANDMARKS_68 = "shape_predictor_68_face_landmarks.dat"
# landmark index -> (share of the opening it moves down, share of the width change it moves out)
MOVES = {
    # lower lip (outer 55-59, inner 65-67) follows the jaw; corners half-way
    **{i: (1.0, 0.0) for i in (56, 57, 58, 65, 66, 67)}, 55: (0.75, 0.35), 59: (0.75, -0.35),
    48: (0.45, -1.0), 54: (0.45, 1.0), 60: (0.45, -1.0), 64: (0.45, 1.0),
    # upper lip lifts a little
    **{i: (-0.12, 0.0) for i in (50, 51, 52, 61, 62, 63)}, 49: (-0.08, -0.35), 53: (-0.08, 0.35),
    # the jaw: the chin most, the cheeks less
    8: (0.8, 0.0), 7: (0.7, 0.0), 9: (0.7, 0.0), 6: (0.5, 0.0), 10: (0.5, 0.0), 5: (0.25, 0.0), 11: (0.25, 0.0),
}
INNER = list(range(60, 68))  # the inner lip contour
STILL = [2, 3, 4, 12, 13, 14, 31, 32, 33, 34, 35]  # cheeks and nose: kept in place


@dataclass(frozen=True)
class MouthRig:
    """What every frame of one photo shares: its 68 landmarks, the opening scale and the mask.

    Attributes:
        points: (68, 2) landmarks (x, y) in pixels.
        scale: pixels the lower lip drops at openness 1 (a quarter of nose-to-chin).
        box: (x0, y0, x1, y1) crop that holds the mask.
        region: (H, W) bool, the dilated mouth region (nothing outside it changes).
        alpha: (h, w) float blend weight inside ``box`` (0 at the region's edge, 1 inside).
        anchors: (K, 2) fixed points on the region's edge, in crop coordinates.
        triangles: (T, 3) the Delaunay triangles of the rest points (``MOVES`` and ``STILL``
            landmarks, then the anchors), kept for every frame.
    """

    points: np.ndarray
    scale: float
    box: tuple[int, int, int, int]
    region: np.ndarray
    alpha: np.ndarray
    anchors: np.ndarray
    triangles: np.ndarray


def landmarks_available() -> bool:
    """Whether dlib and the 68-point model file are installed."""
    try:
        _import_dlib()
        return (model_folder() / LANDMARKS_68).is_file()
    except ModelNotFound:
        return False


class Landmarks68:
    """dlib's HOG face detector and 68-point landmark predictor (loaded once per object)."""

    def __init__(self):
        dlib = _import_dlib()
        path = model_folder() / LANDMARKS_68
        if not path.is_file():
            raise ModelNotFound(f"{path}: missing (reinstall: {INSTALL})")
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(path))
        self.version = f"dlib {dlib.__version__}; hog detector, {LANDMARKS_68}"

    def face_box(self, image: np.ndarray) -> tuple[int, int, int, int] | None:
        """(left, top, right, bottom) of the largest face of an RGB (H, W, 3) uint8 picture; None
        when there is none (searched as found, then upsampled x2)."""
        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        rects = self._detector(image, 0) or self._detector(image, 1)
        if not rects:
            return None
        r = max(rects, key=lambda r: r.width() * r.height())
        return r.left(), r.top(), r.right(), r.bottom()

    def points(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """(68, 2) float landmarks of the face in ``box`` (from ``face_box``)."""
        import dlib

        shape = self._predictor(np.ascontiguousarray(image[..., :3], dtype=np.uint8), dlib.rectangle(*box))
        return np.array([(p.x, p.y) for p in shape.parts()], np.float64)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """(68, 2) float landmarks of the largest face; None when there is no face."""
        box = self.face_box(image)
        return None if box is None else self.points(image, box)


def inner_gap(points: np.ndarray) -> float:
    """How far apart the lips are: the mean inner-lip gap (61-67, 62-66, 63-65) over the
    nose-to-chin distance (33-8), so it does not depend on the face's size."""
    gap = np.mean([np.linalg.norm(points[a] - points[b]) for a, b in ((61, 67), (62, 66), (63, 65))])
    return float(gap / max(np.linalg.norm(points[33] - points[8]), 1.0))


def moved(points: np.ndarray, opening: float, width: float, scale: float) -> np.ndarray:
    """The 68 landmarks with the mouth at ``opening`` (0..1) and ``width`` (1 = rest): each point
    of ``MOVES`` goes down by its share of ``opening * scale`` and sideways by its share of half
    the mouth's width change."""
    out = points.copy()
    half_width = np.linalg.norm(points[54] - points[48]) / 2
    for i, (down, side) in MOVES.items():
        out[i, 1] += down * opening * scale
        out[i, 0] += side * (width - 1.0) * half_width
    return out


def make_rig(image: np.ndarray, points: np.ndarray, max_open: float = 1.0,
             widths: tuple[float, float] = (0.7, 1.15)) -> MouthRig:
    """The mask and anchors of one photo.

    Args:
        image: RGB (H, W, 3) uint8.
        points: its (68, 2) landmarks.
        max_open: the widest opening the frames may ask for (the region must hold it).
        widths: the narrowest and widest mouth the frames may ask for.
    """
    import cv2

    h, w = image.shape[:2]
    scale = 0.25 * float(np.linalg.norm(points[33] - points[8]))
    moving = sorted(MOVES)
    extremes = np.concatenate([points[moving], moved(points, max_open, widths[1], scale)[moving],
                               moved(points, max_open, widths[0], scale)[moving]])
    margin = max(3, int(round(0.35 * scale)))
    hull = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(np.round(extremes).astype(np.int32)), 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    region = cv2.dilate(hull, kernel) > 0
    ys, xs = np.nonzero(region)
    x0, y0 = max(int(xs.min()) - 2, 0), max(int(ys.min()) - 2, 0)
    x1, y1 = min(int(xs.max()) + 3, w), min(int(ys.max()) + 3, h)
    inside = region[y0:y1, x0:x1].astype(np.uint8)
    # feathered: 0 on the region's edge, rising to 1 over ``margin`` pixels inwards
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    alpha = np.clip(dist / max(margin * 0.8, 1.0), 0.0, 1.0) * (inside > 0)
    contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    edge = max(contours, key=len)[:, 0, :].astype(np.float64)
    anchors = edge[np.linspace(0, len(edge), 32, endpoint=False).astype(int)]
    corners = np.array([[0, 0], [x1 - x0 - 1, 0], [0, y1 - y0 - 1], [x1 - x0 - 1, y1 - y0 - 1]], np.float64)
    if region.all():
        raise InvalidRequest("picture", "the face fills the whole picture; a talking portrait needs some margin around the mouth")
    from scipy.spatial import Delaunay

    anchors = np.concatenate([anchors, corners])
    rest = np.concatenate([points[sorted(MOVES) + STILL] - np.array([x0, y0], np.float64), anchors])
    return MouthRig(points, scale, (x0, y0, x1, y1), region, alpha, anchors, Delaunay(rest).simplices)


def piecewise_affine_map(dst: np.ndarray, src: np.ndarray, triangles: np.ndarray,
                         shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel of an (h, w) picture, where to read it: each triangle of ``dst`` is filled
    with its index, and a pixel reads through its triangle's affine map onto the same triangle of
    ``src`` (a piecewise-affine map, as scikit-image's ``PiecewiseAffineTransform``; rasterised
    with OpenCV here, 20x faster). Pixels outside every triangle read themselves.

    Args:
        dst, src: (K, 2) points (x, y); ``triangles``: (T, 3) indices into them.

    Returns:
        (map_x, map_y), (h, w) float32 each, for ``cv2.remap``.
    """
    import cv2

    h, w = shape
    label = np.full((h, w), -1, np.int32)
    for k, tri in enumerate(triangles):
        cv2.fillConvexPoly(label, np.round(dst[tri] * 16).astype(np.int32), int(k), lineType=cv2.LINE_8, shift=4)
    affine = np.stack([cv2.getAffineTransform(dst[t].astype(np.float32), src[t].astype(np.float32))
                       for t in triangles] + [np.array([[1, 0, 0], [0, 1, 0]], np.float64)])  # (T + 1, 2, 3)
    m = affine[label]  # (h, w, 2, 3); label -1 picks the identity at the end
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    map_x = m[..., 0, 0] * xs + m[..., 0, 1] * ys + m[..., 0, 2]
    map_y = m[..., 1, 0] * xs + m[..., 1, 1] * ys + m[..., 1, 2]
    return map_x.astype(np.float32), map_y.astype(np.float32)


def render_mouth(image: np.ndarray, rig: MouthRig, opening: float, width: float = 1.0) -> np.ndarray:
    """One frame: ``image`` with its mouth at ``opening`` and ``width``.

    The crop around the mouth is warped piecewise-affinely so that the landmarks
    go to ``moved(...)`` while the anchors on the region's edge and the nose and cheeks stay;
    the gap between the inner lips is shaded dark in proportion to the opening; the crop is then
    blended back with ``rig.alpha`` (outside the region the picture is untouched).
    """
    import cv2

    x0, y0, x1, y1 = rig.box
    crop = image[y0:y1, x0:x1].astype(np.float32) / 255.0
    offset = np.array([x0, y0], np.float64)
    target = moved(rig.points, opening, width, rig.scale)
    ids = sorted(MOVES) + STILL
    src = np.concatenate([rig.points[ids] - offset, rig.anchors])
    dst = np.concatenate([target[ids] - offset, rig.anchors])
    map_x, map_y = piecewise_affine_map(dst, src, rig.triangles, crop.shape[:2])
    warped = cv2.remap(crop, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float64)
    # the opened mouth: the inner-lip polygon, shaded towards a dark mouth colour
    hole = np.zeros(crop.shape[:2], np.float32)
    cv2.fillPoly(hole, [np.round(target[INNER] - offset).astype(np.int32)], 1.0)
    # what showed between the lips at rest (teeth) stays where the upper lip now is; below it, dark
    rest_gap = rig.points[INNER] - offset + (target[62] - rig.points[62])
    cv2.fillPoly(hole, [np.round(rest_gap).astype(np.int32)], 0.0)
    hole = cv2.GaussianBlur(hole, (0, 0), max(rig.scale * 0.06, 0.8))
    shade = (np.clip(opening * 1.6, 0.0, 1.0) * hole)[..., None]
    warped = warped * (1 - shade) + np.array([0.22, 0.08, 0.08]) * warped * shade
    a = rig.alpha[..., None]
    out = image.copy()
    blended = crop * (1 - a) + warped * a
    out[y0:y1, x0:x1] = np.where(a > 0, np.clip(np.round(blended * 255), 0, 255), image[y0:y1, x0:x1]).astype(np.uint8)
    return out
