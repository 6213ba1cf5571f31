"""Regional prompting in the UNet's cross-attention (Regional Prompter's "Attention" mode).

Every cross-attention layer attends each slice of the context -- one per region prompt, the
base prompt first -- on its own, with the layer's own processor, and blends the outputs with the
regions' weights at the layer's resolution (``conditioning.regions.RegionPlan``):

    out = sum_s W_s(x, y) * Attention(q, k_s, v_s)          # sum_s W_s = 1 at every position

The UNet runs once per step, as without regions. With CFG the batch is [uncond; cond]; a
single negative prompt's rows attend only the first slice (the negative, repeated), which is
exactly the attention without regions; a negative prompt with a part per region is blended like
the prompt. The processors are installed for the length of a ``with`` block and the originals
put back in its ``finally``: the shared UNet is the same object, with the same processors, after.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from danqing.errors import InvalidRequest


class RegionalAttnProcessor:
    """Wraps a cross-attention layer's own processor (``inner``) and calls it once per slice.

    Args:
        inner: the layer's processor (diffusers' ``AttnProcessor2_0`` and the like).
        plan: the request's ``RegionPlan``.
    """

    def __init__(self, inner, plan):
        self.inner = inner
        self.plan = plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        plan = self.plan
        s_count = plan.slices
        t = encoder_hidden_states.shape[1] // s_count  # tokens per slice: n chunks * 77

        def run(rows, s):
            ctx = encoder_hidden_states[rows, s * t:(s + 1) * t]
            return self.inner(attn, hidden_states[rows], ctx, attention_mask, temb, *args, **kwargs)

        weights = plan.weights(hidden_states.shape[1], hidden_states)  # (S, 1, L, 1)
        every = slice(None)
        first = run(every, 0)  # (rows, L, C)
        n_uncond = hidden_states.shape[0] // 2 if plan.use_cfg and not plan.regional_negative else 0
        rows = slice(n_uncond, None)
        out = weights[0] * first[rows]
        for s in range(1, s_count):
            out = out + weights[s] * run(rows, s)
        if n_uncond:  # a single negative: its rows are the attention without regions
            out = torch.cat([first[:n_uncond], out])
        return out


@contextlib.contextmanager
def regional_attention(unet, plan) -> Iterator[None]:
    """``RegionalAttnProcessor`` on every cross-attention layer of ``unet`` (``attn2``) for the
    block; the original processors (the same objects) are put back afterwards, also on error.

    Raises:
        InvalidRequest: a UNet whose batch is not [uncond; cond] (instruct-pix2pix).
    """
    if unet.config.in_channels == 8:
        raise InvalidRequest("regions", "regional prompting is not available with instruct-pix2pix models")
    saved = dict(unet.attn_processors)
    procs = {name: RegionalAttnProcessor(proc, plan) if name.endswith("attn2.processor") else proc
             for name, proc in saved.items()}
    try:
        unet.set_attn_processor(procs)
        yield
    finally:
        unet.set_attn_processor(saved)
