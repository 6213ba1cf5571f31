"""The models folder: what is there, its family, and A1111-style hashes.

Layout (``settings.models_dir``)::

    checkpoints/   *.safetensors, *.ckpt, *.pt, or diffusers folders (model_index.json)
    vae/           *.safetensors, *.ckpt, *.pt, or diffusers AutoencoderKL folders
    lora/ embeddings/ controlnet/ ipadapter/ clip_vision/ motion/ (AnimateDiff motion modules)

Hashes are A1111's: sha256 of the file, "short hash" = first 10 hex chars. They are cached in
``models_dir/.danqing-hashes.json`` keyed by path, size and mtime (hashing a 7 GB file is slow).
A diffusers folder's hash is the sha256 of the sorted (relative path, file sha256) list of its
weight and config files.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from danqing.errors import ModelNotFound
from danqing.files import atomic_write_text
from danqing.models.families import builtin_sha256
from danqing.models.names import Named, inside, resolve

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
KINDS = {
    "checkpoint": "checkpoints",
    "vae": "vae",
    "lora": "lora",
    "embedding": "embeddings",
    "controlnet": "controlnet",
    "ipadapter": "ipadapter",
    "clip_vision": "clip_vision",
    "motion": "motion",
    "text_encoder": "text_encoder",  # CLIP-L / bigG / T5-XXL files for SD3 / FLUX files without them
}
# kind -> (what a request calls it, the field a library lookup reports) for names-only lookups
LABELS = {
    "checkpoint": ("checkpoint", "model"), "vae": ("VAE", "vae"), "lora": ("LoRA", "prompt"),
    "embedding": ("embedding", "prompt"), "controlnet": ("controlnet", "controlnet"),
    "ipadapter": ("IP-Adapter", "ip_adapter"), "clip_vision": ("image encoder", "ip_adapter_encoder"),
    "motion": ("motion module", "motion_module"), "text_encoder": ("text encoder", "text_encoders"),
}
BUILTIN = "danqing-tiny-random"
BUNDLED = "danqing-tiny"  # danqing's own trained model, shipped in the package (data/models/)


def bundled_entries() -> list["ModelEntry"]:
    """Checkpoints shipped inside the package (``danqing/data/models/<name>/``, diffusers layout)."""
    root = Path(str(resources.files("danqing").joinpath("data/models")))
    if not root.is_dir():
        return []
    return [ModelEntry(p.name, p, "checkpoint", "diffusers") for p in sorted(root.iterdir())
            if (p / "model_index.json").is_file()]


def _bundled_folders(kind: str, matches) -> list["ModelEntry"]:
    """Folders of ``danqing/data/models/`` whose ``config.json`` ``matches`` (a predicate on it)."""
    root = Path(str(resources.files("danqing").joinpath("data/models")))
    if not root.is_dir():
        return []
    return [ModelEntry(p.name, p, kind, "diffusers") for p in sorted(root.iterdir())
            if (p / "config.json").is_file() and matches(json.loads((p / "config.json").read_text()))]


def _bundled_files(folder: str, kind: str) -> list["ModelEntry"]:
    """The ``.safetensors`` files of ``danqing/data/models/<folder>/``."""
    root = Path(str(resources.files("danqing").joinpath(f"data/models/{folder}")))
    return [ModelEntry(p.stem, p, kind, "safetensors") for p in sorted(root.glob("*.safetensors"))]


def bundled_control_entries() -> list["ModelEntry"]:
    """ControlNets / T2I-Adapters shipped in the package (``danqing/data/models/<name>/``, a
    diffusers ``config.json`` of a ``ControlNetModel`` or ``T2IAdapter``)."""
    return _bundled_folders("controlnet", lambda cfg: cfg.get("_class_name") in ("ControlNetModel", "T2IAdapter"))


def bundled_lora_entries() -> list["ModelEntry"]:
    """LoRAs shipped in the package (``danqing/data/models/lora/NAME.safetensors``), for the
    bundled model; listed after the user's own, so a user's LoRA of the same name wins."""
    return _bundled_files("lora", "lora")


def bundled_ip_adapter_entries() -> list["ModelEntry"]:
    """IP-Adapters shipped in the package (``danqing/data/models/ipadapter/NAME.safetensors``)."""
    return _bundled_files("ipadapter", "ipadapter")


def bundled_image_encoder_entries() -> list["ModelEntry"]:
    """CLIP models shipped in the package (``danqing/data/models/<name>/``, a transformers
    ``CLIPModel`` folder), whose vision half is an IP-Adapter's image encoder."""
    return _bundled_folders("clip_vision", lambda cfg: cfg.get("model_type") == "clip")


