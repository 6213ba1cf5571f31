"""Text conditioning of the flow-matching families: SD3 / SD3.5 and FLUX.1.

SD3 (Esser et al. 2024, section 5.1; diffusers' ``StableDiffusion3Pipeline.encode_prompt``):
CLIP-L and OpenCLIP bigG penultimate hidden states side by side, (1, 77, 768 + 1280), zero-padded
to T5's width and followed by T5-XXL's 256 tokens, (1, 77 + 256, 4096); pooled: both CLIPs'
projected EOS embeddings, (1, 2048). Without T5 (SD3 allows it) its 256 tokens are zeros. A model
whose folder names another ``max_sequence_length`` (``Components.t5_tokens``; danqing-tiny-flow:
0, the CLIP tokens alone) gets that many.

FLUX.1 (``FluxPipeline.encode_prompt``): T5-XXL's 512 tokens are the context, (1, 512, 4096);
CLIP-L's pooled output is the only other input, (1, 768).

A1111 prompt syntax applies: emphasis weights multiply the hidden states and restore their mean
(``text.apply_emphasis``) for CLIP and T5 alike. CLIP sees the first chunk of 75 tokens (as the
diffusers pipelines truncate); T5 sees up to 256 (SD3) / 512 (FLUX) tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from danqing.conditioning.prompt_parser import parse_attention
from danqing.conditioning.text import TextCond, _hidden, apply_emphasis, tokenize_prompt

T5_TOKENS = {"sd3": 256, "flux": 512}  # max_sequence_length of the diffusers pipelines


def t5_chunk(tokenizer, text: str, length: int) -> tuple[list[int], list[float]]:
    """T5 ids and emphasis weights of ``text``: its pieces' tokens (no BOS), cut to ``length``
    - 1, then EOS, then padding -- what ``tokenizer(text, padding="max_length",
    truncation=True)`` gives for a prompt without emphasis."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_attention(text):
        if piece == "BREAK" and weight == -1:
            continue
        got = tokenizer(piece, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        ids += got
        weights += [weight] * len(got)
    ids, weights = ids[:length - 1] + [tokenizer.eos_token_id], weights[:length - 1] + [1.0]
    pad = length - len(ids)
    return ids + [tokenizer.pad_token_id] * pad, weights + [1.0] * pad


def t5_hidden(encoder, tokenizer, text: str, length: int, device) -> torch.Tensor:
    """T5 encoder's last hidden states of ``text``, emphasis applied: (1, length, d_model)."""
    ids, weights = t5_chunk(tokenizer, text, length)
    z = encoder(torch.tensor([ids], device=device))[0]
    return apply_emphasis(z, torch.tensor(weights))


def sd3_clip(c, ids1: torch.Tensor, ids2: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Both CLIPs of an SD3 model on token ids (B, 77) each: their hidden states of layer
    -(clip_skip + 1), side by side, (B, 77, D1 + D2), and their projected EOS embeddings, (B, P1 + P2).
    The sampler's encoder and the trainer of danqing-tiny-flow both read them here."""
    h1, out1 = _hidden(c.text_encoder, ids1, clip_skip, final_norm=False)
    h2, out2 = _hidden(c.text_encoder_2, ids2, clip_skip, final_norm=False)
    return torch.cat([h1, h2], dim=-1), torch.cat([out1.text_embeds, out2.text_embeds], dim=-1)


def sd3_context(c, clip: torch.Tensor, t5: torch.Tensor | None) -> torch.Tensor:
    """SD3's context: the CLIP part zero-padded to the transformer's width, then T5's tokens
    (zeros without T5: ``Components.t5_tokens`` of them, default 256)."""
    width = c.unet.config.joint_attention_dim
    if t5 is None:  # SD3 without T5: zeros in its place (diffusers' pipeline with text_encoder_3=None)
        length = T5_TOKENS["sd3"] if c.t5_tokens is None else c.t5_tokens
        t5 = torch.zeros(clip.shape[0], length, width, device=clip.device, dtype=clip.dtype)
    return torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1)


def encode_sd3(c, text: str, clip_skip: int, device) -> TextCond:
    """SD3's context (1, 77 + T5 tokens, D) and pooled (1, P) embeddings of one prompt."""
    ch1 = tokenize_prompt(c.tokenizer, text)[0]
    ch2 = tokenize_prompt(c.tokenizer_2, text)[0]
    clip, pooled = sd3_clip(c, torch.tensor([ch1.ids], device=device), torch.tensor([ch2.ids], device=device), clip_skip)
    clip = apply_emphasis(clip, torch.tensor(ch1.weights))  # (1, 77, 768 + 1280)
    t5 = None
    if c.text_encoder_3 is not None:
        length = T5_TOKENS["sd3"] if c.t5_tokens is None else c.t5_tokens
        t5 = t5_hidden(c.text_encoder_3, c.tokenizer_3, text, length, device)
    return TextCond(sd3_context(c, clip, t5), pooled)


def encode_flux(c, text: str, device) -> TextCond:
    """FLUX's context (1, 512, D) from T5 and pooled (1, 768) from CLIP-L of one prompt."""
    ch = tokenize_prompt(c.tokenizer, text)[0]
    pooled = c.text_encoder(torch.tensor([ch.ids], device=device)).pooler_output  # (1, 768)
    hidden = t5_hidden(c.text_encoder_2, c.tokenizer_2, text, T5_TOKENS["flux"], device)
    return TextCond(hidden, pooled)


class FlowTextEncoder:
    """``text.TextEncoder``'s counterpart for SD3 and FLUX (what ``build_conditioning`` calls).

    Args:
        components: loaded ``Components`` of family "sd3" or "flux".
        clip_skip: A1111 clip skip (SD3's CLIP encoders; 1 = the penultimate layer, as SD3 reads).
    """

    def __init__(self, components, clip_skip: int = 1):
        self.c = components
        self.clip_skip = clip_skip

    @property
    def device(self) -> torch.device:
        return self.c.text_encoder.device

    @torch.no_grad()
    def encode(self, text: str, *, negative: bool = False) -> TextCond:
        if self.c.family == "flux":
            return encode_flux(self.c, text, self.device)
        return encode_sd3(self.c, text, self.clip_skip, self.device)

    def empty_chunk(self, *, negative: bool = False) -> TextCond:
        return self.encode("", negative=negative)
