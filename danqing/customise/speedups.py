"""Request options that trade a little picture for speed: DeepCache and token merging (ToMe).

Both change the picture (a little) and so are request fields, written to the infotext and off by
default; both patch the shared UNet for one request's scope and put it back when it closes.

- **DeepCache** (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): the
  high-level features entering the UNet's last up block change slowly from step to step, so
  every ``deepcache_interval``-th model evaluation runs the whole UNet and keeps them; the
  evaluations between run only the shallow branch (``conv_in``, the first down block, the last
  up block, ``conv_out``) on the kept features. Written here over diffusers'
  ``UNet2DConditionModel`` parts (the DeepCache package wraps whole pipelines, which our loop is
  not). A new pass (the timestep goes up again), a new batch shape, or the first call always
  runs the whole UNet.
- **ToMe for SD** (Bolya & Hoffman 2023): the ``tomesd`` package merges similar tokens before
  self-attention in the highest-resolution attention layers, with ``ratio`` of them merged.
  Its random choice of destination tokens is turned off, so a request reproduces exactly.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from danqing.errors import InvalidRequest

DEFAULT_DEEPCACHE_INTERVAL = 2  # the usual strength (DeepCache uses N = 3 at 50 steps; 20 steps need 2)
DEFAULT_TOME_RATIO = 0.5  # tomesd's default ratio
SPEED_KEYS = (("DeepCache interval", "deepcache_interval", int), ("Token merging ratio", "tome_ratio", float))


def speed_params(request) -> dict[str, object]:
    """The infotext entries of the request's speed options (none when they are off); the token
    merging key is A1111's."""
    return {"DeepCache interval": request.deepcache_interval if request.deepcache_interval > 1 else None,
            "Token merging ratio": request.tome_ratio if request.tome_ratio > 0 else None}


def speed_fields(params: dict[str, str]) -> dict[str, object]:
    """The request fields of an infotext's speed entries (``speed_params`` read back)."""
    return {name: kind(params[key]) for key, name, kind in SPEED_KEYS if key in params}


def _is_unet(unet) -> bool:
    return type(unet).__name__ == "UNet2DConditionModel"


@contextlib.contextmanager
def request_speedups(unet, request) -> Iterator[None]:
    """DeepCache and ToMe on ``unet`` for one request, as its fields ask (no change when off)."""
    wants = request.deepcache_interval > 1 or request.tome_ratio > 0
    if wants and not _is_unet(unet):
        raise InvalidRequest("deepcache_interval" if request.deepcache_interval > 1 else "tome_ratio",
                             f"DeepCache and token merging work with SD1/SD2/SDXL UNets, not {type(unet).__name__}")
    if request.deepcache_interval > 1 and request.controlnet:
        raise InvalidRequest("deepcache_interval", "DeepCache cannot be combined with ControlNet units "
                             "(their residuals enter the skipped blocks)")
    with contextlib.ExitStack() as stack:
        if request.tome_ratio > 0:
            stack.enter_context(token_merging(unet, request.tome_ratio))
        if request.deepcache_interval > 1:
            stack.enter_context(deepcache(unet, request.deepcache_interval))
        yield


# -- ToMe -----------------------------------------------------------------------------------------
def highest_attention_downsample(unet) -> int:
    """The downsampling factor (1, 2, 4, ...) of the UNet's highest-resolution attention level:
    SD1/SD2 1, SDXL 2 (its first level has no attention). tomesd merges there."""
    for level, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            return 2 ** level
    return 1


@contextlib.contextmanager
def token_merging(unet, ratio: float) -> Iterator[None]:
    """tomesd's patch on ``unet`` (``ratio`` of the tokens merged before self-attention), removed
    when the block ends."""
    import tomesd  # optional heavy-ish dependency, only for requests that ask for it

    tomesd.apply_patch(unet, ratio=ratio, max_downsample=highest_attention_downsample(unet), use_rand=False)
    try:
        yield
    finally:
        tomesd.remove_patch(unet)
        unet.__dict__.pop("_tome_info", None)


# -- DeepCache ------------------------------------------------------------------------------------
def _embedding(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs):
    """The time (+ SDXL added) embedding, as ``UNet2DConditionModel.forward`` computes it."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug if aug is not None else emb
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def _block(block, hidden, emb, context, attn_kwargs, **extra):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=hidden, temb=emb, encoder_hidden_states=context,
                     cross_attention_kwargs=attn_kwargs, **extra)
    return block(hidden_states=hidden, temb=emb, **extra)


def shallow_forward(unet, cached, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                    cross_attention_kwargs=None):
    """The UNet's shallow branch on ``cached``, the (2B, C, h, w) input of its last up block
    from the last full evaluation: conv_in -> down_blocks[0] -> up_blocks[-1] -> conv_out."""
    emb = _embedding(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                 added_cond_kwargs=added_cond_kwargs)
    h = unet.conv_in(sample)
    _, res = _block(unet.down_blocks[0], h, emb, context, cross_attention_kwargs)
    up = unet.up_blocks[-1]
    skips = ((h,) + tuple(res))[:len(up.resnets)]  # what the full forward leaves for the last up block
    out = _block(up, cached, emb, context, cross_attention_kwargs, res_hidden_states_tuple=skips, upsample_size=None)
    if unet.conv_norm_out is not None:
        out = unet.conv_act(unet.conv_norm_out(out))
    return unet.conv_out(out)


def full_forward_keeping(unet, sample, timestep, encoder_hidden_states, **kwargs):
    """The UNet's full evaluation and the input of its last up block (what the shallow branch
    reuses), as one function a trace can record (``models.traced.replay``)."""
    kept = []

    def keep(module, args, block_kwargs):
        kept.append(block_kwargs["hidden_states"] if "hidden_states" in block_kwargs else args[0])

    hook = unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        out = type(unet).forward(unet, sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]
    finally:
        hook.remove()
    return out, kept[-1]


@contextlib.contextmanager
def deepcache(unet, interval: int) -> Iterator[None]:
    """Every ``interval``-th evaluation of ``unet`` runs in full; the others run its shallow
    branch on the last full evaluation's deep features. The state lives in this block only.
    Under ``--fast trace`` each branch is replayed from one trace."""
    from danqing.models.traced import replay

    state = {"cached": None, "calls": 0, "last_t": None}
    full_forward = unet.forward

    def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        t = float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else float(timestep)
        cached = state["cached"]
        new_pass = state["last_t"] is not None and t > state["last_t"]
        if new_pass:
            state["calls"] = 0
        state["last_t"] = t
        if (args or kwargs.get("down_block_additional_residuals") is not None
                or kwargs.get("mid_block_additional_residual") is not None):
            return full_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)  # not cacheable
        full = cached is None or state["calls"] % interval == 0 or cached.shape[0] != sample.shape[0]
        state["calls"] += 1
        return_dict = kwargs.pop("return_dict", True)
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        if full:
            out, state["cached"] = replay(unet, "deepcache.full", full_forward_keeping, inputs, kwargs)
        else:
            out = replay(unet, "deepcache.shallow", shallow_forward, {"cached": cached, **inputs},
                         {k: kwargs.get(k) for k in ("added_cond_kwargs", "cross_attention_kwargs")})
        return (out,) if return_dict is False else _output(out)

    unet.forward = forward
    try:
        yield
    finally:
        unet.__dict__.pop("forward", None)


def _output(sample):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)
