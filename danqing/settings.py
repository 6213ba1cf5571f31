"""Paths and the device/dtype policy. Built once by an entry point (``Settings.from_env()``)
and passed down; importing danqing reads nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from danqing.conditioning.prompt_limits import PARSER_MAX_DEPTH
from danqing.errors import InvalidRequest
from danqing.files import is_url
from danqing.models.fastpath import FastPath

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
        outputs_dir: generated images (``txt2img-images/DATE/NNNNN-SEED.png``) and the server's
            working files (uploads, video, 3D, comics).
        outputs_url: an fsspec URL (``s3://bucket/danqing``) for the generated pictures instead
            of ``outputs_dir``; an ``outputs_dir`` (or ``DANQING_OUTPUTS``) given as a URL lands
            here, and ``outputs_dir`` stays ``home/outputs`` (``outputs.place``, docs/scale.md).
        device: "auto" (cuda > mps > cpu) or an explicit torch device string.
        dtype: "auto" (fp16 on CUDA, fp32 elsewhere), "fp32", "fp16" or "bf16".
        default_model: model name used when a request names none.
        db_path: the server's SQLite database of jobs, history and options
            (default ``home/danqing.sqlite3``).
        db_url: a ``postgresql://user:password@host/dbname`` job store shared by several servers;
            when given it is used instead of ``db_path`` (docs/scale.md).
        fast: the fast-path options (channels-last, attention kernel, compile, fused QKV, VAE
            slicing/tiling, offload; ``models.fastpath.FastPath``, docs/benchmarks.md).
    """

    home: Path = field(default_factory=lambda: Path.cwd())
    models_dir: Path | None = None
    outputs_dir: Path | None = None
    outputs_url: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    default_model: str = "danqing-tiny"
    db_path: Path | None = None
    db_url: str | None = None
    fast: FastPath = field(default_factory=FastPath)

    def __post_init__(self):
        home = Path(self.home).expanduser()
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "models_dir", Path(self.models_dir or home / "models").expanduser())
        if self.outputs_dir is not None and is_url(self.outputs_dir):
            object.__setattr__(self, "outputs_url", self.outputs_url or str(self.outputs_dir))
            object.__setattr__(self, "outputs_dir", None)
        object.__setattr__(self, "outputs_dir", Path(self.outputs_dir or home / "outputs").expanduser())
        object.__setattr__(self, "db_path", Path(self.db_path or home / "danqing.sqlite3").expanduser())

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Settings from ``DANQING_HOME``, ``DANQING_MODELS``, ``DANQING_OUTPUTS``, ``DANQING_DEVICE``,
        ``DANQING_DTYPE``, ``DANQING_MODEL``, ``DANQING_DB``, ``DANQING_DB_URL``; keyword overrides win when not None."""
        env = os.environ
        values = {
            "home": env.get("DANQING_HOME") or Path.cwd(),
            "models_dir": env.get("DANQING_MODELS"),
            "outputs_dir": env.get("DANQING_OUTPUTS"),
            "device": env.get("DANQING_DEVICE", "auto"),
            "dtype": env.get("DANQING_DTYPE", "auto"),
            "default_model": env.get("DANQING_MODEL", "danqing-tiny"),
            "db_path": env.get("DANQING_DB"),
            "db_url": env.get("DANQING_DB_URL"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# ServerSettings' work limits (docs/security.md); each is also DANQING_<NAME> and --limit NAME=N.
LIMITS = ("max_pixels", "max_prompt_chars", "max_prompt_chunks", "max_prompt_depth", "max_batch_images",
          "max_steps", "max_frames", "max_body_bytes")


def limits_from(pairs: list[str] = (), env: dict[str, str] | None = None) -> dict[str, int]:
    """Work limits from the environment (``DANQING_MAX_PIXELS=...``) and ``NAME=N`` pairs (the
    ``--limit`` option of ``danqing serve``; they win). Raises InvalidRequest naming a bad one."""
    env = os.environ if env is None else env
    raw = {name: env[f"DANQING_{name.upper()}"] for name in LIMITS if env.get(f"DANQING_{name.upper()}")}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name.strip() not in LIMITS:
            raise InvalidRequest("limit", f"{pair!r} is not NAME=N with NAME one of {', '.join(LIMITS)}")
        raw[name.strip()] = value
    out = {}
    for name, value in raw.items():
        try:
            out[name] = int(str(value).replace("_", ""))
        except ValueError:
            raise InvalidRequest(name, f"must be a whole number, got {value!r}") from None
    return out


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
        allowed_hosts: names accepted in the ``Host`` header besides the localhost names and
            ``host`` (DNS-rebinding defence; docs/security.md).
        max_pixels: largest final picture (width x height after hires fix / upscaling).
        max_prompt_chars: longest prompt (each prompt field) in characters.
        max_prompt_chunks: most 77-token chunks of a prompt (75 tokens each, CLIP tokenizer).
        max_prompt_depth: deepest bracket nesting of a prompt (at most 100).
        max_batch_images: most pictures per request (batch_size x batch_count).
        max_steps: most sampling steps per pass (steps, hires fix's second pass).
        max_frames: most frames of a video request.
        batch_max, batch_wait_s: batched serving (docs/api.md): compatible queued requests run as
            one UNet batch of at most ``batch_max`` images, gathered for at most ``batch_wait_s``;
            1 = each request alone.
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
    allowed_hosts: tuple[str, ...] = ()
    max_pixels: int = 4096 * 4096
    max_prompt_chars: int = 10_000
    max_prompt_chunks: int = 32
    max_prompt_depth: int = 32
    max_batch_images: int = 100
    max_steps: int = 150
    max_frames: int = 64
    batch_max: int = 1
    batch_wait_s: float = 0.05

    def __post_init__(self):
        for name in LIMITS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(name, f"must be a whole number >= 1, got {value!r}")
        if self.max_prompt_depth > PARSER_MAX_DEPTH:
            raise InvalidRequest("max_prompt_depth", f"must be at most {PARSER_MAX_DEPTH} (the prompt parser's "
                                                     f"bound), got {self.max_prompt_depth}")

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS

    def host_names(self) -> frozenset[str] | None:
        """Names a request's ``Host`` header may carry (lower case, no port); None = any, when
        the server listens on every interface (0.0.0.0, ::) and no ``allowed_hosts`` are given."""
        names = {h.lower().strip("[]") for h in self.allowed_hosts}
        if self.host in ("0.0.0.0", "::", "") and not names:
            return None
        return frozenset({*LOCAL_HOSTS, self.host.lower().strip("[]"), *names})

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
