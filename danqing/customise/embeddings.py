"""Textual-inversion embeddings (Gal et al. 2022): files, loading, and use in prompts.

An embedding is ``n`` learned token vectors per text encoder. As in AUTOMATIC1111, it is used
by writing its name (the file stem) in a prompt: the tokens of the name are replaced by its
``n`` vectors, inside the usual 75-token chunking and emphasis (``conditioning/text.py``).

File formats read (``load_embedding``), all without unpickling arbitrary objects:

- A1111 ``.pt``: ``{"string_to_token": {"*": 265}, "string_to_param": {"*": (n, dim)}, "name",
  "step", "sd_checkpoint", "sd_checkpoint_name"}`` (A1111 ``textual_inversion.py``
  ``Embedding.save``), read with ``torch.load(weights_only=True)``;
- A1111 ``.safetensors``: ``{"emb_params": (n, dim)}``, metadata in the header;
- SDXL (A1111 / kohya): ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` in ``.safetensors``;
- diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{"<token>": (dim,) or (n, dim)}``.

``Embedding.vectors`` uses the A1111 keys: ``{"emb_params": ...}`` for one text encoder (SD1,
SD2), ``{"clip_l": ..., "clip_g": ...}`` for SDXL. ``save_embedding_a1111`` writes them back in
the A1111 format (what the trainer uses).

At use, ``Studio.generate`` finds a request's embeddings (``EmbeddingLibrary.for_prompts``) and
passes them on in its ``ConditioningContext`` (``conditioning/schedule.py``) to the
``TextEncoder``, which replaces the token embeddings at the embedding's positions through a
forward hook on ``token_embedding`` that is removed right after each encoder call. Nothing
stays on the shared tokenizer or text encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from danqing.cache import LRUCache, file_key
from danqing.errors import IncompatibleModel, InvalidRequest, ModelError
from danqing.files import atomic_save, exists_message
from danqing.conditioning.prompt_parser import parse_attention
from danqing.models.tokenizer import clip_tokenizer

SUFFIXES = (".safetensors", ".pt", ".bin")
FORMATS = ("A1111 .pt (string_to_param), .safetensors (emb_params, or clip_l + clip_g for SDXL), "
           "diffusers learned_embeds .safetensors/.bin ({token: vector})")
SINGLE = "emb_params"  # one text encoder (SD1: 768, SD2: 1024)
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL: CLIP ViT-L (768) and OpenCLIP bigG (1280)
PLACEHOLDER_ID = 0  # the id written at an embedding's positions before its vectors replace them (A1111)


class EmbeddingError(ModelError, ValueError):
    """An embedding file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding.

    Attributes:
        name: the word that calls it in a prompt (A1111: the file stem).
        vectors: ``{"emb_params": (n, dim)}`` or ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``,
            float32 on the CPU.
        hash: sha256 (hex) of the file; A1111 writes the first 12 characters ("TI hashes").
        path: the file, when it came from one.
        meta: step, sd_checkpoint, sd_checkpoint_name, ... as stored in the file (strings).
    """

    name: str
    vectors: dict[str, torch.Tensor]
    hash: str = ""
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def short_hash(self) -> str:
        """A1111's ``Embedding.shorthash``: the first 12 hex characters of the file's sha256."""
        return self.hash[:12]

    @property
    def dims(self) -> dict[str, int]:
        return {k: int(v.shape[-1]) for k, v in self.vectors.items()}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def embedding_name(path: Path) -> str:
    """The prompt word of an embedding file: its stem (A1111), or for diffusers' generic
    ``learned_embeds.*`` the name of the folder holding it (``cat-toy/learned_embeds.bin`` ->
    ``cat-toy``)."""
    path = Path(path)
    return path.parent.name if path.stem == "learned_embeds" and path.parent.name else path.stem


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _read(path: Path) -> tuple[dict, dict]:
    """(tensors/objects, string metadata) of a file, without arbitrary unpickling."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise EmbeddingError(f"{path.name}: unsupported embedding file type {suffix or '(none)'!r}; allowed: {FORMATS}")
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:  # safetensors has its own error types
            raise EmbeddingError(f"{path.name}: not a readable safetensors file ({str(exc).splitlines()[0][:200]}); "
                                 f"allowed: {FORMATS}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):  # pickled objects beyond tensors and plain types
            raise EmbeddingError(f"{path.name}: cannot be read as a weights-only torch file: it holds pickled Python "
                                 "objects (e.g. an old A1111 ParameterDict), which danqing never unpickles; re-save "
                                 f"it as .safetensors with a tool you trust; allowed: {FORMATS}") from None
        raise EmbeddingError(f"{path.name}: cannot be read as a weights-only torch file "
                             f"({str(exc).splitlines()[0][:200]}); allowed: {FORMATS}") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name}: holds a {type(data).__name__}, not a dict of tensors; allowed: {FORMATS}")
    meta = {k: str(v) for k, v in data.items() if isinstance(v, (str, int, float)) and k != "string_to_token"}
    return data, meta


