"""The side in pixels a checkpoint was trained at, read from its configs without loading its
weights: the default picture size of the UI, the CLI and the job API when a request gives none
(A1111 starts every model at 512; danqing starts each at its own size, so danqing-tiny makes
64x64 pictures and SDXL 1024x1024 ones)."""

from __future__ import annotations

import json
from pathlib import Path

from danqing.errors import DanqingError
from danqing.models.cascade_models import if_kind_of_folder
from danqing.models.registry import BUILTIN

FAMILIES = Path(__file__).resolve().parents[1] / "data" / "families"

SIDE_OF_FAMILY = {"flux": 1024, "sd3": 1024, "tiny-flux": 64, "tiny-sd3": 64}  # transformer families


def _side(unet: dict, vae: dict) -> int:
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def native_side(registry, name: str | None) -> int:
    """The side in pixels a checkpoint was trained at, read from its configs without loading its
    weights (diffusers folder, ModelSpec metadata or the detected family); 512 when unknown."""
    try:
        entry = registry.resolve("checkpoint", name, "model") if name else None
        if entry is None or entry.is_builtin or entry.name == BUILTIN:
            family = "danqing-tiny"
        elif entry.format == "diffusers":
            if if_kind_of_folder(entry.path):  # a pixel model (DeepFloyd IF): its UNet's size
                return int(json.loads((entry.path / "unet" / "config.json").read_text())["sample_size"])
            cfg = [json.loads((entry.path / p / "config.json").read_text()) for p in ("unet", "vae")]
            return _side(*cfg)
        elif entry.format == "safetensors":
            from safetensors import safe_open  # the header only

            from danqing.models.single_file import detect_family

            with safe_open(str(entry.path), "np") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
            if "modelspec.resolution" in meta:
                return int(meta["modelspec.resolution"].split("x")[0])
            family = detect_family(keys)
        else:
            return 512
        if family in SIDE_OF_FAMILY:
            return SIDE_OF_FAMILY[family]
        return _side(*(json.loads((FAMILIES / family / f"{p}.json").read_text()) for p in ("unet", "vae")))
    except (DanqingError, OSError, ValueError, KeyError):
        return 512
