"""OpenCV's face models from files the user provides (nothing ships with danqing or OpenCV's
wheel): the YuNet detector (``cv2.FaceDetectorYN``) and the SFace recogniser
(``cv2.FaceRecognizerSF``), both ONNX files of the OpenCV Zoo, put in ``models/faces/``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from danqing.errors import ModelNotFound
from danqing.faces.backend import Face, FaceBackend, cosine
from danqing.models.names import within

DETECT_SIDE = 1280
PATTERNS = {"detector": "*yunet*.onnx", "recogniser": "*sface*.onnx"}
EXAMPLES = {"detector": "face_detection_yunet_2023mar.onnx", "recogniser": "face_recognition_sface_2021dec.onnx"}


def find_files(folder: Path) -> dict[str, Path]:
    """The detector and recogniser files of ``folder`` (first by name of each pattern).

    Raises:
        ModelNotFound: one or both are missing (the message names the files to put there).
    """
    folder = Path(folder)
    found = {}
    for kind, pattern in PATTERNS.items():
        files = sorted(within(folder.glob(pattern), folder)) if folder.is_dir() else []
        if files:
            found[kind] = files[0]
    missing = [k for k in PATTERNS if k not in found]
    if missing:
        need = " and ".join(f"a {k} file {PATTERNS[k]} (e.g. OpenCV Zoo's {EXAMPLES[k]})" for k in missing)
        raise ModelNotFound(f"the opencv face backend needs {need} in {folder}/; nothing is downloaded, "
                            f"or use the dlib backend")
    return found


class OpenCVBackend(FaceBackend):
    """YuNet detection and SFace embeddings (``distance`` = 1 - cosine similarity)."""

    name = "opencv"
    confident_score = 0.9            # YuNet's own default threshold
    same_person_distance = 1 - 0.363  # SFace's cosine threshold (OpenCV's face sample)
    duplicate_distance = 0.05         # not measured here (no files): a cautious guess

    def __init__(self, detector: Path, recogniser: Path, *, score_threshold: float = 0.6):
        import cv2

        try:
            self._detector = cv2.FaceDetectorYN.create(str(detector), "", (320, 320), score_threshold, 0.3, 5000)
            self._recogniser = cv2.FaceRecognizerSF.create(str(recogniser), "")
        except cv2.error as exc:
            raise ModelNotFound(f"cannot load {detector.name} / {recogniser.name}: "
                                f"{str(exc).strip().splitlines()[-1]}") from None
        self.version = f"OpenCV {cv2.__version__}; {detector.name}, {recogniser.name}"
        self._lock = threading.Lock()  # YuNet keeps its input size on the object: one call at a time

    @classmethod
    def from_folder(cls, folder: Path, **options) -> "OpenCVBackend":
        files = find_files(folder)
        return cls(files["detector"], files["recogniser"], **options)

    def detect(self, image: np.ndarray) -> list[Face]:
        import cv2

        bgr = np.ascontiguousarray(image[..., 2::-1])
        s = min(1.0, DETECT_SIDE / max(bgr.shape[:2]))
        small = bgr if s == 1.0 else cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        with self._lock:
            self._detector.setInputSize((small.shape[1], small.shape[0]))
            _, rows = self._detector.detect(small)  # (N, 15): x, y, w, h, 5 points, score
        faces = []
        for row in sorted(rows if rows is not None else [], key=lambda r: -r[14]):
            x, y, w, h = (float(v) / s for v in row[:4])
            # YuNet's points: picture-left eye, picture-right eye, nose, mouth corners
            pts = np.asarray(row[4:14], np.float64).reshape(5, 2) / s
            faces.append(Face((x, y, x + w, y + h), float(row[14]), pts, tuple(pts[0]), tuple(pts[1]), tuple(pts[2])))
        return faces

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        bgr = np.ascontiguousarray(image[..., 2::-1])
        x0, y0, x1, y1 = face.box
        row = np.array([x0, y0, x1 - x0, y1 - y0, *face.points.ravel(), face.score], np.float32)[None]
        aligned = self._recogniser.alignCrop(bgr, row)  # (112, 112, 3)
        return np.asarray(self._recogniser.feature(aligned), np.float32).ravel()  # (128,)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return 1.0 - cosine(a, b)
