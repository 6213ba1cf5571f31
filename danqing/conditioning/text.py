"""Text conditioning as A1111 does it: weighted tokens, 75-token chunks, clip skip, SDXL.

A prompt is parsed into (text, weight) pieces (``prompt_parser.parse_attention``), tokenized, and
packed into chunks of 75 tokens; each chunk becomes ``[BOS] + 75 tokens + [EOS]`` (77 ids, padding
after the first EOS with the tokenizer's pad id), is encoded on its own, weighted, and the chunks
are concatenated along the token axis: a 200-token prompt gives (B, 3*77, D). This follows
A1111's ``FrozenCLIPEmbedderWithCustomWordsBase`` (``sd_hijack_clip.py``): chunk breaks move back
to the last comma when it is at most 20 tokens back, ``BREAK`` starts a new chunk, and emphasis
multiplies hidden states by their weights and then restores the chunk's original mean.

Textual-inversion embeddings (``danqing.customise.embeddings``) called by name in the prompt
take ``n`` positions of a chunk (never split across two: A1111 moves the whole embedding to the
next chunk) and their vectors replace the token embeddings there during the encoder call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from danqing.conditioning.prompt_parser import parse_attention
from danqing.customise.embeddings import PLACEHOLDER_ID, EmbeddingUse, build_lookup, find_embeddings, inject_vectors

CHUNK = 75  # tokens per chunk, without BOS/EOS
COMMA_BACKTRACK = 20  # A1111 "comma_padding_backtrack"


@dataclass(frozen=True)
class TokenChunk:
    """77 token ids and their emphasis weights (BOS/EOS/padding weigh 1.0).

    ``fixes``: (position in the 77 ids, embedding name) where a textual-inversion embedding's
    vectors replace the placeholder ids (A1111's ``PromptChunkFix``).
    """

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()


@dataclass
class TextCond:
    """Encoded text for one prompt.

    Attributes:
        hidden: (1, 77 * n_chunks, D) -- D = 768 (SD1), 1024 (SD2), 2048 (SDXL).
        pooled: SDXL only, (1, 1280): encoder 2's projected EOS embedding of the first chunk.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def n_chunks(self) -> int:
        return self.hidden.shape[1] // 77


def chunk_tokens(pieces: list[tuple[list, float]], *, bos: int, eos: int, pad: int, comma: int) -> list[TokenChunk]:
    """Pack weighted token runs into 77-id chunks (A1111 ``tokenize_line``).

    Args:
        pieces: (token ids without BOS/EOS, weight) per parsed piece; weight -1 with no ids marks BREAK.
            An item may be an ``EmbeddingUse`` (textual inversion): it takes ``n`` positions of
            one chunk, starting a new chunk when it does not fit in this one.
        bos, eos, pad, comma: special ids of the tokenizer (pad follows the first EOS).
    """
    chunks: list[TokenChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []  # (index in ids, name)
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, fixes, last_comma
        n_pad = CHUNK - len(ids)
        full = [bos] + ids + [eos] + [pad] * n_pad
        chunks.append(TokenChunk(tuple(full), tuple([1.0] + weights + [1.0] + [1.0] * n_pad),
                                 tuple((i + 1, name) for i, name in fixes)))  # +1: BOS
        ids, weights, fixes, last_comma = [], [], [], -1

    for tokens, weight in pieces:
        if weight == -1 and not tokens:  # BREAK
            close()
            continue
        for token in tokens:
            if isinstance(token, EmbeddingUse):
                if token.n > CHUNK:
                    raise ValueError(f"embedding {token.name!r} has {token.n} vectors; at most {CHUNK} fit in a chunk")
                if len(ids) + token.n > CHUNK:
                    close()
                fixes.append((len(ids), token.name))
                ids += [PLACEHOLDER_ID] * token.n
                weights += [weight] * token.n
                continue
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved_ids, moved_w = ids[cut:], weights[cut:]
                moved_fixes = [(i - cut, name) for i, name in fixes if i >= cut]
                ids, weights, fixes = ids[:cut], weights[:cut], [(i, n) for i, n in fixes if i < cut]
                close()
                ids, weights, fixes = moved_ids, moved_w, moved_fixes
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def tokenize_prompt(tokenizer, text: str, embeddings=()) -> list[TokenChunk]:
    """Parse emphasis/BREAK in ``text`` and pack it into chunks for ``tokenizer``.

    Args:
        embeddings: textual-inversion ``Embedding``s whose names, where they occur, become
            their vectors (``TokenChunk.fixes``).
    """
    lookup = build_lookup(tokenizer, embeddings) if embeddings else {}
    parsed = parse_attention(text)
    pieces: list[tuple[list, float]] = []
    for piece, weight in parsed:
        if piece == "BREAK" and weight == -1:
            pieces.append(([], -1))
            continue
        ids = tokenizer(piece, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        if not ids:  # whitespace: nothing to encode (and weight -1 with no ids would read as BREAK)
            continue
        pieces.append((find_embeddings(ids, lookup) if lookup else ids, weight))
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    return chunk_tokens(pieces, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, comma=comma)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis: z * w, then rescale so the mean is unchanged.

    Args:
        z: (1, 77, D) hidden states of one chunk.
        weights: (77,) emphasis weights.
    """
    if bool((weights == 1).all()):
        # exactly z; and the rescale below would be 0/0 = NaN when the mean is exactly zero
        # (a final LayerNorm with zero bias makes every token's mean ~0)
        return z
    original_mean = z.mean()
    z = z * weights.reshape(1, -1, 1).to(z)
    new_mean = z.mean()
    return z if new_mean == 0 else z * (original_mean / new_mean)


def _hidden(encoder, ids: torch.Tensor, clip_skip: int, *, final_norm: bool) -> tuple[torch.Tensor, object]:
    """Hidden states of layer -clip_skip (1 = last).

    SD1/SD2 (``final_norm``): A1111/diffusers take ``hidden_states[-clip_skip]`` through the final
    layer norm (the last layer's output already is normed). SDXL: ``hidden_states[-(clip_skip + 1)]``
    without the norm (penultimate layer by default).
    """
    out = encoder(ids, output_hidden_states=True)
    if final_norm:
        if clip_skip == 1:
            return out.last_hidden_state, out
        # transformers 5: CLIPTextModel is the text transformer itself; WithProjection wraps it.
        final_norm_layer = getattr(encoder, "text_model", encoder).final_layer_norm
        return final_norm_layer(out.hidden_states[-clip_skip]), out
    return out.hidden_states[-(clip_skip + 1)], out


class TextEncoder:
    """Encodes prompts for one loaded model (SD1, SD2 or SDXL) and one request.

    Args:
        components: ``danqing.models.components.Components``.
        clip_skip: A1111 clip skip (1 = last layer).
        embeddings: the request's textual-inversion ``Embedding``s (``ConditioningContext``);
            their names in a prompt become their vectors. None are known otherwise.
    """

    def __init__(self, components, clip_skip: int = 1, embeddings=()):
        self.c = components
        self.clip_skip = clip_skip
        self.embeddings = {e.name: e for e in embeddings}  # textual inversion: the request's, by name

    @property
    def device(self) -> torch.device:
        te = self.c.text_encoder if self.c.text_encoder is not None else self.c.text_encoder_2
        return te.device

    @torch.no_grad()
    def encode(self, text: str, *, negative: bool = False) -> TextCond:
        """Encode one prompt (already resolved for the current step of its schedule)."""
        c = self.c
        if c.family == "sdxl" and negative and text == "":
            # SDXL's "force_zeros_for_empty_prompt": an empty negative prompt is all zeros.
            dim = c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
            pooled_dim = c.text_encoder_2.config.projection_dim
            dtype = c.text_encoder_2.dtype
            return TextCond(torch.zeros(1, 77, dim, device=self.device, dtype=dtype), torch.zeros(1, pooled_dim, device=self.device, dtype=dtype))
        if c.family == "sdxl-refiner":
            # the refiner has OpenCLIP bigG only (diffusers' XL img2img pipeline with text_encoder=None)
            parts, pooled = [], None
            for ch in tokenize_prompt(c.tokenizer_2, text, self._embs()):
                h2, out2 = self._run(c.text_encoder_2, ch, "clip_g", final_norm=False)
                if pooled is None:
                    pooled = out2.text_embeds
                parts.append(apply_emphasis(h2, torch.tensor(ch.weights)))
            return TextCond(torch.cat(parts, dim=1), pooled)
        chunks = tokenize_prompt(c.tokenizer, text, self._embs())
        if c.family != "sdxl":
            return TextCond(torch.cat([self._encode_chunk(ch) for ch in chunks], dim=1))
        chunks_2 = tokenize_prompt(c.tokenizer_2, text, self._embs())
        parts, pooled = [], None
        for ch1, ch2 in zip(chunks, chunks_2, strict=True):
            h1, _ = self._run(c.text_encoder, ch1, "clip_l", final_norm=False)
            h2, out2 = self._run(c.text_encoder_2, ch2, "clip_g", final_norm=False)
            if pooled is None:
                pooled = out2.text_embeds  # (1, 1280)
            z = torch.cat([h1, h2], dim=-1)  # (1, 77, 768 + 1280)
            parts.append(apply_emphasis(z, torch.tensor(ch1.weights)))
        return TextCond(torch.cat(parts, dim=1), pooled)

    def _ids(self, chunk: TokenChunk) -> torch.Tensor:
        return torch.tensor([chunk.ids], device=self.device)

    def _embs(self):
        return tuple(self.embeddings.values())

    def _run(self, encoder, chunk: TokenChunk, key: str, *, final_norm: bool):
        """``_hidden`` of one chunk, with its embeddings' vectors (``key``: which encoder's)
        in place of the placeholder ids."""
        if not chunk.fixes:
            return _hidden(encoder, self._ids(chunk), self.clip_skip, final_norm=final_norm)
        fixes = [(pos, self.embeddings[name].vectors[key]) for pos, name in chunk.fixes]
        with inject_vectors(encoder, fixes):
            return _hidden(encoder, self._ids(chunk), self.clip_skip, final_norm=final_norm)

    def _encode_chunk(self, chunk: TokenChunk) -> torch.Tensor:
        z, _ = self._run(self.c.text_encoder, chunk, "emb_params", final_norm=True)
        return apply_emphasis(z, torch.tensor(chunk.weights))  # (1, 77, D)

    def empty_chunk(self, *, negative: bool = False) -> TextCond:
        return self.encode("", negative=negative)


def pad_to_chunks(cond: TextCond, n_chunks: int, empty: TextCond) -> TextCond:
    """Extend ``cond`` to ``n_chunks`` by repeating the empty prompt's chunk (as A1111 pads uncond)."""
    missing = n_chunks - cond.n_chunks
    if missing <= 0:
        return cond
    return TextCond(torch.cat([cond.hidden, empty.hidden.repeat(1, missing, 1)], dim=1), cond.pooled)
