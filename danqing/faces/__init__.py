"""Faces in real photos: detection with five landmarks, identity embeddings, alignment, face
fusion and ranking by identity (docs/apps.md, "Portrait studio").

Backends (``load_backend``): dlib's models from the ``face-recognition-models`` package, or the
user's OpenCV YuNet / SFace ONNX files. This package sits beside ``danqing.models`` (it loads
model files) and imports nothing of the engine.
"""

from danqing.faces.backend import BACKENDS, Face, FaceBackend, cosine, load_backend

__all__ = ["BACKENDS", "Face", "FaceBackend", "cosine", "load_backend"]
