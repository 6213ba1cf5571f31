"""Reading IP-Adapter files (Ye et al. 2023) and loading their CLIP vision image encoders.

Files (user-provided, local only):

- ``models/ipadapter/<name>.safetensors`` (keys ``image_proj.*`` and ``ip_adapter.*``) or
  ``.bin`` (``{"image_proj": {...}, "ip_adapter": {...}}``, read with ``weights_only=True``),
  e.g. ``ip-adapter_sd15.safetensors``, ``ip-adapter-plus_sd15.safetensors``;
- ``models/clip_vision/<folder>/``: a transformers ``CLIPVisionModelWithProjection`` folder
  (``config.json`` + weights; the ``image_encoder`` folder of the IP-Adapter release), or a whole
  ``CLIPModel`` folder, whose vision half is used (danqing's bundled ``danqing-tiny-clip``).

Finding them in the models folder, encoding the pictures and installing an adapter on the UNet
for one request is ``danqing.customise.ip_adapter``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from danqing.errors import CorruptModel, ModelNotFound

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


def adapter_metadata(path: Path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` adapter (danqing's name ``base_model`` and
    ``image_encoder``); {} for other files or none."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # unreadable: read_ip_adapter says so when the file is used
        return {}


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
        if json.loads((folder / "config.json").read_text()).get("model_type") == "clip":
            encoder = _vision_half(folder)
        else:
            encoder = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CorruptModel(f"{folder}: cannot load the CLIP vision encoder ({str(exc).splitlines()[0][:200]})") from None
    return encoder.eval().requires_grad_(False), image_processor(folder, encoder.config.image_size)


def _vision_half(folder: Path):
    """The ``CLIPVisionModelWithProjection`` of a whole ``CLIPModel`` folder (danqing-tiny-clip):
    its vision tower and projection, the same modules (the text half is dropped)."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    full = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    vision = full.config.vision_config
    vision.projection_dim = full.config.projection_dim
    encoder = CLIPVisionModelWithProjection(vision)
    encoder.vision_model, encoder.visual_projection = full.vision_model, full.visual_projection
    return encoder


def image_processor(folder: Path | None, size: int):
    """CLIP's image preprocessing (the PIL backend: no torchvision needed)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as Processor
    if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
        return Processor.from_pretrained(folder, local_files_only=True)
    return Processor(size=size, crop_size=size)
