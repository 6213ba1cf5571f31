"""Paths and the device/dtype policy. Built once by an entry point (``Settings.from_env()``)
and passed down; importing danqing reads nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_NO_ADVISORY_WARNINGS": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}


def force_offline() -> None:
    """Make every Hugging Face library refuse the network. Entry points call this first."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value


MODEL_SUBDIRS = ("checkpoints", "vae", "lora", "embeddings", "controlnet")


@dataclass(frozen=True)
class Settings:
    """Where things live and which device to use.

    Attributes:
        home: danqing's data folder (``$DANQING_HOME``, default ``~/.danqing``... or ``./`` in a checkout).
        models_dir: holds ``checkpoints/``, ``vae/``, ``lora/``, ``embeddings/``, ``controlnet/``.
        outputs_dir: generated images (``txt2img-images/DATE/NNNNN-SEED.png``).
        device: "auto" (cuda > mps > cpu) or an explicit torch device string.
        dtype: "auto" (fp16 on CUDA, fp32 elsewhere), "fp32", "fp16" or "bf16".
        default_model: model name used when a request names none.
    """

    home: Path = field(default_factory=lambda: Path.cwd())
    models_dir: Path | None = None
    outputs_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    default_model: str = "danqing-tiny"

    def __post_init__(self):
        home = Path(self.home).expanduser()
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "models_dir", Path(self.models_dir or home / "models").expanduser())
        object.__setattr__(self, "outputs_dir", Path(self.outputs_dir or home / "outputs").expanduser())

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Settings from ``DANQING_HOME``, ``DANQING_MODELS``, ``DANQING_OUTPUTS``, ``DANQING_DEVICE``,
        ``DANQING_DTYPE``, ``DANQING_MODEL``; keyword overrides win when not None."""
        env = os.environ
        values = {
            "home": env.get("DANQING_HOME") or Path.cwd(),
            "models_dir": env.get("DANQING_MODELS"),
            "outputs_dir": env.get("DANQING_OUTPUTS"),
            "device": env.get("DANQING_DEVICE", "auto"),
            "dtype": env.get("DANQING_DTYPE", "auto"),
            "default_model": env.get("DANQING_MODEL", "danqing-tiny"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


def quiet_libraries() -> None:
    """No progress bars or advisory logs from transformers/diffusers on stderr (the CLI prints
    one line per error and its own progress bar). Imports them: call from entry points only."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
