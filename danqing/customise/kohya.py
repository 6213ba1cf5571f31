"""kohya / A1111 LoRA key names: the one place where module paths become file keys and back.

A kohya LoRA file names each patched layer ``<prefix><module path with . -> _>`` followed by
``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (LyCORIS adds its own suffixes):

* ``lora_unet_``: the UNet. sd-scripts trains SD1/SD2 on a UNet with diffusers' module names
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``) and SDXL on the
  original Stability (LDM) UNet (``sdxl_original_unet``:
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); A1111 and diffusers'
  ``_convert_non_diffusers_lora_to_diffusers`` read both.
* ``lora_te_`` (SD1/SD2) or ``lora_te1_`` / ``lora_te2_`` (SDXL's two encoders): CLIP modules
  named from CLIPTextModel's ``text_model`` level (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).
* ``bundle_emb.<word>.string_to_param.*`` (one text encoder) or ``.clip_l`` / ``.clip_g``
  (SDXL): textual-inversion vectors bundled in the file (A1111, pivotal tuning).

Writers (``training`` for trained LoRAs, ``customise.merge`` for extracted ones) call
``module_key``; the reader (``customise.lora``) matches files through ``name_table``, built from
the same functions, so every name a writer makes is one the reader finds.
"""

from __future__ import annotations

import torch

from danqing.errors import CorruptModel
from danqing.models.components import TRANSFORMER_FAMILIES
from danqing.models.flow_files import RULES
from danqing.models.single_file import map_key, unet_prefix_map

UNET_PREFIX = "lora_unet_"
# suffixes of one kohya/LyCORIS module, longest first so that "lora_down.weight" wins over "weight"
SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "on_input", "w_norm", "b_norm",
)
BUNDLE_PREFIX = "bundle_emb."
# The kohya prefixes of each text encoder (component -> prefixes), per family: sd-scripts names
# SD3's CLIP-L, bigG and T5 lora_te1_ / lora_te2_ / lora_te3_, FLUX's CLIP-L lora_te1_ and its
# T5 lora_te3_; SD1/SD2 files say lora_te_ (also read on FLUX's single CLIP).
TEXT_PREFIXES = {
    "sd3": {"text_encoder": ("lora_te1_",), "text_encoder_2": ("lora_te2_",), "text_encoder_3": ("lora_te3_",)},
    "flux": {"text_encoder": ("lora_te1_", "lora_te_"), "text_encoder_2": ("lora_te3_",)},
}


def text_prefix(component: str, family: str) -> str:
    """The prefix of a text encoder's modules: ``lora_te_`` (SD1/SD2), ``lora_te1_`` /
    ``lora_te2_`` (SDXL's CLIP-L and OpenCLIP-G)."""
    if component == "text_encoder_2":
        return "lora_te2_"
    return "lora_te1_" if family in ("sdxl", "sdxl-refiner") else "lora_te_"


def ldm_path(path: str, unet_config: dict) -> str:
    """A diffusers UNet module path -> the original (LDM) one:
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` (layout from the UNet's config).

    Raises:
        KeyError: the module has no LDM name (an architecture SD1/SD2/SDXL do not have).
    """
    return map_key(path + ".weight", unet_prefix_map(unet_config)).removesuffix(".weight")


def unet_key(path: str, family: str, unet_config: dict) -> str:
    """``lora_unet_<module path with _>`` as sd-scripts writes it: diffusers module names for
    SD1/SD2, the LDM names for SDXL (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``)."""
    if family == "sdxl":
        path = ldm_path(path, unet_config)
    return UNET_PREFIX + path.replace(".", "_")


def text_key(path: str, prefix: str) -> str:
    """``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (``prefix`` from ``text_prefix``);
    transformers 5's CLIPTextModel has no ``text_model.`` level, kohya's names do."""
    if not path.startswith("text_model."):
        path = "text_model." + path
    return prefix + path.replace(".", "_")


def module_key(component: str, path: str, family: str, unet_config: dict | None = None) -> str:
    """The kohya name of module ``path`` of ``component`` ("unet", "text_encoder",
    "text_encoder_2") of a model of ``family``; ``unet_config`` is needed for the UNet."""
    if component == "unet":
        return unet_key(path, family, unet_config or {})
    return text_key(path, text_prefix(component, family))


def bundle_key(word: str, encoder_key: str) -> str:
    """The key of a bundled embedding: ``bundle_emb.<word>.string_to_param.*`` for one text
    encoder's vectors (``emb_params``), ``bundle_emb.<word>.clip_l`` / ``.clip_g`` for SDXL's."""
    return f"{BUNDLE_PREFIX}{word}.{'string_to_param.*' if encoder_key == 'emb_params' else encoder_key}"


def parse_bundled(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Textual-inversion vectors bundled in a LoRA file (A1111's ``bundle_emb.<name>.<key>``,
    from pivotal-tuning trainers) -> {name: {"emb_params" | "clip_l" | "clip_g": (n, dim)}}.
    ``string_to_param.*`` and ``emb_params`` are the one-encoder vectors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        name, _, rest = key[len(BUNDLE_PREFIX):].partition(".")
        kind = "emb_params" if rest.startswith(("string_to_param", "emb_params")) else rest
        if not name or kind not in ("emb_params", "clip_l", "clip_g"):
            raise CorruptModel(f"bundled embedding key {key!r}: expected bundle_emb.<name>.string_to_param.*, "
                               ".emb_params, .clip_l or .clip_g")
        v = value.float()
        out.setdefault(name, {})[kind] = v[None] if v.ndim == 1 else v
    return out


def _patchable(module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d))


