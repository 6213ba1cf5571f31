"""The face backend interface: detect faces (boxes, five landmarks, a score) and embed one face
as a vector, with the name and version that go into metadata.

A backend is chosen by name (``danqing.faces.load_backend("dlib")``). Pictures are RGB
``uint8`` arrays of shape (H, W, 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Face:
    """One detected face.

    Attributes:
        box: (left, top, right, bottom) in pixels of the picture it was found in.
        score: the detector's confidence (its own scale: see ``FaceBackend.confident_score``).
        points: (5, 2) float landmarks in the backend's own order (the same backend's faces can
            be matched point by point, e.g. for fusion).
        left_eye, right_eye: eye centres, (x, y); "left" is the eye on the picture's left.
        nose: the nose point, (x, y).
    """

    box: tuple[float, float, float, float]
    score: float
    points: np.ndarray = field(repr=False)
    left_eye: tuple[float, float] = (0.0, 0.0)
    right_eye: tuple[float, float] = (0.0, 0.0)
    nose: tuple[float, float] = (0.0, 0.0)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def side(self) -> float:
        """The shorter side of the box, in pixels: the face's size."""
        return min(self.width, self.height)

    def scaled(self, s: float) -> "Face":
        """The same face in a picture scaled by ``s``."""
        return Face(tuple(v * s for v in self.box), self.score, self.points * s,
                    _mul(self.left_eye, s), _mul(self.right_eye, s), _mul(self.nose, s))


def _mul(p: tuple[float, float], s: float) -> tuple[float, float]:
    return (p[0] * s, p[1] * s)


class FaceBackend:
    """What every backend provides (subclasses fill it in).

    Attributes:
        name: short name for metadata and the command line ("dlib", "opencv").
        version: library and model files, for metadata.
        confident_score: a detection at or above this score is surely a face (a second face
            this confident makes a photo a group photo).
        same_person_distance: ``distance`` below this: the same person (the model's own threshold).
        duplicate_distance: ``distance`` below this: the same photo again (resized, recompressed,
            cropped).
    """

    name = "?"
    version = "?"
    confident_score = 0.5
    same_person_distance = 0.6
    duplicate_distance = 0.1

    def detect(self, image: np.ndarray) -> list[Face]:
        """The faces of an RGB (H, W, 3) uint8 picture, most confident first."""
        raise NotImplementedError

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The identity vector (128,) float32 of ``face`` in ``image``."""
        raise NotImplementedError

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """How far apart two embeddings are in the model's own metric (0 = the same)."""
        return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))

    def describe(self) -> str:
        return f"{self.name} ({self.version})"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (1 = the same direction)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