def bundled_motion_entries() -> list["ModelEntry"]:
    """Motion modules shipped in the package (``danqing/data/models/<name>/``, a diffusers
    ``MotionAdapter`` folder), made for the bundled model."""
    return _bundled_folders("motion", lambda cfg: cfg.get("_class_name") == "MotionAdapter")


def bundled_vae_entries() -> list["ModelEntry"]:
    """VAEs shipped in the package (``danqing/data/models/<name>/``, a diffusers
    ``AutoencoderKL`` folder), made for a bundled model: chosen with ``vae``, as A1111's SD VAE."""
    return _bundled_folders("vae", lambda cfg: cfg.get("_class_name") == "AutoencoderKL")


BUNDLED_KINDS = {"lora": bundled_lora_entries, "ipadapter": bundled_ip_adapter_entries,
                 "clip_vision": bundled_image_encoder_entries, "motion": bundled_motion_entries,
                 "vae": bundled_vae_entries}


def _with_bundled(kind: str, found: list["ModelEntry"]) -> list["ModelEntry"]:
    """``found`` (the folder's) and after them the bundled models of ``kind`` that no file of
    the folder shadows."""
    if kind not in BUNDLED_KINDS:
        return found
    names = {e.name for e in found}
    return found + [e for e in BUNDLED_KINDS[kind]() if e.name not in names]


@dataclass(frozen=True)
class ModelEntry:
    """One model found in the models folder (or built in).

    Attributes:
        name: path relative to its kind's folder without suffix (A1111's model name).
        path: the file or folder; None for the built-in random model.
        kind: "checkpoint", "vae", "lora", "embedding" or "controlnet".
        format: "safetensors", "ckpt" (pickle: loaded with weights_only=True), "diffusers" or "builtin".
    """

    name: str
    path: Path | None
    kind: str
    format: str

    @property
    def is_builtin(self) -> bool:
        return self.format == "builtin"


