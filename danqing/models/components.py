"""The loaded parts of one Stable-Diffusion-family model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux")
# flow-matching transformer families: the denoiser is a diffusers transformer, saved as "transformer"
TRANSFORMER_FAMILIES = ("sd3", "flux")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Components:
    """diffusers/transformers modules of one checkpoint, read-only during sampling.

    Attributes:
        family: "sd1", "sd2", "sdxl" or "sdxl-refiner" (SDXL's refiner: OpenCLIP bigG only, so
            ``text_encoder``/``tokenizer`` are None, and aesthetic-score time ids), "sd3" (SD3 /
            SD3.5) or "flux" (FLUX.1).
        prediction_type: "epsilon" or "v_prediction" (SD2-768-v); "flow" for SD3 / FLUX.
        unet: the denoiser: ``diffusers.UNet2DConditionModel``, or for SD3 / FLUX the
            ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` (saved as ``transformer/``).
        vae: ``diffusers.AutoencoderKL``.
        text_encoder: ``transformers.CLIPTextModel`` (SD1/SD2; SDXL's and FLUX's CLIP ViT-L),
            ``CLIPTextModelWithProjection`` for SD3's CLIP-L.
        tokenizer: ``transformers.CLIPTokenizer`` for ``text_encoder``.
        scheduler_config: diffusers scheduler config the model was trained with (betas, ...).
        text_encoder_2: SDXL and SD3: ``transformers.CLIPTextModelWithProjection`` (OpenCLIP
            bigG); FLUX: ``T5EncoderModel`` (diffusers' component names).
        tokenizer_2: tokenizer for ``text_encoder_2`` (OpenCLIP: pad token "!"; FLUX: T5's).
        text_encoder_3, tokenizer_3: SD3 only, ``T5EncoderModel`` and its tokenizer; None when
            the model is used without T5 (SD3 then feeds zeros in its place).
        metadata: free-form facts (source path, hashes, safetensors header).
        t5_tokens: SD3 only: how many T5 tokens follow the CLIP ones in the context (diffusers'
            ``max_sequence_length``; zeros in their place without T5); None = the pipeline's 256.
            A model trained with fewer (danqing-tiny-flow: none) says so in its folder.
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
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    t5_tokens: int | None = None

    @property
    def denoiser_name(self) -> str:
        """The diffusers component name of ``unet``: "transformer" for SD3 / FLUX."""
        return "transformer" if self.family in TRANSFORMER_FAMILIES else "unet"

    @property
    def text_to_video(self) -> bool:
        """A text-to-video model (ModelScope / zeroscope: ``UNet3DConditionModel``), whose UNet
        denoises whole clips and draws no single picture."""
        return type(self.unet).__name__ == "UNet3DConditionModel"

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latents the denoiser works on (FLUX packs 2x2 of them)."""
        return self.vae.config.latent_channels if self.family in TRANSFORMER_FAMILIES else self.unet.config.in_channels

    def modules(self) -> dict[str, Any]:
        """The torch modules by diffusers component name (None ones left out)."""
        mods = {self.denoiser_name: self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2, "text_encoder_3": self.text_encoder_3}
        return {k: v for k, v in mods.items() if v is not None}
