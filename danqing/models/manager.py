"""The ModelManager: the one owner of devices, dtypes and the loaded-model cache.

Only this class calls ``.to(device)``. Everything else asks it for a ``LoadedModel`` and treats
the modules as read-only (ComfyUI's ``model_management`` idea, as an object instead of globals).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

from danqing.cache import LRUCache, file_key, folder_key
from danqing.models.components import Components
from danqing.models.control import load_control_model
from danqing.models.fastpath import FastPath, applied
from danqing.models.flow_files import missing_vae
from danqing.models.fp8 import place_fp8, stores_fp8
from danqing.models.loader import load_components, load_vae
from danqing.models.registry import ModelEntry, Registry
from danqing.models.upscalers import load_descriptor

T = TypeVar("T")


def pick_device(preference: str = "auto") -> torch.device:
    """cuda > mps > cpu for "auto"; otherwise the named device."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """fp16 on CUDA/MPS (bf16 if asked), fp32 on CPU."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if preference != "auto":
        return table[preference]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


@dataclass
class LoadedModel:
    """A checkpoint (and optional VAE override) placed on the manager's device."""

    entry: ModelEntry
    vae_entry: ModelEntry | None
    components: Components
    sha256: str
    vae_sha256: str | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]


@dataclass
class LoadedControl:
    """A ControlNet or T2I-Adapter placed on the manager's device (kind "controlnet" or "t2i")."""

    entry: ModelEntry
    model: object
    kind: str
    sha256: str

    @property
    def name(self) -> str:
        return self.entry.name


class ModelManager:
    """Loads checkpoints through the registry, places them, keeps the last ``capacity`` loaded.

    Args:
        registry: the models-folder registry.
        device: "auto" or a torch device string; dtype: "auto", "fp32", "fp16" or "bf16".
        capacity: how many (checkpoint, VAE) pairs stay loaded.
        fast: the fast-path options (``models.fastpath.FastPath``), applied per request by ``fast_path``.
    """

    def __init__(self, registry: Registry, device: str = "auto", dtype: str = "auto", capacity: int = 1,
                 fast: FastPath | None = None):
        self.registry = registry
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.fast = fast or FastPath()
        self.capacity = capacity
        self._cache: LRUCache[LoadedModel] = LRUCache(capacity, on_evict=self._evicted)
        self._controls: LRUCache[LoadedControl] = LRUCache(4)
        self._upscalers: LRUCache[object] = LRUCache(2)
        self._folders: LRUCache[object] = LRUCache(2, on_evict=self._evicted)
        self._lock = threading.Lock()

    def load(self, model: str, vae: str | None = None, text_encoders: tuple[str, ...] = ()) -> LoadedModel:
        """The loaded model for a checkpoint name/hash/path, an optional VAE name/path and, for an
        SD3 / FLUX file without them, its text encoder files (names in models/text_encoder/ or paths)."""
        entry = self.registry.find("checkpoint", model)
        vae_entry = self.registry.find("vae", vae) if vae else None
        encoders = tuple(self.registry.find("text_encoder", name) for name in text_encoders)
        key = (entry.name, str(entry.path), str(vae_entry.path) if vae_entry else None, *(str(e.path) for e in encoders))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            comps = load_components(entry, text_encoders=[e.path for e in encoders])
            if vae_entry is not None:
                comps.vae = load_vae(vae_entry, comps.family, like=comps.vae)
            elif comps.vae is None:  # an SD3 / FLUX file without its VAE
                raise missing_vae(entry.path, comps.family)
            self._place(comps)
            loaded = LoadedModel(
                entry=entry,
                vae_entry=vae_entry,
                components=comps,
                sha256=self.registry.sha256(entry),
                vae_sha256=self.registry.sha256(vae_entry) if vae_entry else None,
            )
            return self._cache.put(key, loaded)

    def load_control(self, name: str) -> LoadedControl:
        """A ControlNet / T2I-Adapter by name, hash or path (``models/controlnet/``), placed on
        the device in the manager's dtype; the last 4 stay loaded."""
        entry = self.registry.find("controlnet", name)
        key = str(entry.path)
        with self._lock:
            hit = self._controls.get(key)
            if hit is not None:
                return hit
            model, kind = load_control_model(entry)
            model.requires_grad_(False)
            model.eval()
            model.to(device=self.device, dtype=self.dtype)
            loaded = LoadedControl(entry, model, kind, self.registry.sha256(entry))
            return self._controls.put(key, loaded)

    def load_upscaler(self, path):
        """A spandrel model (upscaler or face restorer) from a weight file, placed on the device
        (fp16 on CUDA only when the architecture supports it, else fp32); the last
        2 stay loaded, keyed by path, size and mtime."""
        key = file_key(path)
        with self._lock:
            hit = self._upscalers.get(key)
            if hit is not None:
                return hit
            desc = load_descriptor(path)
            dtype = self.dtype
            if (dtype == torch.float16 and not desc.supports_half) or (dtype == torch.bfloat16 and not desc.supports_bfloat16):
                dtype = torch.float32
            desc.model.requires_grad_(False)
            desc.to(device=self.device, dtype=dtype)
            desc.eval()
            return self._upscalers.put(key, desc)

    def _place(self, comps: Components) -> None:
        for module in comps.modules().values():
            module.requires_grad_(False)
            module.eval()
            if stores_fp8(module):  # fp8-stored weights stay fp8, upcast per layer (models.fp8)
                place_fp8(module, self.device, self.dtype)
                continue
            module.to(device=self.device)
            if module.dtype != self.dtype:
                module.to(dtype=self.dtype)
        if self.dtype == torch.float16 and getattr(comps.vae.config, "force_upcast", False):
            comps.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16

    def fast_path(self, comps: Components):
        """A context with the fast-path options on for ``comps`` (loaded here), all undone when
        it closes (``models.fastpath.applied``)."""
        return applied(comps, self.fast, self.device)

    def load_folder(self, loader: Callable[[Path], T], path: Path, modules: Callable[[T], Iterable]) -> T:
        """A model that runs beside the SD loop (Stable unCLIP, a Kandinsky prior or decoder, a
        DeepFloyd IF stage): ``loader(path)``, then each module of ``modules(model)`` placed on
        the device (``place_module``). The last 2 stay loaded, keyed by the loader and the
        folder's files (sizes and times), so a server reads them from disk once, not per request;
        a folder whose files change is read again."""
        key = (loader.__module__, loader.__qualname__, str(path), folder_key(path))
        with self._lock:
            hit = self._folders.get(key)
            if hit is not None:
                return hit
            model = loader(path)
            for module in modules(model):
                if module is not None:
                    self.place_module(module)
            return self._folders.put(key, model)

    def place_module(self, module) -> None:
        """Put an auxiliary module (an IP-Adapter image encoder, ...) on the manager's device
        and dtype, read-only, as the checkpoint's own modules are."""
        module.requires_grad_(False)
        module.eval()
        module.to(device=self.device, dtype=self.dtype)

    def _evicted(self, key, loaded) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unload_all(self) -> None:
        with self._lock:
            self._cache.clear()
            self._controls.clear()
            self._upscalers.clear()
            self._folders.clear()
