"""The CLIP BPE tokenizer, built offline from OpenAI's BPE merges file.

The file ``data/clip/bpe_simple_vocab_16e6.txt.gz`` is OpenAI's ``bpe_simple_vocab_16e6.txt.gz``
(MIT licence, as shipped in the ``openai-clip`` source package). The vocabulary is derived from it
exactly as OpenAI's ``SimpleTokenizer`` derives it: the 256 byte symbols, the same with the
end-of-word marker ``</w>``, one token per merge (48 894 merges), then ``<|startoftext|>`` and
``<|endoftext|>`` -- 49 408 tokens, the ids every SD1.x/SD2.x/SDXL text encoder was trained on.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

N_MERGES = 49152 - 256 - 2  # as in OpenAI's SimpleTokenizer
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable unicode mapping, in byte order 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # OpenAI's order: the printable bytes first, then the remapped ones.
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges) derived from the bundled BPE file."""
    raw = resources.files("danqing").joinpath("data/clip/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(m.split(" ")) for m in lines[1 : N_MERGES + 1]]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` built from the bundled files; no network.

    Args:
        pad_token: ``"<|endoftext|>"`` for OpenAI CLIP (SD1.x, SDXL encoder 1), ``"!"`` for
            OpenCLIP (SD2.x, SDXL encoder 2).
        model_max_length: 77 for every SD family.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length)
