"""DeepFloyd IF: a cascade of pixel-space diffusion models, loaded from diffusers folders.

IF (DeepFloyd / Stability AI 2023, after Saharia et al. 2022, "Imagen") generates 64x64 pixels
with stage I from T5-XXL's text embeddings, then stage II (a 4x super-resolution UNet) makes
256x256 of them, conditioned on the same text and on the stage-I picture noised to a chosen
level (noise-conditioning augmentation, the level as the UNet's class label). Both UNets
predict noise and a learned variance (``variance_type: learned_range``); their DDPM schedulers
clip x0 by dynamic thresholding (``thresholding``).

Folder layouts (diffusers' ``IFPipeline`` / ``IFSuperResolutionPipeline`` folders)::

    stage I:  unet/ scheduler/ text_encoder/ (T5EncoderModel) tokenizer/ (T5's; never downloaded)
    stage II: unet/ scheduler/ image_noising_scheduler/ [text_encoder/ tokenizer/]

The released stage-II folders carry no text encoder: stage I's embeddings are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danqing.errors import CorruptModel

IF_PIPELINES = {"IFPipeline": "if-i", "IFSuperResolutionPipeline": "if-ii"}


@dataclass
class PixelStage:
    """One stage of a pixel cascade.

    Attributes:
        kind: "if-i" (text -> 64x64) or "if-ii" (64x64 + text -> 256x256).
        unet: ``diffusers.UNet2DConditionModel`` (6 output channels: noise, variance).
        scheduler_config: the stage's own DDPM config (learned variance, dynamic thresholding).
        noising_config: stage II: the scheduler that noises the low-resolution input.
        text_encoder, tokenizer: ``T5EncoderModel`` and its tokenizer, or None (stage II).
    """

    kind: str
    unet: Any
    scheduler_config: dict
    noising_config: dict | None = None
    text_encoder: Any = None
    tokenizer: Any = None
    metadata: dict = field(default_factory=dict)


def if_kind_of_folder(path: Path) -> str | None:
    """"if-i" / "if-ii" for a diffusers IF folder (its ``model_index.json``), else None."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return IF_PIPELINES.get(json.loads(index.read_text()).get("_class_name", ""))
    except ValueError:
        return None


def _config(path: Path, sub: str) -> dict:
    f = path / sub / "scheduler_config.json"
    if not f.is_file():
        raise CorruptModel(f"{path}: the DeepFloyd IF folder has no {sub}/scheduler_config.json")
    return json.loads(f.read_text())


def load_if_folder(path: Path) -> PixelStage:
    """Load a DeepFloyd IF stage-I or stage-II diffusers folder (local files only, CPU fp32)."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, T5EncoderModel

    path = Path(path)
    kind = if_kind_of_folder(path)
    if kind is None:
        raise CorruptModel(f"{path}: not a DeepFloyd IF folder (model_index.json names IFPipeline or "
                           "IFSuperResolutionPipeline)")
    if not (path / "unet" / "config.json").is_file():
        raise CorruptModel(f"{path}: the DeepFloyd IF folder has no unet/config.json")
    has_text = (path / "text_encoder" / "config.json").is_file()
    if kind == "if-i" and not has_text:
        raise CorruptModel(f"{path}: DeepFloyd IF stage I needs its T5 text encoder: put its config.json and "
                           f"weights (a transformers T5EncoderModel) in {path / 'text_encoder'}/")
    if has_text and not any((path / "tokenizer" / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise CorruptModel(f"{path}: DeepFloyd IF needs the T5 tokenizer: put its files (tokenizer.json, or "
                           f"spiece.model, with tokenizer_config.json) in {path / 'tokenizer'}/ -- no tokenizer "
                           "is downloaded")
    kw = {"local_files_only": True}
    try:
        return PixelStage(
            kind=kind, unet=UNet2DConditionModel.from_pretrained(path / "unet", **kw),
            scheduler_config=_config(path, "scheduler"),
            noising_config=_config(path, "image_noising_scheduler") if kind == "if-ii" else None,
            text_encoder=T5EncoderModel.from_pretrained(path / "text_encoder", **kw) if has_text else None,
            tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer", **kw) if has_text else None,
            metadata={"source": str(path)},
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptModel(f"{path}: cannot load DeepFloyd IF folder ({str(exc).splitlines()[0]})") from None


def save_if_folder(stage: PixelStage, path: Path) -> Path:
    """Write ``stage`` as a diffusers IF folder (``IFPipeline`` / ``IFSuperResolutionPipeline``,
    safetensors, no safety checker or watermarker) that ``load_if_folder`` and diffusers read."""
    import diffusers
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    def scheduler(config: dict):
        return getattr(diffusers, config.get("_class_name", "DDPMScheduler")).from_config(config)

    common = dict(tokenizer=stage.tokenizer, text_encoder=stage.text_encoder, unet=stage.unet,
                  scheduler=scheduler(stage.scheduler_config), safety_checker=None, feature_extractor=None,
                  watermarker=None, requires_safety_checker=False)
    if stage.kind == "if-i":
        pipe = IFPipeline(**common)
    else:
        pipe = IFSuperResolutionPipeline(image_noising_scheduler=scheduler(stage.noising_config), **common)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