def _format_of(path: Path) -> str | None:
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "config.json").is_file():
            return "diffusers"
        return None
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "ckpt"
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Registry:
    """Scans ``models_dir`` on demand; thread-safe hash cache. Holds no per-request state.

    Args:
        models_dir: the models folder.
        names_only: the server's mode: ``find`` takes names only (``danqing.models.names``) and
            ``scan`` leaves out symlinks that lead out of their kind's folder. Off for the CLI,
            whose user may name any file.
    """

    def __init__(self, models_dir: Path, *, names_only: bool = False):
        self.models_dir = Path(models_dir)
        self.names_only = names_only
        self._lock = threading.Lock()
        self._hash_cache: dict | None = None

    # -- listing ------------------------------------------------------------------------------
    def folder(self, kind: str) -> Path:
        return self.models_dir / KINDS[kind]

    def scan(self, kind: str = "checkpoint") -> list[ModelEntry]:
        """Entries of one kind, sorted by name; checkpoints start with the built-in model, LoRAs
        end with the bundled ones that no file of the folder shadows."""
        entries = ([ModelEntry(BUILTIN, None, "checkpoint", "builtin"), *bundled_entries()] if kind == "checkpoint"
                   else bundled_control_entries() if kind == "controlnet" else [])
        root = self.folder(kind)
        if not root.is_dir():
            return entries + _with_bundled(kind, [])
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if _format_of(here) == "diffusers" and here != root:
                found.append(ModelEntry(here.relative_to(root).as_posix(), here, kind, "diffusers"))
                dirnames[:] = []
                continue
            dirnames.sort()
            for fn in sorted(filenames):
                p = here / fn
                fmt = _format_of(p)
                if fmt and not fn.startswith(".") and (not self.names_only or inside(p, root)):
                    found.append(ModelEntry(p.relative_to(root).with_suffix("").as_posix(), p, kind, fmt))
        return entries + _with_bundled(kind, sorted(found, key=lambda e: e.name.casefold()))

    def find(self, kind: str, query: str) -> ModelEntry:
        """Find by name, file name, short/full hash, A1111 title ("name [hash]") or a path.

        A path is taken only outside names-only mode (the CLI, whose user names the file); in
        names-only mode (the server) this is ``resolve``: names of the listing only.
        """
        if kind == "checkpoint" and query == BUILTIN:
            return ModelEntry(BUILTIN, None, "checkpoint", "builtin")
        if self.names_only:
            return self.resolve(kind, query, LABELS[kind][1])
        p = Path(query).expanduser()
        if p.exists() and (p.is_file() or _format_of(p) == "diffusers"):
            fmt = _format_of(p)
            if fmt is None:
                raise ModelNotFound(f"{query}: not a model file (.safetensors, .ckpt, .pt) or diffusers folder")
            return ModelEntry(p.stem if p.is_file() else p.name, p.resolve(), kind, fmt)
        title = query.rsplit(" [", 1)[0] if query.endswith("]") else query
        entries = self.scan(kind)
        for e in entries:
            if title in (e.name, Path(e.name).name) or (e.path is not None and title == e.path.name):
                return e
        q = query.strip("[] ").lower()
        if len(q) >= 8 and all(c in "0123456789abcdef" for c in q):
            for e in entries:
                if self.sha256(e).startswith(q):
                    return e
        names = ", ".join(e.name for e in entries) or "none"
        raise ModelNotFound(f"{kind} {query!r} not found in {self.folder(kind)}; available: {names}")

    def resolve(self, kind: str, name: object, field: str) -> ModelEntry:
        """The entry a client's name selects (``danqing.models.names.resolve``): a name, file
        name, A1111 title or hash of a model listed in its folder, never a path; anything else
        is an ``InvalidRequest`` for ``field`` with one message whether or not a file exists."""
        entries: dict[str, ModelEntry] = {}
        for e in self.scan(kind):
            entries.setdefault(e.name, e)  # the first of a name wins, as in ``find``
        named = [Named(e.name, e.path, (Path(e.name).name,) + ((e.path.name,) if e.path is not None else ()))
                 for e in entries.values()]
        found = resolve(name, named, field=field, what=LABELS[kind][0], folder=KINDS[kind],
                        sha256=lambda n: self.sha256(entries[n.name]))
        return entries[found.name]

    # -- hashes -------------------------------------------------------------------------------
    def _cache_path(self) -> Path:
        return self.models_dir / ".danqing-hashes.json"

    def _load_cache(self) -> dict:
        if self._hash_cache is None:
            try:
                self._hash_cache = json.loads(self._cache_path().read_text())
            except (OSError, ValueError):
                self._hash_cache = {}
        return self._hash_cache

    def sha256(self, entry: ModelEntry) -> str:
        """Full sha256 (hex) of a model, cached by path, size and mtime."""
        if entry.is_builtin:
            return builtin_sha256()
        files = [entry.path] if entry.path.is_file() else sorted(
            f for f in entry.path.rglob("*") if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.suffix == ".json")
        )
        stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        key = str(entry.path)
        with self._lock:
            cache = self._load_cache()
            hit = cache.get(key)
            if hit and hit.get("stamp") == [list(s) for s in stamp]:
                return hit["sha256"]
        if entry.path.is_file():
            digest = sha256_file(entry.path)
        else:
            h = hashlib.sha256()
            for f in files:
                h.update(f.relative_to(entry.path).as_posix().encode() + b"\0" + sha256_file(f).encode())
            digest = h.hexdigest()
        with self._lock:
            cache = self._load_cache()
            cache[key] = {"stamp": [list(s) for s in stamp], "sha256": digest}
            self._save_cache(cache)
        return digest

    def short_hash(self, entry: ModelEntry) -> str:
        return self.sha256(entry)[:10]

    def _save_cache(self, cache: dict) -> None:
        path = self._cache_path()
        if not path.parent.is_dir():
            return  # nothing to cache into (no models folder); hashes are recomputed
        atomic_write_text(path, json.dumps(cache, indent=1), overwrite=True)
