"""A request's per-step conditioning: prompt-editing schedules encoded and batched for the loop.

Every pass (txt2img, img2img, hires, refiner) conditions the UNet through ``build_conditioning``;
what a request adds beyond its model (textual-inversion embeddings, an IP-Adapter's image
prompt) arrives as a ``ConditioningContext`` argument made by ``Studio.generate`` for that
request: nothing here reads ambient state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from danqing.conditioning.flow_text import FlowTextEncoder
from danqing.conditioning.prompt_parser import prompt_schedule, strip_extra_networks
from danqing.conditioning.regions import regional_conditioning
from danqing.conditioning.text import TextEncoder, pad_to_chunks
from danqing.sampling.flow import DISTILLED_CFG_SCALE, is_flow_family
from danqing.sampling.loop import Conditioning, ConditioningSchedule

# SDXL refiner's aesthetic-score conditioning (diffusers' and A1111's defaults)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


@dataclass(frozen=True)
class ConditioningContext:
    """What one request adds to its prompts, handed to every pass that encodes text.

    Attributes:
        embeddings: the textual-inversion ``Embedding``s its prompts may call by name
            (``customise.embeddings``; those of ``<lora:...>`` files included).
        image_prompt: the IP-Adapter's encoded pictures (``customise.ip_adapter.ImagePrompt``),
            or None.
    """

    embeddings: tuple = ()
    image_prompt: object | None = None

    def text_encoder(self, comps, clip_skip: int = 1) -> TextEncoder:
        """A ``TextEncoder`` for ``comps`` that knows this request's embeddings (SD3 / FLUX: a
        ``FlowTextEncoder``; textual inversion is for the CLIP-only families)."""
        if is_flow_family(comps.family):
            return FlowTextEncoder(comps, clip_skip=clip_skip)
        return TextEncoder(comps, clip_skip=clip_skip, embeddings=self.embeddings)


def sdxl_time_ids(family: str, height: int, width: int, batch: int, *, use_cfg: bool,
                  dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, section 2.2).

    Base (``family`` "sdxl"): (2B or B, 6) rows of original size, crop (0, 0), target size.
    Refiner ("sdxl-refiner"): (2B or B, 5) rows of original size, crop, aesthetic score (2.5 for
    the unconditional half, 6 for the conditional one).
    """
    h, w = height, width
    if family == "sdxl":
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device)
        return ids.expand(2 * batch if use_cfg else batch, -1)
    pos = torch.tensor([[h, w, 0, 0, AESTHETIC_SCORE]], dtype=dtype, device=device).expand(batch, -1)
    if not use_cfg:
        return pos
    neg = torch.tensor([[h, w, 0, 0, NEGATIVE_AESTHETIC_SCORE]], dtype=dtype, device=device).expand(batch, -1)
    return torch.cat([neg, pos])


