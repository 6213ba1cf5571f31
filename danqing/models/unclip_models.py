"""unCLIP families: Stable unCLIP (image variations), loaded from diffusers folders.

Stable unCLIP (Stability AI 2023, after Ramesh et al. 2022, "Hierarchical Text-Conditional
Image Generation with CLIP Latents" -- DALL-E 2) is SD 2.1 whose UNet also takes a CLIP image
embedding: the embedding, noised to a chosen level and followed by the level's sinusoidal
embedding, goes through the UNet's ``class_embedding`` (a projection) and is added to the time
embedding. Given a picture's embedding it makes variations of the picture.

Folder layout (diffusers' ``StableUnCLIPImg2ImgPipeline`` folder)::

    unet/ vae/ text_encoder/ tokenizer/ scheduler/         as SD 2.1
    image_encoder/ (CLIPVisionModelWithProjection) feature_extractor/ (CLIPImageProcessor)
    image_normalizer/ (the embedding's mean and std) image_noising_scheduler/
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danqing.errors import CorruptModel
from danqing.models.components import Components
from danqing.models.tokenizer import clip_tokenizer

UNCLIP_PIPELINES = {"StableUnCLIPImg2ImgPipeline": "unclip"}
UNCLIP_PARTS = ("unet", "vae", "text_encoder", "image_encoder", "image_normalizer")


@dataclass
class UnclipModel:
    """A Stable unCLIP model.

    Attributes:
        kind: "unclip".
        components: the SD 2.1 parts (family "sd2": its text encoding and latents).
        image_encoder: ``transformers.CLIPVisionModelWithProjection``.
        feature_extractor: ``transformers.CLIPImageProcessor`` (the encoder's resize, crop, norm).
        image_normalizer: diffusers' ``StableUnCLIPImageNormalizer`` (embedding mean and std).
        noising_config: the scheduler config that noises the image embedding.
    """

    kind: str
    components: Components
    image_encoder: Any
    feature_extractor: Any
    image_normalizer: Any
    noising_config: dict
    metadata: dict = field(default_factory=dict)


def unclip_kind_of_folder(path: Path) -> str | None:
    """"unclip" for a diffusers Stable unCLIP folder (its ``model_index.json``), else None."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return UNCLIP_PIPELINES.get(json.loads(index.read_text()).get("_class_name", ""))
    except ValueError:
        return None


def _scheduler_config(path: Path, sub: str) -> dict:
    f = path / sub / "scheduler_config.json"
    if not f.is_file():
        raise CorruptModel(f"{path}: the Stable unCLIP folder has no {sub}/scheduler_config.json")
    return json.loads(f.read_text())


def load_unclip_folder(path: Path) -> UnclipModel:
    """Load a Stable unCLIP diffusers folder (local files only, CPU fp32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    path = Path(path)
    if unclip_kind_of_folder(path) is None:
        raise CorruptModel(f"{path}: not a Stable unCLIP folder (model_index.json names StableUnCLIPImg2ImgPipeline)")
    for sub in UNCLIP_PARTS:
        if not (path / sub / "config.json").is_file():
            raise CorruptModel(f"{path}: the Stable unCLIP folder has no {sub}/config.json")
    if not (path / "feature_extractor" / "preprocessor_config.json").is_file():
        raise CorruptModel(f"{path}: the Stable unCLIP folder has no feature_extractor/preprocessor_config.json "
                           "(the CLIP image processor's settings)")
    kw = {"local_files_only": True}
    tok_dir = path / "tokenizer"
    try:
        tokenizer = (CLIPTokenizer.from_pretrained(tok_dir, **kw)
                     if (tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file()
                     else clip_tokenizer("!"))
        scheduler_config = _scheduler_config(path, "scheduler")
        comps = Components(
            family="sd2", prediction_type=scheduler_config.get("prediction_type", "epsilon"),
            unet=UNet2DConditionModel.from_pretrained(path / "unet", **kw),
            vae=AutoencoderKL.from_pretrained(path / "vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **kw), tokenizer=tokenizer,
            scheduler_config=scheduler_config, metadata={"source": str(path)},
        )
        model = UnclipModel(
            kind="unclip", components=comps,
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(path / "image_encoder", **kw),
            feature_extractor=CLIPImageProcessor.from_pretrained(path / "feature_extractor", **kw),
            image_normalizer=StableUnCLIPImageNormalizer.from_pretrained(path / "image_normalizer", **kw),
            noising_config=_scheduler_config(path, "image_noising_scheduler"), metadata={"source": str(path)},
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptModel(f"{path}: cannot load Stable unCLIP folder ({str(exc).splitlines()[0]})") from None
    for m in (comps.unet, comps.vae, comps.text_encoder, model.image_encoder, model.image_normalizer):
        m.eval()
    return model
