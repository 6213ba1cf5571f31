"""丹青 danqing: an offline-first AI painting studio.

Public API::

    from danqing import Studio, Settings, GenerationRequest, STOP
    studio = Studio(Settings.from_env())
    result = studio.generate(GenerationRequest(prompt="a red circle", steps=20), on_step=print)

Importing this package reads no settings, probes no device and touches no network.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Studio", "Settings", "GenerationRequest", "GenerationResult", "StepInfo", "STOP", "SKIP", "StepControl"]


def __getattr__(name: str):
    # Lazy: torch/diffusers are imported only when the API is used.
    if name in ("Studio", "GenerationResult"):
        from danqing import studio

        return getattr(studio, name)
    if name == "Settings":
        from danqing.settings import Settings

        return Settings
    if name == "GenerationRequest":
        from danqing.request import GenerationRequest

        return GenerationRequest
    if name in ("StepInfo", "STOP", "SKIP", "StepControl"):
        from danqing.sampling import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'danqing' has no attribute {name!r}")
