"""dlib's face models, as shipped in the ``face-recognition-models`` package (nothing is
downloaded): the HOG frontal-face detector (built into dlib) or the CNN (MMOD) detector, the
5-point landmark predictor and the 128-d ResNet face recogniser.

The 68-point predictor in the same package is never loaded: its training data (iBUG 300-W)
forbids commercial use; the 5 points (eye corners, nose) are all alignment needs. Licences:
docs/apps.md ("Face models").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from danqing.errors import InvalidRequest, ModelNotFound
from danqing.faces.backend import Face, FaceBackend

DETECT_SIDE = 1280  # pictures are searched at this long side at most (larger ones are scaled down)
FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "recogniser": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn": "mmod_human_face_detector.dat",
}
INSTALL = "pip install dlib-bin==20.0.1 face-recognition-models==0.3.0"


def model_folder() -> Path:
    """Where ``face-recognition-models`` keeps its .dat files. The package is located, not
    imported: its ``__init__`` needs ``pkg_resources``, which a venv need not have."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the dlib face backend needs the face-recognition-models package ({INSTALL})")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _import_dlib():
    try:
        import dlib  # optional heavy dependency: imported when a backend is made
    except ImportError:
        raise ModelNotFound(f"the dlib face backend needs dlib ({INSTALL})") from None
    return dlib


class DlibBackend(FaceBackend):
    """dlib's detector, 5-point landmarks and ResNet recogniser.

    Args:
        detector: "hog" (fast, frontal faces) or "cnn" (MMOD: turned faces too, slower on a CPU).
    """

    name = "dlib"
    # HOG scores: real frontal faces 0.6-1.6 in our photos, false alarms below 0.3 at upsample 0.
    confident_score = 0.5
    same_person_distance = 0.6   # dlib's threshold (99.38% on LFW)
    duplicate_distance = 0.1     # the same photo re-saved or cropped: < 0.1; two photos: 0.2-0.5

    def __init__(self, detector: str = "hog"):
        if detector not in ("hog", "cnn"):
            raise InvalidRequest("detector", f"unknown dlib detector {detector!r}; choose hog or cnn")
        dlib = _import_dlib()
        folder = model_folder()
        needed = ["landmarks", "recogniser"] + (["cnn"] if detector == "cnn" else [])
        missing = [FILES[k] for k in needed if not (folder / FILES[k]).is_file()]
        if missing:
            raise ModelNotFound(f"{folder}: missing {', '.join(missing)} (reinstall: {INSTALL})")
        self._dlib = dlib
        self.detector_kind = detector
        self._detector = (dlib.get_frontal_face_detector() if detector == "hog"
                          else dlib.cnn_face_detection_model_v1(str(folder / FILES["cnn"])))
        self._landmarks = dlib.shape_predictor(str(folder / FILES["landmarks"]))
        self._recogniser = dlib.face_recognition_model_v1(str(folder / FILES["recogniser"]))
        self.version = (f"dlib {dlib.__version__}; {detector} detector, {FILES['landmarks']}, "
                        f"{FILES['recogniser']}")

    def _run(self, image: np.ndarray, upsample: int) -> list[tuple[object, float]]:
        """(dlib rectangle, score) pairs of one detector pass."""
        if self.detector_kind == "hog":
            rects, scores, _ = self._detector.run(image, upsample, 0.0)
            return list(zip(rects, scores))
        return [(d.rect, float(d.confidence)) for d in self._detector(image, upsample)]

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces at the picture's scale, most confident first. The search runs on a copy of at
        most ``DETECT_SIDE`` pixels (long side), without upsampling (the HOG window is 80 px),
        and once more upsampled x2 when nothing was found (faces down to 40 px; the CNN detector only
        on pictures up to 640 px)."""
        import cv2

        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        s = min(1.0, DETECT_SIDE / max(image.shape[:2]))
        small = image if s == 1.0 else cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        found = self._run(small, 0)
        if not found and (self.detector_kind == "hog" or max(small.shape[:2]) <= 640):  # the CNN x2 is slow
            found = self._run(small, 1)
        faces = []
        for rect, score in sorted(found, key=lambda f: -f[1]):
            r = self._dlib.rectangle(int(round(rect.left() / s)), int(round(rect.top() / s)),
                                     int(round(rect.right() / s)), int(round(rect.bottom() / s)))
            shape = self._landmarks(image, r)
            pts = np.array([(p.x, p.y) for p in shape.parts()], np.float64)  # (5, 2)
            # dlib's 5 points: 0-1 the picture-right eye's corners, 2-3 the picture-left eye's, 4 the nose
            faces.append(Face((r.left(), r.top(), r.right(), r.bottom()), float(score), pts,
                              tuple(pts[2:4].mean(0)), tuple(pts[0:2].mean(0)), tuple(pts[4])))
        return faces

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        dlib = self._dlib
        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        rect = dlib.rectangle(*(int(round(v)) for v in face.box))
        shape = dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in face.points])
        return np.asarray(self._recogniser.compute_face_descriptor(image, shape), np.float32)  # (128,)
