"""What trains in a LoRA run, and the files it writes.

* peft LoRA adapters (Hu et al. 2021) on the UNet's attention projections (and optionally the
  text encoders'), with a rank check against the targeted layers;
* pivotal tuning: the input-embedding rows of chosen words train beside them;
* the result written in kohya format (names from ``danqing.customise.kohya``: what A1111 and
  ComfyUI load; the SDXL UNet under its original LDM names, as sd-scripts writes it) and in
  diffusers format (peft's config in the header).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from danqing.files import atomic_save
from danqing.customise import kohya
from danqing.customise.embeddings import encoder_keys
from danqing.errors import InvalidRequest
from danqing.training.loop import Trainable


def add_lora(comps, net_cfg, lr: float) -> Trainable:
    """peft LoRA adapters (Hu et al. 2021) on the UNet (and text encoder(s)); only they train."""
    from peft import LoraConfig

    for m in comps.modules().values():
        m.requires_grad_(False)
    if not (net_cfg.train_unet or net_cfg.train_text_encoder or net_cfg.train_words or net_cfg.word_init):
        raise InvalidRequest("network.train_unet", "nothing trains: set train_unet, train_text_encoder, train_words "
                             "or word_init")
    groups, mods = [], []
    if net_cfg.train_unet:
        comps.unet.add_adapter(LoraConfig(r=net_cfg.rank, lora_alpha=net_cfg.alpha, init_lora_weights="gaussian",
                                          target_modules=list(net_cfg.unet_targets)))
        groups.append({"params": [p for p in comps.unet.parameters() if p.requires_grad], "lr": lr})
        mods.append(comps.unet)
    if net_cfg.train_text_encoder:
        for te in (comps.text_encoder, comps.text_encoder_2):
            if te is None:
                continue
            te.add_adapter(LoraConfig(r=net_cfg.rank, lora_alpha=net_cfg.alpha, init_lora_weights="gaussian",
                                      target_modules=list(net_cfg.text_encoder_targets)))
            groups.append({"params": [p for p in te.parameters() if p.requires_grad],
                           "lr": net_cfg.text_encoder_lr or lr})
            mods.append(te)
    for g in groups:
        if not g["params"]:
            raise InvalidRequest("network.unet_targets", "no module of the model matches the targets "
                                 f"{list(net_cfg.unet_targets)}")
    return Trainable(groups, mods)


def row_restorer(tables: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """For (embedding table, its original copy, row ids that train): a function that puts back
    every other row after an optimiser step (AdamW's decay and momentum touch the whole table)."""
    def restore() -> None:
        with torch.no_grad():
            for emb, orig, keep in tables:
                mask = torch.ones(emb.shape[0], dtype=torch.bool)
                mask[keep] = False
                emb[mask] = orig[mask].to(emb.dtype)

    return restore


def add_word_embeddings(comps, words: tuple[str, ...], lr: float):
    """Pivotal tuning: the input-embedding rows of ``words`` in every text encoder train (the
    rest of each table is put back after every step, as textual inversion does).

    Returns (parameter groups, a restore-the-other-rows function, a function that returns the
    words' current vectors ``{word: {"emb_params" | "clip_l" | "clip_g": (n, dim)}}``).
    """
    keys = encoder_keys(comps.family)
    tables = []
    for key, tok, te in zip(keys, (comps.tokenizer, comps.tokenizer_2), (comps.text_encoder, comps.text_encoder_2)):
        if key is None or tok is None or te is None:
            continue
        ids = {}
        for word in words:
            ids[word] = tok(word, add_special_tokens=False).input_ids
            if not ids[word]:
                raise InvalidRequest("network.train_words", f"{word!r} has no tokens")
        tables.append(_word_table(key, te.get_input_embeddings().weight, ids))
    return _trained_words(tables, list(words), lr, "network.train_words")


def _word_table(key: str, emb: torch.Tensor, ids: dict[str, list[int]]) -> tuple:
    """(encoder key, its embedding table, a copy to restore from, the rows that train, {word: row ids})."""
    emb.requires_grad_(True)
    keep = torch.tensor(sorted({i for v in ids.values() for i in v}))
    return key, emb, emb.detach().clone(), keep, ids


def _trained_words(tables: list[tuple], words: list[str], lr: float, field: str):
    """(parameter groups, restore-the-other-rows function, current-vectors function) of ``_word_table``s."""
    if not tables:
        raise InvalidRequest(field, "the model has no text encoder to train words in")
    groups = [{"params": [emb], "lr": lr, "weight_decay": 0.0} for _, emb, _, _, _ in tables]
    restore = row_restorer([(emb, orig, keep) for _, emb, orig, keep, _ in tables])

    def vectors() -> dict[str, dict[str, torch.Tensor]]:
        return {w: {key: emb.detach()[ids[w]].float().cpu().clone() for key, emb, _, _, ids in tables} for w in words}

    return groups, restore, vectors


def placeholder(word: str, i: int) -> str:
    """The i-th new token of a word learnt as new vectors (textual inversion, ``word_init``)."""
    return f"<{word}-{i}>"


def new_word_texts(tokenizer, word_init: dict[str, str]) -> dict[str, str]:
    """{word: the text that stands for it in captions while it trains}: as many new tokens as
    its initialiser text has tokens (at most 75, one CLIP chunk)."""
    out = {}
    for word, text in word_init.items():
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        if not 1 <= n <= 75:
            raise InvalidRequest("network.word_init", f"{word!r}: its initialiser {text!r} has {n} tokens; 1-75 allowed")
        out[word] = " ".join(placeholder(word, i) for i in range(n))
    return out


def add_new_words(comps, word_init: dict[str, str], lr: float):
    """Pivotal tuning of new words (Cross Initialization's idea: start from words that describe
    the concept): each word of ``word_init`` becomes new tokens in (copies of) the tokenizer(s),
    their input-embedding rows initialised from its text's rows, one vector per token, trained at
    ``lr`` (the rest of each table is put back after every step). Call after ``add_lora``.

    Returns (parameter groups, a restore-the-other-rows function, a function that returns the
    words' current vectors ``{word: {"emb_params" | "clip_l" | "clip_g": (n, dim)}}``), as
    ``add_word_embeddings`` does.
    """
    import copy

    tables = []
    for key, tok_name, te_name in zip(encoder_keys(comps.family), ("tokenizer", "tokenizer_2"),
                                      ("text_encoder", "text_encoder_2")):
        tok, te = getattr(comps, tok_name), getattr(comps, te_name)
        if key is None or tok is None or te is None:
            continue
        texts = new_word_texts(tok, word_init)
        init = {w: tok(text, add_special_tokens=False).input_ids for w, text in word_init.items()}
        tok = copy.deepcopy(tok)
        tok.add_tokens([t for text in texts.values() for t in text.split(" ")])
        setattr(comps, tok_name, tok)
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = te.get_input_embeddings().weight
        ids = {w: tok.convert_tokens_to_ids(text.split(" ")) for w, text in texts.items()}
        with torch.no_grad():
            for w in word_init:
                emb[ids[w]] = emb[init[w]]
        tables.append(_word_table(key, emb, ids))
    return _trained_words(tables, list(word_init), lr, "network.word_init")


def check_rank(comps, rank: int, targets: tuple[str, ...]) -> None:
    """A LoRA rank larger than the smallest targeted layer is refused (it adds nothing)."""
    smallest = None
    for name, m in comps.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(name.endswith(t) for t in targets):
            w = m.weight
            dim = min(w.shape[0], w[0].numel())
            smallest = dim if smallest is None else min(smallest, dim)
    if smallest is not None and rank > smallest:
        raise InvalidRequest("network.rank", f"rank {rank} is larger than the smallest targeted layer ({smallest}); "
                             f"use a rank of at most {smallest}")


# ---------------------------------------------------------------------------------------------
# Saving LoRA files
# ---------------------------------------------------------------------------------------------
def lora_state_dicts(comps) -> dict[str, dict[str, torch.Tensor]]:
    """{component: peft LoRA state dict} of the adapters ``add_lora`` put on ``comps``."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(comps, comp, None)
        if m is not None and getattr(m, "peft_config", None):
            # the adapters alone: a table grown by new words (add_new_words) is bundled, not saved here
            sd = get_peft_model_state_dict(m, save_embedding_layers=False)
            out[comp] = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    return out


def kohya_state_dict(sds: dict[str, dict[str, torch.Tensor]], alpha: float, family: str,
                     unet_config: dict | None = None) -> dict[str, torch.Tensor]:
    """peft LoRA state dicts -> kohya keys (``kohya.module_key``: ``lora_unet_`` with the LDM
    module names for SDXL, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``) + ``.lora_down.weight``
    (peft's A), ``.lora_up.weight`` (B) and ``.alpha``; ``unet_config`` names the SDXL UNet's blocks."""
    out: dict[str, torch.Tensor] = {}
    for comp, sd in sds.items():
        for key, value in sd.items():
            mod, _, part = key.rpartition(".lora_")
            name = kohya.module_key(comp, mod, family, unet_config)
            suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
            out[f"{name}.{suffix}"] = value
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lora(comps, net_cfg, out_dir: Path, name: str, formats, metadata: dict[str, str],
              bundled: dict[str, dict[str, torch.Tensor]] | None = None) -> list[Path]:
    """Write the trained LoRA as ``<name>.safetensors`` (kohya) and/or ``<name>-diffusers/``
    (``pytorch_lora_weights.safetensors`` with peft's config in its header), atomically.
    ``bundled``: trained word embeddings, written into the kohya file as A1111's
    ``bundle_emb.<word>.string_to_param.*`` (one text encoder) or ``bundle_emb.<word>.clip_l`` /
    ``.clip_g`` (SDXL)."""
    from safetensors.torch import save_file

    sds = lora_state_dicts(comps)
    paths = []
    if "kohya" in formats:
        sd = kohya_state_dict(sds, net_cfg.alpha, comps.family, dict(comps.unet.config))
        for word, vecs in (bundled or {}).items():
            for key, v in vecs.items():
                sd[kohya.bundle_key(word, key)] = v.contiguous()
        paths.append(atomic_save(out_dir / f"{name}.safetensors", lambda p: save_file(sd, str(p), metadata=metadata),
                                 overwrite=True))
    if "diffusers" in formats:
        flat = {f"{comp}.{k}": v for comp, sd in sds.items() for k, v in sd.items()}
        header = {comp + "." + k: v for comp in sds
                  for k, v in getattr(comps, comp).peft_config["default"].to_dict().items()}
        meta = dict(metadata, lora_adapter_metadata=json.dumps(header, default=list, sort_keys=True), format="pt")
        folder = out_dir / f"{name}-diffusers"
        paths.append(atomic_save(folder / "pytorch_lora_weights.safetensors",
                                 lambda p: save_file(flat, str(p), metadata=meta), overwrite=True))
    return paths