def _as_matrix(value, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise EmbeddingError(f"{where}: expected a (n, dim) tensor of vectors, got {shape}; allowed: {FORMATS}")
    if not value.is_floating_point():
        raise EmbeddingError(f"{where}: the vectors are {value.dtype}, not floating point")
    return value.detach().reshape(-1, value.shape[-1]).to(torch.float32).contiguous()


def parse_embedding_dict(data: Mapping, where: str) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file's contents, keyed as ``Embedding.vectors``.

    Accepts A1111's ``string_to_param`` (one term), ``emb_params``, SDXL ``clip_l`` + ``clip_g``
    and diffusers' one-entry ``{token: vector}`` dict (A1111 ``textual_inversion.py`` ``create_embedding_from_data``).
    """
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingError(f"{where}: string_to_param must hold exactly one term, got "
                                 f"{len(params) if isinstance(params, Mapping) else type(params).__name__}")
        return {SINGLE: _as_matrix(next(iter(params.values())), where)}
    if SINGLE in data:
        return {SINGLE: _as_matrix(data[SINGLE], where)}
    if any(k in data for k in SDXL_KEYS):
        missing = [k for k in SDXL_KEYS if k not in data]
        if missing:
            raise EmbeddingError(f"{where}: an SDXL embedding needs both clip_l and clip_g; {missing[0]} is missing")
        out = {k: _as_matrix(data[k], f"{where} [{k}]") for k in SDXL_KEYS}
        if out["clip_l"].shape[0] != out["clip_g"].shape[0]:
            raise EmbeddingError(f"{where}: clip_l has {out['clip_l'].shape[0]} vectors but clip_g "
                                 f"{out['clip_g'].shape[0]}; they must have as many")
        return out
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(data) == 1:  # diffusers: {"<token>": (dim,)}
        return {SINGLE: _as_matrix(next(iter(tensors.values())), where)}
    keys = ", ".join(list(map(str, data))[:6]) or "nothing"
    raise EmbeddingError(f"{where}: not an embedding (found {keys}); allowed: {FORMATS}")


def load_embedding(path: str | os.PathLike) -> Embedding:
    """Read an embedding file (any format in the module docstring) to CPU float32.

    Args:
        path: the file; its stem is the embedding's name.

    Raises:
        EmbeddingError: unreadable, unsupported, or not an embedding (the message lists the
            allowed formats).
    """
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such embedding file")
    data, meta = _read(path)
    vectors = parse_embedding_dict(data, path.name)
    return Embedding(embedding_name(path), vectors, _file_sha256(path), path, meta)


def save_embedding_a1111(path: str | os.PathLike, name: str, vectors: Mapping[str, torch.Tensor],
                         meta: Mapping[str, object] | None = None, *, overwrite: bool = False) -> Path:
    """Write an embedding in AUTOMATIC1111's format, atomically (temp file + rename).

    ``.safetensors``: ``{"emb_params": (n, dim)}`` or ``{"clip_l", "clip_g"}``, with ``name`` and
    ``meta`` as string metadata; ``.pt``: A1111's ``Embedding.save`` dict (``string_to_token``,
    ``string_to_param``, ``name``, ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``; SDXL
    vectors as ``clip_l``/``clip_g`` entries).

    Args:
        path: target file, ``.safetensors`` or ``.pt``.
        name: the embedding's name (A1111 calls it by the file stem; keep them equal).
        vectors: ``{"emb_params": (n, dim)}`` or ``{"clip_l": ..., "clip_g": ...}``; a lone
            tensor under any other single key counts as ``emb_params``.
        meta: e.g. ``{"step": 500, "sd_checkpoint": "6ce0161689", "sd_checkpoint_name": "v1-5"}``.
        overwrite: replace an existing file (default: refuse).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt"):
        raise InvalidRequest("path", f"an A1111 embedding is written as .safetensors or .pt, got {suffix or '(none)'!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(exists_message(path))
    vecs = parse_embedding_dict(dict(vectors), name)  # a lone {key: tensor} reads as emb_params
    vecs = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vecs.items()}
    meta = dict(meta or {})

    def write(tmp: Path) -> None:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            header = {"name": name, **{k: str(v) for k, v in meta.items() if v is not None}}
            save_file(vecs, str(tmp), metadata=header)
        else:
            data: dict = {"name": name, "step": meta.get("step"), "sd_checkpoint": meta.get("sd_checkpoint"),
                          "sd_checkpoint_name": meta.get("sd_checkpoint_name")}
            if SINGLE in vecs:
                data.update(string_to_token={"*": 265}, string_to_param={"*": vecs[SINGLE]})
            else:
                data.update(vecs)
            data.update({k: v for k, v in meta.items() if k not in data and isinstance(v, (str, int, float))})
            torch.save(data, tmp)

    return atomic_save(path, write, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Fitting a model
# ---------------------------------------------------------------------------------------------
def encoder_keys(family: str) -> tuple[str | None, str | None]:
    """Which ``Embedding.vectors`` key feeds (text_encoder, text_encoder_2) of a family."""
    if family == "sdxl":
        return "clip_l", "clip_g"
    if family == "sdxl-refiner":
        return None, "clip_g"
    return SINGLE, None


def check_fits(emb: Embedding, comps) -> None:
    """Raise ``IncompatibleModel`` unless ``emb`` has vectors of the right width for every text
    encoder of ``comps`` (names both dimensions, e.g. "768 vs 1024")."""
    where = f"embedding {emb.name!r}" + (f" ({emb.path.name})" if emb.path else "")
    for key, encoder in zip(encoder_keys(comps.family), (comps.text_encoder, comps.text_encoder_2)):
        if key is None or encoder is None:
            continue
        width = encoder.config.hidden_size
        if key not in emb.vectors:
            have = ", ".join(f"{k}: {d}" for k, d in emb.dims.items())
            raise IncompatibleModel(f"{where} is made for another model family ({have}); the {comps.family} model "
                                    f"needs {' + '.join(k for k in encoder_keys(comps.family) if k)} vectors")
        dim = emb.dims[key]
        if dim != width:
            raise IncompatibleModel(f"{where} has {dim}-wide vectors but the {comps.family} model's text encoder "
                                    f"takes {width} ({dim} vs {width}); use an embedding trained for this model family")


def name_ids(tokenizer, name: str) -> list[int]:
    """The token ids that spell ``name`` in a prompt (what A1111 matches)."""
    return tokenizer(name, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def check_name(emb: Embedding, tokenizer) -> None:
    """Refuse a name that is one word of the tokenizer's vocabulary (``cat.pt`` would replace
    every "cat" in every prompt)."""
    ids = name_ids(tokenizer, emb.name)
    if not ids:
        raise EmbeddingError(f"embedding {emb.name!r}: its name has no tokens; rename the file")
    if len(ids) == 1:
        word = tokenizer.convert_ids_to_tokens(ids[0]).removesuffix("</w>")
        where = emb.path.name if emb.path else emb.name
        raise EmbeddingError(f"embedding {emb.name!r} ({where}) has the name of the word {word!r} in the tokenizer's "
                             f"vocabulary, so it would replace that word everywhere; rename the file to a made-up "
                             f"word (e.g. {emb.name}-emb)")


@dataclass(frozen=True)
class EmbeddingUse:
    """An embedding found in a token run: ``n`` positions starting where it stands."""

    name: str
    n: int


def find_embeddings(ids: list[int], lookup: Mapping[int, list[tuple[list[int], Embedding]]]) -> list:
    """Replace every embedding name in ``ids`` by an ``EmbeddingUse`` marker (A1111
    ``EmbeddingDatabase.find_embedding_at_position``: at each position, the longest name whose
    ids start there wins)."""
    out: list = []
    i = 0
    while i < len(ids):
        for name_tokens, emb in lookup.get(ids[i], ()):
            if ids[i:i + len(name_tokens)] == name_tokens:
                out.append(EmbeddingUse(emb.name, emb.n_vectors))
                i += len(name_tokens)
                break
        else:
            out.append(ids[i])
            i += 1
    return out


def build_lookup(tokenizer, embeddings: Iterable[Embedding]) -> dict[int, list[tuple[list[int], Embedding]]]:
    """first token id -> [(name ids, embedding)], longest names first."""
    lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
    for emb in embeddings:
        ids = name_ids(tokenizer, emb.name)
        if ids:
            lookup.setdefault(ids[0], []).append((ids, emb))
    for v in lookup.values():
        v.sort(key=lambda item: len(item[0]), reverse=True)
    return lookup


@contextlib.contextmanager
def inject_vectors(encoder, fixes: list[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """For the calls inside the block, ``encoder``'s token embeddings at 1-based chunk
    positions ``offset + k`` are ``vectors[k]`` (batch of one chunk). A forward hook on the
    input embedding layer, removed on exit: the encoder is unchanged afterwards.

    Args:
        encoder: a transformers CLIP text model.
        fixes: (offset in the 77-token chunk, (n, dim) vectors) per embedding use.
    """
    if not fixes:
        yield
        return
    layer = encoder.get_input_embeddings()

    def hook(_module, _args, output):  # output: (1, 77, dim)
        output = output.clone()
        for offset, vectors in fixes:
            output[:, offset:offset + vectors.shape[0]] = vectors.to(output)
        return output

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class EmbeddingLibrary:
    """The embeddings folder: finds which embeddings a request's prompts use, loads them
    (cached by path, size and mtime; the files are immutable inputs, not request state) and
    checks they fit the model.

    Args:
        registry: the models-folder ``Registry`` (its ``embeddings/`` folder).
    """

    def __init__(self, registry):
        self.registry = registry
        self._cache: LRUCache[Embedding] = LRUCache(256)

    def entries(self) -> dict[str, Path]:
        """name -> file of every embedding file in the folder (first one wins on a clash)."""
        out: dict[str, Path] = {}
        for e in self.registry.scan("embedding"):
            if e.path is not None and e.path.is_file() and e.path.suffix.lower() in SUFFIXES:
                out.setdefault(embedding_name(e.path), e.path)
        return out

    def load(self, path: Path) -> Embedding:
        return self._cache.get_or_load(file_key(path), lambda: load_embedding(path))

    def for_prompts(self, texts: Iterable[str], comps) -> list[Embedding]:
        """The embeddings whose names occur in ``texts`` (token match, as A1111), loaded and
        checked against ``comps`` (vector width, name not a vocabulary word)."""

        files = self.entries()
        if not files:
            return []
        tokenizer = comps.tokenizer if comps.tokenizer is not None else comps.tokenizer_2
        names = {name: name_ids(tokenizer, name) for name in files}
        used: list[Embedding] = []
        pieces = [piece for text in texts for piece, w in parse_attention(text) if (piece, w) != ("BREAK", -1.0)]
        token_runs = [name_ids(tokenizer, p) for p in pieces if p]
        for name, ids in names.items():
            if not ids or not any(_contains(run, ids) for run in token_runs):
                continue
            emb = self.load(files[name])
            check_name(emb, tokenizer)
            check_fits(emb, comps)
            used.append(emb)
        return used

    def listing(self) -> dict[str, dict]:
        """name -> {shape, vectors, step, sd_checkpoint, sd_checkpoint_name, error} of every
        file (A1111's ``/sdapi/v1/embeddings`` fields)."""

        tokenizer = clip_tokenizer()  # every SD family shares CLIP's vocabulary
        out = {}
        for name, path in self.entries().items():
            try:
                emb = self.load(path)
                check_name(emb, tokenizer)
            except EmbeddingError as exc:
                out[name] = {"error": str(exc)}
                continue
            out[name] = {"step": _int_or_none(emb.meta.get("step")), "sd_checkpoint": emb.meta.get("sd_checkpoint"),
                         "sd_checkpoint_name": emb.meta.get("sd_checkpoint_name"),
                         "shape": sum(emb.dims.values()), "vectors": emb.n_vectors}
        return out


def _int_or_none(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _contains(run: list[int], ids: list[int]) -> bool:
    n = len(ids)
    return any(run[i:i + n] == ids for i in range(len(run) - n + 1))


def ti_hashes(embeddings: Iterable[Embedding]) -> str | None:
    """A1111's ``TI hashes`` infotext value: ``"name: shorthash, ..."`` (``:`` and ``,``
    removed from names, as ``sd_hijack_clip.py`` does); None when no embedding was used."""
    parts = [f"{e.name.replace(':', '').replace(',', '')}: {e.short_hash}" for e in embeddings if e.hash]
    return ", ".join(parts) or None


def parse_ti_hashes(value: str) -> dict[str, str]:
    """The inverse of ``ti_hashes``: name -> short hash."""
    out = {}
    for part in value.split(","):
        name, sep, digest = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = digest.strip()
    return out


def ti_hash_changes(before: str | None, after: str | None) -> list[str]:
    """Why a re-created picture may differ: the embeddings whose ``TI hashes`` entry of the
    original infotext (``before``) is missing from or different in the new one (``after``),
    one line each."""
    old, new = parse_ti_hashes(before or ""), parse_ti_hashes(after or "")
    lines = []
    for name, digest in old.items():
        if name not in new:
            lines.append(f"embedding {name!r} was used for the original image but is not in the embeddings folder now")
        elif new[name] != digest:
            lines.append(f"embedding {name!r} has changed since the original image ({digest} then, {new[name]} now); "
                         "the picture will differ")
    return lines
