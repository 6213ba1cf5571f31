"""Faces in real photos: detection with five landmarks, identity embeddings, alignment, face
fusion and ranking by identity (docs/apps.md, "Portrait studio").

Backends (``load_backend``; the table ``BACKENDS``): dlib's models from the
``face-recognition-models`` package, the user's OpenCV YuNet / SFace ONNX files, or "world":
danqing's own recogniser of the portrait world's cartoon people (``world_backend``). This package
sits beside ``danqing.models`` (it loads model files) and imports nothing of the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from danqing.errors import InvalidRequest
from danqing.faces.backend import Face, FaceBackend, cosine
from danqing.faces.dlib_backend import DlibBackend
from danqing.faces.opencv_backend import OpenCVBackend
from danqing.faces.world_backend import WorldBackend

__all__ = ["BACKENDS", "Face", "FaceBackend", "cosine", "load_backend"]


def _dlib(models_dir: Path | None, **options):
    return DlibBackend(**options)


def _opencv(models_dir: Path | None, **options):
    return OpenCVBackend.from_folder(Path(models_dir or "models") / "faces", **options)


def _world(models_dir: Path | None, **options):
    return WorldBackend(**options)


# name -> loader(models_dir, **options); what each needs is in docs/apps.md ("Face models")
BACKENDS: dict[str, Callable[..., FaceBackend]] = {"dlib": _dlib, "opencv": _opencv, "world": _world}


def load_backend(name: str = "dlib", *, models_dir: str | Path | None = None, **options) -> FaceBackend:
    """The face backend called ``name``, its models loaded.

    Args:
        name: a key of ``BACKENDS``: "dlib" (models from the face-recognition-models package),
            "opencv" (the user's YuNet / SFace ONNX files in ``models_dir/faces/``) or "world"
            (danqing-portrait-faces, for pictures of the portrait world).
        models_dir: danqing's models folder (the OpenCV backend's files are in its ``faces/``).
        options: passed to the backend (dlib: ``detector="hog"`` or ``"cnn"``).

    Raises:
        InvalidRequest: an unknown name (the known ones are listed).
        ModelNotFound: the backend's model files are missing (the message says which and where).
    """
    if name not in BACKENDS:
        raise InvalidRequest("face_backend", f"unknown face backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return BACKENDS[name](Path(models_dir) if models_dir is not None else None, **options)
