"""The portrait world's face backend: danqing-portrait-faces, a small face recogniser trained by
danqing on rendered people (``danqing train faces``), so that the portrait studio can rank the
cartoon people of danqing-tiny-portraits as it ranks photos with dlib's or OpenCV's models.

No photo detector finds a 64-pixel cartoon face, and the portrait world needs none: it frames
every person the same way (head and shoulders, the head's centre at 42% of the height). The
detector of this backend is that framing: one face per picture, its box and five points where
the world puts them, scaled to the picture. It is for pictures of the portrait world only.

The recogniser is a convolutional network (four stages, 128-d output) trained as face
recognisers are (CosFace: a cosine classifier with a margin over the training people), on
pictures of each person in other clothes, expressions, poses, backgrounds and renderings, half of
them blurred and noisy. It never sees a held-out person; how far apart held-out people land is
measured by the trainer and kept in its config (``same_person_distance``).
"""

from __future__ import annotations

import json
import threading
from importlib import resources
from pathlib import Path

import numpy as np

from danqing.errors import ModelNotFound
from danqing.faces.backend import Face, FaceBackend, cosine

MODEL = "danqing-portrait-faces"
# where the portrait world puts a face, as fractions of the picture (synthetic.portraits):
# the largest head's box, the eyes' centres and the nose
FRAMING = {"box": (0.27, 0.15, 0.73, 0.69), "left_eye": (0.415, 0.45), "right_eye": (0.585, 0.45),
           "nose": (0.5, 0.52), "mouth_left": (0.44, 0.585), "mouth_right": (0.56, 0.585)}


def build_net(widths: tuple[int, ...] = (16, 32, 64, 128), dim: int = 128, size: int = 64):
    """The recogniser: ``len(widths)`` stages of two 3x3 convolutions (the second halves the
    side), batch norm and ReLU, then a linear map of the flattened last stage to ``dim``."""
    from torch import nn

    layers, c = [], 3
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                   nn.Conv2d(w, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c = w
    side = size // 2 ** len(widths)
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(0.1), nn.Linear(c * side * side, dim), nn.BatchNorm1d(dim))


def framed_face(width: int, height: int) -> Face:
    """The face where the portrait world frames it, in a picture of ``width`` x ``height``."""
    at = lambda p: (p[0] * width, p[1] * height)  # noqa: E731
    b = FRAMING["box"]
    names = ("left_eye", "right_eye", "nose")
    points = np.array([at(FRAMING[k]) for k in (*names, "mouth_left", "mouth_right")], np.float64)
    return Face((*at(b[:2]), *at(b[2:])), 1.0, points, *(at(FRAMING[k]) for k in names))


def context_crop(image: np.ndarray, face: Face, size: int, context: float) -> np.ndarray:
    """The square around ``face`` that the recogniser reads: side ``context`` x the box's width
    (head, hair and shoulders), centred on the box, edges repeated where it leaves the picture,
    resized to ``size``."""
    import cv2

    l, t, r, b = face.box
    side = context * (r - l)
    cx, cy = (l + r) / 2, (t + b) / 2
    m = np.float32([[size / side, 0, size / 2 - cx * size / side], [0, size / side, size / 2 - cy * size / side]])
    return cv2.warpAffine(np.ascontiguousarray(image[..., :3]), m, (size, size), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_REPLICATE)


def embed_crops(net, crops: np.ndarray) -> np.ndarray:
    """Unit-length embeddings (N, dim) float32 of context crops (N, size, size, 3) uint8 by the
    recogniser ``net`` (in eval mode): pixels scaled to [-1, 1], as in training."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        return torch.nn.functional.normalize(net(x), dim=1).numpy().astype(np.float32)


def model_folder(name: str = MODEL) -> Path:
    return Path(str(resources.files("danqing").joinpath(f"data/models/{name}")))


class WorldBackend(FaceBackend):
    """The portrait world's framing as detector, danqing-portrait-faces as recogniser
    (``distance`` = 1 - cosine similarity)."""

    name = "world"
    confident_score = 0.5
    duplicate_distance = 0.02

    def __init__(self, folder: str | Path | None = None):
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else model_folder()
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ModelNotFound(f"{folder}: no danqing-portrait-faces model (config.json, model.safetensors); "
                                f"train one with `danqing train faces`")
        self.config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        c = self.config
        self._net = build_net(tuple(c["widths"]), c["dim"], c["size"]).eval()
        self._net.load_state_dict(load_file(folder / "model.safetensors"))
        self.same_person_distance = float(c["same_person_distance"])
        self.version = f"{MODEL} ({c.get('trained', {}).get('steps', '?')} steps)"
        self._lock = threading.Lock()   # one forward pass at a time on the shared network

    def detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        return [framed_face(w, h)]

    def embed_many(self, crops: np.ndarray) -> np.ndarray:
        """Unit-length embeddings (N, dim) of context crops (N, size, size, 3) uint8."""
        with self._lock:
            return embed_crops(self._net, crops)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        crop = context_crop(np.asarray(image), face, self.config["size"], self.config["context"])
        return self.embed_many(crop[None])[0]

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return 1.0 - cosine(a, b)


__all__ = ["FRAMING", "MODEL", "WorldBackend", "build_net", "context_crop", "embed_crops", "framed_face",
           "model_folder"]
