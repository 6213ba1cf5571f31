"""Face fusion and ranking: put a person's own face into a generated picture, and order pictures
by how much their face looks like the person.

Fusion (FaceChain's last step, done with classical tools): the source face is aligned onto the
picture's face by a similarity transform of their landmarks, then blended in -- by a feathered
alpha mask or by Poisson blending (``cv2.seamlessClone``, Perez et al. 2003) -- inside the face
ellipse. Every change stays inside ``FusionResult.mask`` (the face ellipse grown by
``GROW`` x the face span): outside it the picture is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from danqing.errors import InvalidRequest
from danqing.faces.backend import Face, FaceBackend, cosine
from danqing.faces.geometry import face_mask, face_span

METHODS = ("seamless", "alpha")
GROW = 0.3  # the region that may change: the face ellipse grown by 0.3 face spans


@dataclass
class FusionResult:
    """A fused picture and where it may differ from the original (``mask``: (H, W) uint8, 255
    where pixels may change)."""

    image: np.ndarray
    mask: np.ndarray


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) rotation + uniform scale + shift that best maps points ``src`` (N, 2) onto
    ``dst`` (N, 2) in the least-squares sense (scikit-image's Umeyama estimate)."""
    from skimage.transform import SimilarityTransform

    return SimilarityTransform.from_estimate(np.asarray(src, np.float64), np.asarray(dst, np.float64)).params[:2]


def fuse_face(picture: np.ndarray, picture_face: Face, source: np.ndarray, source_face: Face, *,
              strength: float = 0.5, method: str = "seamless") -> FusionResult:
    """``source_face`` (of ``source``) blended into ``picture`` over ``picture_face``.

    Args:
        picture, source: RGB (H, W, 3) uint8 pictures; the faces come from the same backend
            (their landmarks are matched point by point).
        strength: 0 (the picture unchanged) .. 1 (the source face fully in).
        method: "seamless" (Poisson blending: the source's features, the picture's colours) or
            "alpha" (a feathered cross-fade).

    Raises:
        InvalidRequest: a strength outside 0-1 or an unknown method.
    """
    import cv2

    if not 0.0 <= strength <= 1.0:
        raise InvalidRequest("fuse", f"strength must be between 0 and 1, got {strength}")
    if method not in METHODS:
        raise InvalidRequest("fuse_method", f"unknown fusion method {method!r}; choose one of: {', '.join(METHODS)}")
    h, w = picture.shape[:2]
    m = similarity_transform(source_face.points, picture_face.points)
    warped = cv2.warpAffine(np.ascontiguousarray(source[..., :3]), m, (w, h), flags=cv2.INTER_CUBIC,
                            borderMode=cv2.BORDER_REFLECT)
    core = face_mask((h, w), picture_face)
    region = face_mask((h, w), picture_face, grow=GROW)
    if method == "seamless":
        inner = core.copy()
        inner[[0, -1], :] = 0
        inner[:, [0, -1]] = 0  # seamlessClone needs the mask away from the picture's edge
        x, y, bw, bh = cv2.boundingRect(inner)
        if bw and bh:
            centre = (x + bw // 2, y + bh // 2)  # the mask's box centre: the warped face stays in place
            blended = cv2.seamlessClone(warped[..., ::-1].copy(), np.ascontiguousarray(picture[..., 2::-1]),
                                        inner, centre, cv2.NORMAL_CLONE)[..., ::-1]
        else:
            blended = picture[..., :3]
    else:
        blended = warped
    sigma = max(1.0, 0.12 * face_span(picture_face))
    alpha = cv2.GaussianBlur(core.astype(np.float32) / 255, (0, 0), sigma) * (region > 0)  # 0 outside region
    alpha = (strength * alpha)[..., None]
    base = picture[..., :3].astype(np.float32)
    out = np.clip(np.rint(base + alpha * (blended.astype(np.float32) - base)), 0, 255).astype(np.uint8)
    out[region == 0] = picture[..., :3][region == 0]  # bit-identical outside the region
    return FusionResult(out, region)


def main_face(faces: list[Face]) -> Face | None:
    """The face a picture is about: the most confident (``detect`` lists it first)."""
    return faces[0] if faces else None


def mean_embedding(embeddings: list[np.ndarray]) -> np.ndarray:
    """The person's identity: the mean of the unit-length embeddings (128,)."""
    units = [np.asarray(e, np.float64) / max(np.linalg.norm(e), 1e-12) for e in embeddings]
    return np.mean(units, 0).astype(np.float32)


def identity_scores(pictures: list[np.ndarray], backend: FaceBackend, identity: np.ndarray) -> list[float | None]:
    """Cosine similarity of each picture's main face to ``identity``; None where no face is found."""
    scores: list[float | None] = []
    for pic in pictures:
        face = main_face(backend.detect(pic))
        scores.append(None if face is None else cosine(backend.embed(pic, face), identity))
    return scores


def top_k(scores: list[float | None], k: int) -> list[int]:
    """The indices of the ``k`` best scores, best first (pictures without a face come last)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))
    return order[:max(0, k)]
