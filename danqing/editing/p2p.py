"""Prompt-to-Prompt (Hertz et al. 2022): edit a picture by editing its prompt, keeping its layout.

The source prompt and the edited prompt are denoised side by side from the same noise. In a
window of the steps, the edited branch's cross-attention maps are replaced by the source's
(mapped token by token), and in an earlier window its self-attention maps too, so objects keep
their places while the edited words bring their own values (a new colour, an added word).

- word swap ("red" -> "green"): a replaced run of tokens takes the source run's maps (a run of
  a different length takes their mean, as the paper's mapper);
- refinement (words added): added tokens keep their own maps, the others take the source's;
- re-weighting: the maps of chosen words are scaled (``p2p_reweight``).

Everything runs through one attention processor installed on the UNet for the duration of a
request (``attention_processors``) and restored afterwards; the UNet itself is not copied and
the per-request state lives in a ``P2PController`` made for that request.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from danqing.conditioning.prompt_parser import prompt_schedule, strip_extra_networks
from danqing.conditioning.schedule import ConditioningContext, sdxl_time_ids
from danqing.conditioning.text import pad_to_chunks, tokenize_prompt
from danqing.decode import decode_latents, to_pil, vae_scale_factor
from danqing.editing.images import resize_image
from danqing.editing.inversion import null_text_inversion
from danqing.errors import InvalidRequest
from danqing.passes.batches import Batches, Finish, PassResult, finish_pictures
from danqing.sampling.loop import Conditioning, ConditioningSchedule, denoise
from danqing.sampling.noise import initial_noise

SELF_MAX_TOKENS = 16 * 16  # the paper replaces self-attention only at 16x16 or coarser
BLEND_THRESHOLD = 0.3  # local blending: the edited words' maps above 0.3 of their maximum
BLEND_START = 0.2  # ... from 20% of the steps on (the paper's LocalBlend defaults)


# -- token alignment: small pure functions --------------------------------------------------


def prompt_ids(tokenizer, text: str, field_name: str, embeddings=()) -> list[int]:
    """The 77 token ids of a one-chunk prompt (BOS, tokens, EOS, padding).

    Args:
        embeddings: the request's textual-inversion ``Embedding``s, as the encoder sees them.
    """
    if len(prompt_schedule(text, 1000)) > 1:
        raise InvalidRequest(field_name, "prompt editing and alternation ([a:b:n], [a|b]) cannot be combined "
                             "with Prompt-to-Prompt; write the prompt plainly")
    embeddings = {e.name: e for e in embeddings}
    chunks = tokenize_prompt(tokenizer, text, tuple(embeddings.values()))
    if len(chunks) > 1:
        raise InvalidRequest(field_name, f"Prompt-to-Prompt needs a prompt of at most 75 tokens (one chunk); "
                             f"this one takes {len(chunks)} chunks")
    ids = list(chunks[0].ids)
    # an embedding's positions get ids of their own (negative: never a vocabulary id), so the
    # alignment matches an embedding with itself and sees a different one as a swap
    names = sorted(embeddings)
    for pos, name in chunks[0].fixes:
        for k in range(embeddings[name].n_vectors):
            ids[pos + k] = -(1 + k + 1000 * names.index(name))
    return ids


def changed_tokens(src: list[int], tgt: list[int], ignore: set[int] = frozenset()) -> tuple[list[int], list[int]]:
    """Positions of the source tokens replaced or removed, and of the target tokens that replace
    them or are added: the edited words, which local blending confines the edit to. Tokens in
    ``ignore`` (EOS/padding, shifted when a word is added) are left out."""
    s_pos, t_pos = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=src, b=tgt, autojunk=False).get_opcodes():
        if op != "equal":
            s_pos += [i for i in range(i1, i2) if src[i] not in ignore]
            t_pos += [j for j in range(j1, j2) if tgt[j] not in ignore]
    return s_pos, t_pos


def blend_mask(maps: torch.Tensor, threshold: float = BLEND_THRESHOLD) -> torch.Tensor:
    """(n, h, w) summed attention of the edited words -> (n, 1, h, w) 0/1 mask: dilated by one
    latent pixel (3x3 max-pool), normalised by each map's maximum, thresholded."""
    m = F.max_pool2d(maps[:, None], kernel_size=3, stride=1, padding=1)
    m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (m > threshold).to(maps.dtype)


