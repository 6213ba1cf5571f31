"""Paths and the device/dtype policy. Built once by an entry point (``Settings.from_env()``)
and passed down; importing danqing reads nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from danqing.errors import InvalidRequest

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


MODEL_SUBDIRS = ("checkpoints", "vae", "lora", "embeddings", "controlnet", "ipadapter", "clip_vision")


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
        db_path: the server's SQLite database of jobs, history and options
            (default ``home/danqing.sqlite3``).
    """

    home: Path = field(default_factory=lambda: Path.cwd())
    models_dir: Path | None = None
    outputs_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    default_model: str = "danqing-tiny"
    db_path: Path | None = None

    def __post_init__(self):
        home = Path(self.home).expanduser()
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "models_dir", Path(self.models_dir or home / "models").expanduser())
        object.__setattr__(self, "outputs_dir", Path(self.outputs_dir or home / "outputs").expanduser())
        object.__setattr__(self, "db_path", Path(self.db_path or home / "danqing.sqlite3").expanduser())

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Settings from ``DANQING_HOME``, ``DANQING_MODELS``, ``DANQING_OUTPUTS``, ``DANQING_DEVICE``,
        ``DANQING_DTYPE``, ``DANQING_MODEL``, ``DANQING_DB``; keyword overrides win when not None."""
        env = os.environ
        values = {
            "home": env.get("DANQING_HOME") or Path.cwd(),
            "models_dir": env.get("DANQING_MODELS"),
            "outputs_dir": env.get("DANQING_OUTPUTS"),
            "device": env.get("DANQING_DEVICE", "auto"),
            "dtype": env.get("DANQING_DTYPE", "auto"),
            "default_model": env.get("DANQING_MODEL", "danqing-tiny"),
            "db_path": env.get("DANQING_DB"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


@dataclass(frozen=True)
class ServerSettings:
    """How ``danqing serve`` listens and what it accepts (docs/api.md).

    Attributes:
        host, port: where to listen; anything but localhost needs ``api_auth``.
        api_auth: "user:pass" for HTTP Basic on the API and the UI; None = no auth (localhost only).
        cors_origins: origins allowed by CORS; empty = no CORS headers at all.
        max_upload_bytes: largest decoded upload (init image, mask, PNG info) in bytes.
        max_upload_pixels: largest upload in pixels (width x height), checked before decoding.
        max_body_bytes: largest HTTP request body.
        sync_timeout_s: how long an A1111 route waits for its job.
        ui: mount the Gradio web UI at ``/``.
    """

    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_upload_bytes: int = 16 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096
    max_body_bytes: int = 64 * 1024 * 1024
    sync_timeout_s: float = 3600.0
    ui: bool = True

    @property
    def is_local(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    def credentials(self) -> tuple[str, str] | None:
        if not self.api_auth:
            return None
        user, sep, password = self.api_auth.partition(":")
        if not sep or not user or not password:
            raise InvalidRequest("api_auth", "must be user:password with both parts non-empty")
        return user, password


def quiet_libraries() -> None:
    """No progress bars or advisory logs from transformers/diffusers on stderr (the CLI prints
    one line per error and its own progress bar). Imports them: call from entry points only."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
