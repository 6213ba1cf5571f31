"""Typed errors. Every message is one line that says what was wrong and what is allowed.

The CLI prints ``str(error)`` and exits with code 2; the server answers 4xx with the same text.
"""

from __future__ import annotations


class DanqingError(Exception):
    """Base class for every error danqing raises on purpose."""


class InvalidRequest(DanqingError, ValueError):
    """A request field is out of range, of the wrong kind, or unknown."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class PromptSyntaxError(DanqingError, ValueError):
    """A prompt does not follow the A1111 prompt syntax."""


class UnknownSampler(InvalidRequest):
    """A sampler or schedule type that danqing cannot provide."""


class ModelError(DanqingError):
    """A model file is missing, corrupt, of an unknown family, or does not fit."""


class ModelNotFound(ModelError, FileNotFoundError):
    pass


class CorruptModel(ModelError):
    pass


class UnknownFamily(ModelError):
    pass


class IncompatibleModel(ModelError):
    """A component (VAE, LoRA, ControlNet, ...) that does not fit the loaded model."""


class ImageError(DanqingError, ValueError):
    """An image file that cannot be read or carries no usable metadata."""


class OutOfMemory(DanqingError, MemoryError):
    """A training or generation step did not fit in the device's memory."""
