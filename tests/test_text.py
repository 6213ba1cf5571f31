"""Text conditioning: A1111 chunking, emphasis, clip skip."""

from __future__ import annotations

import torch

from danqing.conditioning.text import CHUNK, TextEncoder, apply_emphasis, chunk_tokens, tokenize_prompt
from danqing.models.tokenizer import clip_tokenizer

BOS, EOS, COMMA = 49406, 49407, 267


def test_bundled_tokenizer_matches_known_clip_ids():
    tok = clip_tokenizer()
    # Ids as OpenAI's CLIP assigns them (vocab derived from the BPE merges file).
    assert tok("a photo of a cat")["input_ids"] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert len(tok) == 49408
    assert clip_tokenizer("!").pad_token_id == 0


def test_200_token_prompt_is_three_chunks():
    tok = clip_tokenizer()
    prompt = " ".join(["cat"] * 200)  # "cat" is one token
    chunks = tokenize_prompt(tok, prompt)
    assert len(chunks) == 3
    assert all(len(c.ids) == 77 for c in chunks)
    assert [c.ids.count(2368) for c in chunks] == [75, 75, 50]
    assert chunks[2].ids[51] == EOS and chunks[2].ids[52:] == (EOS,) * 25


def test_chunk_break_moves_back_to_last_comma():
    # 70 tokens, a comma, then 10 more: the chunk would overflow at 75; the comma is 5 back
    # (<= 20), so the chunk ends right after the comma and the rest moves to chunk 2.
    pieces = [([1] * 70 + [COMMA] + [2] * 10, 1.0)]
    chunks = chunk_tokens(pieces, bos=BOS, eos=EOS, pad=EOS, comma=COMMA)
    assert len(chunks) == 2
    assert chunks[0].ids[1:72] == tuple([1] * 70 + [COMMA])
    assert chunks[0].ids[72] == EOS
    assert chunks[1].ids[1:11] == tuple([2] * 10)


def test_break_starts_new_chunk_and_pads_after_eos():
    chunks = chunk_tokens([([5, 6], 1.0), ([], -1), ([7], 1.3)], bos=BOS, eos=EOS, pad=0, comma=COMMA)
    assert len(chunks) == 2
    assert chunks[0].ids[:4] == (BOS, 5, 6, EOS) and set(chunks[0].ids[4:]) == {0}
    assert chunks[1].ids[:3] == (BOS, 7, EOS)
    assert chunks[1].weights[1] == 1.3 and chunks[1].weights[0] == 1.0


def test_weights_follow_parsed_emphasis():
    tok = clip_tokenizer()
    (chunk,) = tokenize_prompt(tok, "a (cat:1.5) [dog]")
    cat = chunk.ids.index(2368)
    dog = chunk.ids.index(1929)
    assert chunk.weights[cat] == 1.5
    assert abs(chunk.weights[dog] - 1 / 1.1) < 1e-12
    assert chunk.weights[1] == 1.0


def test_emphasis_restores_mean():
    z = torch.randn(1, 77, 8) + 0.3
    w = torch.ones(77)
    w[5] = 1.4
    out = apply_emphasis(z, w)
    # absolute: a mean near 0 has no scale of its own; z's values are O(1), float32 error ~1e-7
    assert torch.allclose(out.mean(), z.mean(), atol=1e-6)
    assert not torch.allclose(out, z)
    assert torch.equal(apply_emphasis(z, torch.ones(77)), z)


def test_encoding_shapes_and_clip_skip(tiny_components):
    sd1 = tiny_components["tiny-sd1"]
    enc = TextEncoder(sd1)
    long = enc.encode(" ".join(["cat"] * 100))
    assert long.hidden.shape == (1, 154, sd1.text_encoder.config.hidden_size)
    a = enc.encode("a cat").hidden
    b = TextEncoder(sd1, clip_skip=2).encode("a cat").hidden
    assert a.shape == b.shape and not torch.allclose(a, b)
    xl = tiny_components["tiny-sdxl"]
    cond = TextEncoder(xl).encode("a cat")
    d = xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    assert cond.hidden.shape == (1, 77, d)
    assert cond.pooled.shape == (1, xl.text_encoder_2.config.projection_dim)
    neg = TextEncoder(xl).encode("", negative=True)
    assert torch.count_nonzero(neg.hidden) == 0 and torch.count_nonzero(neg.pooled) == 0


def test_chunk_constant():
    assert CHUNK == 75


def test_emphasis_of_zero_mean_states_is_not_nan():
    import torch

    from danqing.conditioning.text import apply_emphasis

    z = torch.nn.functional.layer_norm(torch.randn(1, 77, 8), (8,))  # every token's mean ~0
    z = z - z.mean()                                                  # the whole mean exactly 0
    assert torch.equal(apply_emphasis(z, torch.ones(77)), z)
    w = torch.ones(77)
    w[3] = 1.5
    out = apply_emphasis(z, w)
    assert not torch.isnan(out).any()