def _text_prefixes(comps) -> dict[str, tuple[str, ...]]:
    if comps.family in TEXT_PREFIXES:
        return TEXT_PREFIXES[comps.family]
    if comps.text_encoder_2 is not None:
        return {"text_encoder": ("lora_te1_",), "text_encoder_2": ("lora_te2_",)}
    return {"text_encoder": ("lora_te_", "lora_te1_")}


def name_table(comps) -> dict[str, tuple[str, str]]:
    """Every name a file may use for a patchable module -> (component, diffusers module name).

    UNet modules are reachable by kohya diffusers-style names, kohya LDM-style names
    (``input_blocks_4_1_...``, what ``unet_key`` writes for SDXL) and peft/diffusers dotted
    names; an SD3 / FLUX transformer (in the "unet" slot) also by diffusers' ``transformer.``
    names (its original names, fused q/k/v included, are ``fused_table``'s); text-encoder
    modules by ``lora_te_``/``lora_te1_``/``lora_te2_``/``lora_te3_`` names and dotted names.
    """
    table: dict[str, tuple[str, str]] = {}
    flow = comps.family in TRANSFORMER_FAMILIES
    pairs = None if flow else unet_prefix_map(dict(comps.unet.config))
    for name, mod in comps.unet.named_modules():
        if not _patchable(mod):
            continue
        target = ("unet", name)
        table[UNET_PREFIX + name.replace(".", "_")] = target
        table["unet." + name] = target
        table["base_model.model." + name] = target
        table[name] = target  # old diffusers attn-processor files name UNet modules bare
        if flow:
            table["transformer." + name] = target  # diffusers' SD3 / FLUX LoRA files
            continue
        try:
            ldm = map_key(name + ".weight", pairs)[: -len(".weight")]
            table[UNET_PREFIX + ldm.replace(".", "_")] = target
        except KeyError:
            pass
    for comp, prefixes in _text_prefixes(comps).items():
        model = getattr(comps, comp)
        if model is None:
            continue
        clip = "CLIP" in type(model).__name__
        for name, mod in model.named_modules():
            if not _patchable(mod):
                continue
            for p in prefixes:
                table[p + name.replace(".", "_")] = (comp, name)
                if clip and not name.startswith("text_model."):
                    # kohya names CLIP modules from CLIPTextModel's text_model level
                    # (lora_te_text_model_encoder_layers_0_...); transformers 5 flattened it away
                    table[text_key(name, p)] = (comp, name)
            table[f"{comp}.{name}"] = (comp, name)
            if clip and not name.startswith("text_model."):  # files written before transformers 5
                table[f"{comp}.text_model.{name}"] = (comp, name)
    return table


def fused_table(comps) -> dict[str, tuple[str, tuple[str, ...]]]:
    """SD3 / FLUX transformers: kohya names in the original layout (sd-scripts' FLUX and SD3
    LoRAs: ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``,
    ``lora_unet_joint_blocks_0_x_block_attn_qkv``) -> (how, diffusers module names), from the
    single-file name table (``models.flow_files``): "same" (renamed), "fused" (one original
    Linear = the diffusers ones stacked along the output rows), "swap" (output halves swapped).
    Empty for the UNet families."""
    if comps.family not in TRANSFORMER_FAMILIES:
        return {}
    out = {}
    for orig, diff, how, full in RULES[comps.family](dict(comps.unet.config)):
        if not full:
            out[UNET_PREFIX + orig.replace(".", "_")] = (how, diff)
            out[orig] = (how, diff)
    return out


def split_fused(algo: str, tensors: dict[str, torch.Tensor], how: str, names: tuple[str, ...],
                comps) -> dict[tuple[str, str], dict[str, torch.Tensor]] | None:
    """The factors of a LoRA (or full-diff) module on an original-layout Linear of an SD3 / FLUX
    transformer (``fused_table``) -> {("unet", diffusers module): its factors}. "fused": the
    output rows of dW = up @ down are the diffusers modules' stacked, so up (or diff) is split
    along its rows and each part keeps down and alpha (the same delta, rows apart); "swap": the
    two row halves swapped (the AdaLN shift/scale order). None when the rows do not add up or
    the algorithm cannot be split (LoHa, LoKr, a Tucker core)."""
    sizes = [comps.unet.get_submodule(n).weight.shape[0] for n in names]
    key = {"lora": "lora_up.weight", "full": "diff"}.get(algo)
    if key is None or "lora_mid.weight" in tensors or tensors[key].shape[0] != sum(sizes):
        return None
    rows, bias = tensors[key], tensors.get("diff_b")
    if how == "swap":
        rows, bias = _swap_halves(rows), None if bias is None else _swap_halves(bias)
    out = {}
    for i, (n, part) in enumerate(zip(names, torch.split(rows, sizes, dim=0))):
        out[("unet", n)] = {**tensors, key: part}
        if bias is not None:  # a full diff's bias delta: split likewise
            out[("unet", n)]["diff_b"] = torch.split(bias, sizes)[i]
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)
