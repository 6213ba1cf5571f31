"""Loading IP-Adapters (Ye et al. 2023) and their CLIP vision encoders from the models folder.

Files (user-provided, local only):

- ``models/ipadapter/<name>.safetensors`` (keys ``image_proj.*`` and ``ip_adapter.*``) or
  ``.bin`` (``{"image_proj": {...}, "ip_adapter": {...}}``, read with ``weights_only=True``),
  e.g. ``ip-adapter_sd15.safetensors``, ``ip-adapter-plus_sd15.safetensors``;
- ``models/clip_vision/<folder>/``: a transformers ``CLIPVisionModelWithProjection`` folder
  (``config.json`` + weights; the ``image_encoder`` folder of the IP-Adapter release).

Installing an adapter on the UNet for one request and encoding the pictures is
``danqing.customise.ip_adapter``'s.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from safetensors import safe_open

from danqing.errors import CorruptModel, InvalidRequest, ModelNotFound

ADAPTER_KIND = "ipadapter"
ENCODER_KIND = "clip_vision"
SUFFIXES = (".safetensors", ".bin")


def read_ip_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` of an IP-Adapter file (the layout of the
    original ``ip-adapter_sd15.bin``; the ``.safetensors`` release prefixes the keys with
    ``image_proj.`` / ``ip_adapter.``, as diffusers' ``load_ip_adapter`` reads them)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise CorruptModel(f"{path.name}: an IP-Adapter is a .safetensors or .bin file")
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                flat = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors has its own error types
            raise CorruptModel(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
        state: dict = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            part, _, rest = key.partition(".")
            if part in state:
                state[part][rest] = value
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            why = ("it holds pickled Python objects, which danqing never unpickles; use the .safetensors release"
                   if "Weights only load failed" in str(exc) else str(exc).splitlines()[0][:200])
            raise CorruptModel(f"{path}: cannot be read as a weights-only torch file ({why})") from None
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise CorruptModel(f"{path}: not an IP-Adapter (expected image_proj.* and ip_adapter.* weights)")
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}


def load_image_encoder(folder: Path):
    """(``CLIPVisionModelWithProjection``, image processor) from a local folder, CPU fp32.

    The processor is the folder's ``preprocessor_config.json`` when present, else CLIP's
    (resize + centre crop to the encoder's ``image_size``), as diffusers' ``load_ip_adapter``.
    """
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"IP-Adapter image encoder: {folder} has no config.json; put the CLIP vision encoder "
                            f"(CLIPVisionModelWithProjection: config.json + model.safetensors, the IP-Adapter "
                            f"release's image_encoder/ folder) in a folder under models/{ENCODER_KIND}/")
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CorruptModel(f"{folder}: cannot load the CLIP vision encoder ({str(exc).splitlines()[0][:200]})") from None
    return encoder.eval().requires_grad_(False), image_processor(folder, encoder.config.image_size)


def image_processor(folder: Path | None, size: int):
    """CLIP's image preprocessing (the PIL backend: no torchvision needed)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as Processor
    if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
        return Processor.from_pretrained(folder, local_files_only=True)
    return Processor(size=size, crop_size=size)


class IPAdapterLibrary:
    """Finds IP-Adapter files and CLIP vision encoders in the models folder; caches what it
    read (adapter state dicts by path and mtime, encoders by folder -- immutable inputs, not
    request state). Encoders are placed by the ModelManager.

    Args:
        registry: the models-folder ``Registry``; manager: the ``ModelManager``.
    """

    def __init__(self, registry, manager):
        self.registry = registry
        self.manager = manager
        self._lock = threading.Lock()
        self._states: dict[str, tuple[tuple, dict]] = {}
        self._encoders: dict[str, tuple] = {}

    def adapters(self) -> list:
        root = self.registry.models_dir / ADAPTER_KIND
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES) if root.is_dir() else []

    def encoders(self) -> list:
        root = self.registry.models_dir / ENCODER_KIND
        return sorted(p.parent for p in root.rglob("config.json")) if root.is_dir() else []

    def adapter_path(self, name: str | None) -> Path:
        """The adapter file called ``name`` (file name, stem or path); None = the only one."""
        found = self.adapters()
        where = self.registry.models_dir / ADAPTER_KIND
        if name is None:
            if len(found) == 1:
                return found[0]
            if not found:
                raise ModelNotFound(f"no IP-Adapter in {where}; put the weight file there (e.g. "
                                    "ip-adapter_sd15.safetensors, or the .bin with image_proj and ip_adapter)")
            raise InvalidRequest("ip_adapter", f"several IP-Adapters are installed; name one of "
                                 f"{', '.join(p.stem for p in found)}")
        p = Path(name).expanduser()
        if p.is_file():
            return p
        for f in found:
            if name in (f.name, f.stem, f.relative_to(where).with_suffix("").as_posix()):
                return f
        raise ModelNotFound(f"IP-Adapter {name!r} not found in {where}; put the weight file (.safetensors or .bin) "
                            f"there; installed: {', '.join(f.stem for f in found) or 'none'}")

    def encoder_path(self, name: str | None) -> Path:
        """The CLIP vision encoder folder called ``name``; None = the only one."""
        found = self.encoders()
        where = self.registry.models_dir / ENCODER_KIND
        hint = (f"put the CLIP vision encoder folder (CLIPVisionModelWithProjection: config.json + "
                f"model.safetensors, the IP-Adapter release's image_encoder/) in {where}/")
        if name is None:
            if len(found) == 1:
                return found[0]
            if not found:
                raise ModelNotFound(f"IP-Adapter needs an image encoder and {where} has none; {hint}")
            raise InvalidRequest("ip_adapter_encoder", f"several image encoders are installed; name one of "
                                 f"{', '.join(p.name for p in found)}")
        p = Path(name).expanduser()
        if p.is_dir():
            return p
        for f in found:
            if name in (f.name, f.relative_to(where).as_posix()):
                return f
        raise ModelNotFound(f"image encoder {name!r} not found; {hint} (installed: "
                            f"{', '.join(f.name for f in found) or 'none'})")

    def state(self, path: Path) -> dict:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._states.get(str(path))
            if hit and hit[0] == stamp:
                return hit[1]
        state = read_ip_adapter(path)
        with self._lock:
            self._states = {str(path): (stamp, state)}  # keep one
        return state

    def encoder(self, folder: Path):
        with self._lock:
            hit = self._encoders.get(str(folder))
        if hit is not None:
            return hit
        encoder, processor = load_image_encoder(folder)
        self.manager.place_module(encoder)
        with self._lock:
            self._encoders = {str(folder): (encoder, processor)}  # keep one
        return encoder, processor
