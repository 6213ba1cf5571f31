"""The loaded parts of one Stable-Diffusion-family model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Components:
    """diffusers/transformers modules of one checkpoint, read-only during sampling.

    Attributes:
        family: "sd1", "sd2", "sdxl" or "sdxl-refiner" (SDXL's refiner: OpenCLIP bigG only, so
            ``text_encoder``/``tokenizer`` are None, and aesthetic-score time ids).
        prediction_type: "epsilon" or "v_prediction" (SD2-768-v).
        unet: ``diffusers.UNet2DConditionModel``.
        vae: ``diffusers.AutoencoderKL``.
        text_encoder: ``transformers.CLIPTextModel`` (SD1/SD2; SDXL's CLIP ViT-L).
        tokenizer: ``transformers.CLIPTokenizer`` for ``text_encoder``.
        scheduler_config: diffusers scheduler config the model was trained with (betas, ...).
        text_encoder_2: SDXL only, ``transformers.CLIPTextModelWithProjection`` (OpenCLIP bigG).
        tokenizer_2: SDXL only, tokenizer for ``text_encoder_2`` (pad token "!").
        metadata: free-form facts (source path, hashes, safetensors header).
    """

    family: str
    prediction_type: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    metadata: dict = field(default_factory=dict)

    def modules(self) -> dict[str, Any]:
        """The torch modules by diffusers component name (None ones left out)."""
        mods = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {k: v for k, v in mods.items() if v is not None}
