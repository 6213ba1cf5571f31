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


def without_words(text: str, words) -> str:
    """``text`` with each of ``words`` left out (whole words only) and the commas and spaces
    around them tidied: "a photo of dq_anna, smiling" without dq_anna -> "a photo of, smiling"."""
    import re

    for w in words:
        text = re.sub(rf"(?<![\w]){re.escape(w)}(?![\w])", "", text)
    return re.sub(r"\s+", " ", re.sub(r"\s+,", ",", text)).strip(" ,")


class TextPreservation:
    """Text-encoder preservation: a LoRA's text-encoder adapters (and new words) are held to the
    frozen encoder's hidden states on prompts that do not name what trains, so the words of other
    prompts (a background colour, a style) keep their meaning while the trigger learns its person.
    The targets are encoded at construction: build it before the adapters are added.

    Args:
        comps: the model's components (adapters not added yet).
        prompts: the prompts to preserve (deduplicated; at least one).
        size: the training size (SDXL's time ids).
        weight: the loss's weight.
        batch: prompts drawn per step.
    """

    def __init__(self, comps, prompts: list[str], size: tuple[int, int], weight: float, batch: int = 4):
        self.prompts = list(dict.fromkeys(p for p in prompts if p))
        if not self.prompts:
            raise InvalidRequest("network.te_preserve", "no prompt to preserve: give network.preserve_prompts, or "
                                 "train words (train_words, word_init) the captions can be taken without")
        self.size, self.weight, self.batch = size, weight, batch
        with torch.no_grad():
            self.targets = [self._encode(comps, [p], "cpu") for p in self.prompts]

    def _encode(self, comps, texts: list[str], device) -> torch.Tensor:
        ctx, added = text_conditioning(comps, texts, self.size, device)
        return ctx if added is None else torch.cat([ctx.flatten(1), added["text_embeds"]], dim=1)

    def __call__(self, comps, rng, device) -> torch.Tensor:
        """The weighted mean squared difference on ``batch`` prompts drawn with ``rng``."""
        idx = [rng.randrange(len(self.prompts)) for _ in range(min(self.batch, len(self.prompts)))]
        got = self._encode(comps, [self.prompts[i] for i in idx], device)
        want = torch.cat([self.targets[i] for i in idx]).to(device=device, dtype=got.dtype)
        return self.weight * torch.nn.functional.mse_loss(got, want)
