"""Stable Video Diffusion folders (diffusers' ``StableVideoDiffusionPipeline`` layout): the
image-to-video model ``danqing video --init-image`` runs (``passes.video.run_svd``).

A folder in ``models/checkpoints/`` with ``model_index.json`` naming the pipeline, and its
``unet/`` (``UNetSpatioTemporalConditionModel``), ``vae/`` (``AutoencoderKLTemporalDecoder``),
``image_encoder/`` (``CLIPVisionModelWithProjection``), ``feature_extractor/`` and
``scheduler/``. Local files only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from danqing.errors import CorruptModel

PIPELINE = "StableVideoDiffusionPipeline"


@dataclass
class SvdParts:
    """What ``run_svd`` takes: the model's parts and its scheduler's config."""

    unet: object
    vae: object
    image_encoder: object
    feature_extractor: object
    scheduler_config: dict

    def modules(self) -> list:
        return [self.unet, self.vae, self.image_encoder]


def is_svd_folder(path: Path) -> bool:
    """Whether ``path`` is a Stable Video Diffusion folder (its ``model_index.json``)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE
    except ValueError:
        return False


def load_svd_folder(path: Path) -> SvdParts:
    """The parts of an SVD folder on the CPU in float32, eval mode, no gradients."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    path = Path(path)
    for sub in ("unet", "vae", "image_encoder"):
        if not (path / sub / "config.json").is_file():
            raise CorruptModel(f"{path.name}: not a complete Stable Video Diffusion folder (missing {sub}/config.json)")
    sched = path / "scheduler" / "scheduler_config.json"
    try:
        kw = {"local_files_only": True}
        parts = SvdParts(UNetSpatioTemporalConditionModel.from_pretrained(path / "unet", **kw),
                         AutoencoderKLTemporalDecoder.from_pretrained(path / "vae", **kw),
                         CLIPVisionModelWithProjection.from_pretrained(path / "image_encoder", **kw),
                         CLIPImageProcessor.from_pretrained(path / "feature_extractor", **kw),
                         json.loads(sched.read_text()) if sched.is_file() else {})
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptModel(f"{path.name}: cannot load the Stable Video Diffusion folder "
                           f"({str(exc).splitlines()[0][:200]})") from None
    for m in parts.modules():
        m.float().eval().requires_grad_(False)
    return parts


__all__ = ["PIPELINE", "SvdParts", "is_svd_folder", "load_svd_folder"]