def align_tokens(src: list[int], tgt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each target token position to source positions.

    Returns:
        mapper: (T_tgt, T_src), each row sums to 1 where ``alpha`` is 1: a kept token maps to
            its source token, a replaced run to the mean of the source run it replaces.
        alpha: (T_tgt,), 1 where the target token takes the source's maps, 0 for added tokens.
    """
    mapper = torch.zeros(len(tgt), len(src))
    alpha = torch.zeros(len(tgt))
    matcher = difflib.SequenceMatcher(a=src, b=tgt, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            for k in range(i2 - i1):
                mapper[j1 + k, i1 + k] = 1.0
                alpha[j1 + k] = 1.0
        elif op == "replace":
            mapper[j1:j2, i1:i2] = 1.0 / (i2 - i1)
            alpha[j1:j2] = 1.0
        # "insert": the added tokens keep their own maps (alpha 0); "delete": source tokens unused
    return mapper, alpha


def find_word(tokenizer, ids: list[int], word: str) -> list[int]:
    """Positions of ``word``'s tokens in ``ids`` (every occurrence); [] when absent."""
    w = tokenizer(word.strip(), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    if not w:
        return []
    return [i + k for i in range(len(ids) - len(w) + 1) if ids[i:i + len(w)] == w for k in range(len(w))]


def reweight_vector(tokenizer, ids: list[int], reweight) -> torch.Tensor:
    """(T,) attention factors: 1 everywhere but the tokens of the reweighted words."""
    weights = torch.ones(len(ids))
    for word, factor in reweight:
        pos = find_word(tokenizer, ids, word)
        if not pos:
            raise InvalidRequest("p2p_reweight", f"{word!r} is not a word of the prompt")
        weights[pos] = factor
    return weights


def swap_words(prompt: str, swaps: dict[str, str]) -> str:
    """``prompt`` with whole words replaced (``{"red": "green"}``); a word not in it is an error."""
    out = prompt
    for old, new in swaps.items():
        pattern = re.compile(rf"(?<!\w){re.escape(old)}(?!\w)")
        if not pattern.search(out):
            raise InvalidRequest("swap", f"{old!r} is not a word of the prompt {prompt!r}")
        out = pattern.sub(new, out)
    return out


def step_window(window: tuple[float, float], total: int) -> tuple[int, int]:
    """(start, end) fractions -> [start, end) model-evaluation indices (the paper's int(n * f))."""
    return int(window[0] * total), int(window[1] * total)


# -- the controller and the attention processor ---------------------------------------------


@dataclass
class P2PController:
    """Per-request state: which batch rows are sources/targets, the maps' mapping, the windows.

    The UNet batch is ``[uncond (2n); cond (2n)]`` with CFG (``[cond (2n)]`` without), each half
    ``[n sources; n targets]``. Only the conditional half is edited, as in the paper.
    """

    n: int
    use_cfg: bool
    mapper: torch.Tensor
    alpha: torch.Tensor
    weights: torch.Tensor
    cross: tuple[int, int]
    self_window: tuple[int, int]
    blend_src: list[int] = field(default_factory=list)
    blend_tgt: list[int] = field(default_factory=list)
    blend_start: int = 0
    latent_hw: tuple[int, int] = (0, 0)
    feature_end: int = 0
    evaluation: int = 0
    edits: dict = field(default_factory=lambda: {"cross": 0, "self": 0})  # maps replaced (diagnostics)
    maps: torch.Tensor | None = None  # (2, n, h, w) summed maps of the edited words: source, target

    def _store(self, src: torch.Tensor, tgt: torch.Tensor) -> None:
        """Add the edited words' maps (averaged over heads, resized to the latents) to ``maps``."""
        h, w = self.latent_hw
        q = src.shape[2]
        hq = max(1, round((q * h / w) ** 0.5))
        wq = q // hq
        parts = []
        for probs, pos in ((src, self.blend_src), (tgt, self.blend_tgt)):
            m = probs[..., pos].sum(-1).mean(1) if pos else torch.zeros(probs.shape[0], q, dtype=probs.dtype,
                                                                          device=probs.device)
            parts.append(F.interpolate(m.reshape(-1, 1, hq, wq).float(), size=(h, w), mode="bilinear",
                                       align_corners=False)[:, 0])
        stacked = torch.stack(parts)
        self.maps = stacked if self.maps is None else self.maps + stacked

    def blend(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """Local blending after step i: outside the edited words' mask the edit follows its source."""
        if not (self.blend_src or self.blend_tgt) or i < self.blend_start or self.maps is None:
            return latents
        n = self.n
        mask = torch.maximum(blend_mask(self.maps[0]), blend_mask(self.maps[1])).to(latents)
        src, tgt = latents[:n], latents[n:2 * n]
        return torch.cat([src, src + mask * (tgt - src), latents[2 * n:]])

    def edit(self, probs: torch.Tensor, heads: int, is_cross: bool) -> torch.Tensor:
        """probs: (batch * heads, Q, K) softmaxed attention -> the same with the targets edited."""
        k = self.evaluation
        blending = is_cross and (self.blend_src or self.blend_tgt)
        if is_cross:
            if not (self.cross[0] <= k < self.cross[1] or blending):
                return probs
        elif not (self.self_window[0] <= k < self.self_window[1] and probs.shape[1] <= SELF_MAX_TOKENS):
            return probs
        b = probs.shape[0] // heads
        p = probs.view(b, heads, *probs.shape[1:])
        n = self.n
        off = b // 2 if self.use_cfg else 0
        src, tgt = p[off:off + n], p[off + n:off + 2 * n]
        if is_cross:
            new = tgt
            if self.cross[0] <= k < self.cross[1]:
                m = self.mapper.to(p)
                a = self.alpha.to(p)
                new = (src @ m.T) * a + tgt * (1 - a)
                new = new * self.weights.to(p)
                self.edits["cross"] += 1
            if blending:
                self._store(src, new)
        else:
            new = src
            self.edits["self"] += 1
        p = torch.cat([p[:off + n], new, p[off + 2 * n:]])
        return p.reshape(probs.shape)


class P2PAttnProcessor:
    """diffusers' plain ``AttnProcessor`` with the softmaxed maps handed to a controller."""

    def __init__(self, controller: P2PController):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = self.controller.edit(probs, attn.heads, is_cross)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def attention_processors(unet, processor):
    """Install ``processor`` on every attention layer for the block, then restore the originals."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor(processor)
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


@contextlib.contextmanager
def feature_injection(unet, controller: P2PController):
    """While ``controller.evaluation < controller.feature_end``, the edited rows' output of the
    UNet's first ResNet (finest resolution, no attention there) is the source rows' (both CFG
    halves): the layout is kept even where a model's attention maps do not hold it (Plug-and-Play,
    Tumanyan et al. 2023, injects decoder features the same way)."""
    def hook(module, inputs, output):
        if controller.evaluation >= controller.feature_end:
            return None
        n, b = controller.n, output.shape[0]
        halves = (0, b // 2) if controller.use_cfg else (0,)
        parts = []
        for off in halves:
            parts += [output[off:off + n], output[off:off + n]]
        return torch.cat(parts)

    handle = unet.down_blocks[0].resnets[0].register_forward_hook(hook) if controller.feature_end > 0 else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def counting_denoise(controller: P2PController, inner):
    """``denoise`` that tells the controller which model evaluation it is in."""

    def fn(unet, x, t, cond, cfg_scale, use_cfg):
        out = inner(unet, x, t, cond, cfg_scale, use_cfg)
        controller.evaluation += 1
        return out

    return fn


# -- running an edit -------------------------------------------------------------------------


def run_p2p(comps, request, *, device, dtype, on_step=None, init=None, post: Finish | None = None,
            context: ConditioningContext | None = None) -> PassResult:
    """Generate ``request.p2p_source`` and its edit ``request.prompt`` side by side.

    Args:
        init: a real picture (PIL) to edit: null-text inverted first (``danqing.editing.inversion``).
        post: ``picture -> (picture, warnings)`` applied to each edited picture (face restoration).
        context: the request's embeddings (Prompt-to-Prompt takes no image prompt).

    Returns:
        ``PassResult`` with the edited pictures, plus ``sources`` (the source pictures: generated,
        or the inversion's reconstruction of ``init``) and ``inversion`` when there was one.
    """
    context = context or ConditioningContext()
    n = request.batch_size
    use_cfg = request.cfg_scale > 1.0
    tok = comps.tokenizer
    source_text = strip_extra_networks(request.p2p_source)[0]  # <lora:> tags act on the weights
    target_text = strip_extra_networks(request.prompt)[0]
    src_ids = prompt_ids(tok, source_text, "p2p_source", context.embeddings)
    tgt_ids = prompt_ids(tok, target_text, "prompt", context.embeddings)
    mapper, alpha = align_tokens(src_ids, tgt_ids)
    weights = reweight_vector(tok, tgt_ids, request.p2p_reweight)
    blend_src, blend_tgt = [], []
    if request.p2p_local_blend:
        blend_src, blend_tgt = changed_tokens(src_ids, tgt_ids, {tok.eos_token_id, tok.pad_token_id})
        if not blend_src and not blend_tgt:  # a reweight of one prompt: blend around its words
            blend_tgt = [i for i, w in enumerate(weights.tolist()) if w != 1.0]
            blend_src = list(blend_tgt) if src_ids == tgt_ids else []

    encoder = context.text_encoder(comps, request.clip_skip)
    src = encoder.encode(source_text)
    tgt = encoder.encode(target_text)
    neg = pad_to_chunks(encoder.encode(request.negative_prompt, negative=True), 1, encoder.empty_chunk(negative=True))
    if neg.n_chunks > 1:
        raise InvalidRequest("negative_prompt", "Prompt-to-Prompt needs a negative prompt of at most 75 tokens")

    def conditioning(uncond_hidden: torch.Tensor) -> Conditioning:
        cond = torch.cat([src.hidden.expand(n, -1, -1), tgt.hidden.expand(n, -1, -1)])
        context = torch.cat([uncond_hidden.expand(2 * n, -1, -1), cond]) if use_cfg else cond
        added = None
        if comps.family == "sdxl":
            pooled = torch.cat([src.pooled.expand(n, -1), tgt.pooled.expand(n, -1)])
            if use_cfg:
                pooled = torch.cat([neg.pooled.expand(2 * n, -1), pooled])
            added = {"text_embeds": pooled,
                     "time_ids": sdxl_time_ids("sdxl", request.height, request.width, pooled.shape[0], use_cfg=False,
                                               dtype=pooled.dtype, device=pooled.device)}
        return Conditioning(context, added)

    factor = vae_scale_factor(comps.vae)
    shape = (comps.unet.config.in_channels, request.height // factor, request.width // factor)
    inversion = None
    if init is not None:
        picture = resize_image(init, request.width, request.height, request.resize_mode)
        inversion = null_text_inversion(comps, picture, src.hidden, neg.hidden, steps=request.steps,
                                        cfg_scale=request.cfg_scale, iterations=request.null_text_iterations,
                                        device=device, dtype=dtype)
        schedule = ConditioningSchedule(list(range(request.steps)), [conditioning(u) for u in inversion.uncond])
    else:
        schedule = ConditioningSchedule([request.steps], [conditioning(neg.hidden)])

    warnings: list[str] = []
    batches = Batches(request, device, repeat=2)  # the same noise for a source and its edit
    for batch in batches:
        scheduler = batch.scheduler(comps.scheduler_config, request.sampler, request.schedule)
        if inversion is not None:
            noise = inversion.latents.to(device=device, dtype=dtype).expand(2 * n, -1, -1, -1).clone()
            gens = None
        else:
            gens = batch.generators
            noise = initial_noise(shape, gens).to(device=device, dtype=dtype)
        scheduler.set_timesteps(request.steps, device=device)
        evaluations = len(scheduler.timesteps)
        controller = P2PController(n, use_cfg, mapper, alpha, weights,
                                   step_window(request.p2p_cross, evaluations),
                                   step_window(request.p2p_self, evaluations),
                                   blend_src=blend_src, blend_tgt=blend_tgt,
                                   blend_start=int(BLEND_START * evaluations), latent_hw=shape[1:],
                                   feature_end=int(request.p2p_features * evaluations))
        with attention_processors(comps.unet, P2PAttnProcessor(controller)), feature_injection(comps.unet, controller):
            sampled = batch.sample(comps, noise, schedule, sampler=request.sampler, schedule=request.schedule,
                                   steps=request.steps, cfg_scale=request.cfg_scale, on_step=on_step,
                                   scheduler=scheduler, generators=gens,
                                   denoise_fn=counting_denoise(controller, denoise), after_step=controller.blend)
        pictures = to_pil(decode_latents(comps.vae, sampled.latents))
        batches.result.sources += pictures[:n]
        batches.record(batch, sampled, latents=sampled.latents[n:],
                       images=finish_pictures(pictures[n:], post, warnings))
    batches.result.inversion, batches.result.warnings = inversion, warnings
    return batches.result
