"""Text conditioning for training: with gradients (the training-side twin of
``danqing.conditioning.text``, for trainers whose text encoder or word embeddings train), and
frozen (hidden states encoded once and cached, for trainers whose text encoder stays fixed).
"""

from __future__ import annotations

import torch

from danqing.conditioning.schedule import sdxl_time_ids
from danqing.conditioning.text import TextEncoder
from danqing.errors import InvalidRequest


def tokenize(tokenizer, texts: list[str], device) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def text_conditioning(comps, texts: list[str], size: tuple[int, int], device) -> tuple[torch.Tensor, dict | None]:
    """(context (B, 77, D), SDXL added_cond_kwargs or None) as our sampler conditions the UNet
    at clip skip 1: SD1/SD2 the last hidden state, SDXL the penultimate layers of both
    encoders, the pooled OpenCLIP embedding and size/crop time ids."""
    if comps.family in ("sd1", "sd2"):
        return comps.text_encoder(tokenize(comps.tokenizer, texts, device))[0], None
    if comps.family != "sdxl":
        raise InvalidRequest("model.base", f"fine-tuning a {comps.family} model is not supported; sd1, sd2 and sdxl are")
    h1 = comps.text_encoder(tokenize(comps.tokenizer, texts, device), output_hidden_states=True).hidden_states[-2]
    o2 = comps.text_encoder_2(tokenize(comps.tokenizer_2, texts, device), output_hidden_states=True)
    ctx = torch.cat([h1, o2.hidden_states[-2]], dim=-1)  # (B, 77, 768 + 1280)
    w, h = size
    ids = sdxl_time_ids("sdxl", h, w, len(texts), use_cfg=False, dtype=ctx.dtype, device=device)
    return ctx, {"text_embeds": o2.text_embeds, "time_ids": ids}


@torch.no_grad()
def encode_texts(comps, texts: list[str]) -> torch.Tensor:
    """(N, 77, D) hidden states of each text's first 77-token chunk with the frozen text encoder,
    as our sampler conditions the UNet (clip skip 1), on the CPU in float32."""
    enc = TextEncoder(comps)
    return torch.cat([enc.encode(t).hidden[:, :77].float().cpu() for t in texts])