def request_schedule(text: str, request, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """``prompt_schedule`` of ``text`` for ``request``'s steps; with ``first_pass_steps`` the
    request is a hires fix's second pass and continues the first pass's timeline (A1111 >= 1.6)."""
    if first_pass_steps is None:
        return prompt_schedule(text, request.steps)
    return prompt_schedule(text, first_pass_steps, hires_steps=request.steps)


def prompt_texts(request, second_pass=None) -> list[str]:
    """Every text a request's prompts take at some step (prompt editing resolved): where
    textual-inversion embeddings are looked for.

    Args:
        second_pass: the hires fix's second-pass request (``editing.hires.second_pass_request``),
            whose prompts follow the first pass's timeline; None without hires fix.
    """
    texts = []
    for text in (request.prompt, request.negative_prompt, request.hr_prompt, request.hr_negative_prompt,
                 request.p2p_source):
        if text:  # <lora:...> tags are not text the encoder sees
            texts += [strip_extra_networks(t)[0] for _, t in prompt_schedule(text, request.steps)]
    if second_pass is not None:
        for text in (second_pass.prompt, second_pass.negative_prompt):
            if text:
                texts += [strip_extra_networks(t)[0] for _, t in request_schedule(text, second_pass, request.steps)]
    return list(dict.fromkeys(texts))


def build_conditioning(encoder: TextEncoder, request, *, batch: int, image_prompt=None,
                       first_pass_steps: int | None = None) -> ConditioningSchedule:
    """The per-step conditioning for the whole request (prompt editing for both prompts).

    Every scheduled text is encoded once; all are padded with the empty prompt's chunk to the
    longest chunk count so the UNet sees one static shape for the whole run.

    Args:
        encoder: the request's ``TextEncoder`` (``ConditioningContext.text_encoder``).
        batch: images per batch (B).
        image_prompt: the request's IP-Adapter ``ImagePrompt`` or None (ignored by the SDXL
            refiner, which has no adapter).
        first_pass_steps: for a hires fix's second pass, the first pass's steps: the prompt
            schedules continue its timeline (``prompt_schedule(..., hires_steps=...)``).
    """
    comps = encoder.c
    if comps.family == "sdxl-refiner":
        image_prompt = None
    use_cfg = request.cfg_scale > 1.0
    # <lora:...> tags are applied to the weights (Studio.generate), not encoded as text
    prompt = strip_extra_networks(request.prompt)[0]
    cache: dict[tuple[str, bool], object] = {}

    def enc(text: str, negative: bool):
        key = (text, negative and comps.family == "sdxl")  # SDXL's empty negative is zeros
        if key not in cache:
            cache[key] = encoder.encode(text, negative=negative)
        return cache[key]

    if getattr(request, "regions", None) is not None:  # a slice of the context per region (conditioning/regions.py)
        pos_c, neg_c = regional_conditioning(prompt, request.negative_prompt, request.regions, use_cfg=use_cfg, encode=enc,
                                             schedule=lambda text: request_schedule(text, request, first_pass_steps))
    else:
        pos = request_schedule(prompt, request, first_pass_steps)
        neg = request_schedule(request.negative_prompt, request, first_pass_steps) if use_cfg else []  # CFG 1: not encoded
        pos_c = [(end, enc(text, False)) for end, text in pos]
        neg_c = [(end, enc(text, True)) for end, text in neg]
    n_chunks = max(c.n_chunks for _, c in pos_c + neg_c)
    pos_c = [(end, pad_to_chunks(c, n_chunks, enc("", False))) for end, c in pos_c]
    neg_c = [(end, pad_to_chunks(c, n_chunks, enc("", True))) for end, c in neg_c]

    # Merge both schedules: a new entry wherever either prompt changes. As in A1111's
    # reconstruct_cond_batch, 0-based step s uses the first entry with s <= end_at_step.
    ends = sorted({end for end, _ in pos_c} | {end for end, _ in neg_c})
    conds = []
    for end in ends:
        p = next(c for e, c in pos_c if end <= e)
        n = next(c for e, c in neg_c if end <= e) if use_cfg else None
        hidden = [n.hidden, p.hidden] if use_cfg else [p.hidden]
        context = torch.cat([h.expand(batch, -1, -1) for h in hidden])  # (2B or B, 77 * chunks, D)
        added = None
        if comps.family in ("sdxl", "sdxl-refiner"):
            pooled = [n.pooled, p.pooled] if use_cfg else [p.pooled]
            added = {"text_embeds": torch.cat([x.expand(batch, -1) for x in pooled]),
                     "time_ids": sdxl_time_ids(comps.family, request.height, request.width, batch, use_cfg=use_cfg,
                                               dtype=p.hidden.dtype, device=p.hidden.device)}
        if is_flow_family(comps.family):  # SD3 / FLUX: pooled CLIP; FLUX's distilled guidance
            pooled = [n.pooled, p.pooled] if use_cfg else [p.pooled]
            added = {"pooled": torch.cat([x.expand(batch, -1) for x in pooled])}
            if comps.family == "flux":
                scale = getattr(request, "distilled_cfg_scale", None)
                added["guidance"] = DISTILLED_CFG_SCALE if scale is None else scale
        if image_prompt is not None:  # IP-Adapter: diffusers' UNet reads added_cond_kwargs["image_embeds"]
            added = {**(added or {}), "image_embeds": [e.to(context) for e in image_prompt.batch(batch, use_cfg)]}
        conds.append(Conditioning(context, added))
    return ConditioningSchedule(ends, conds)
