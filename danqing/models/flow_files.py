"""SD3 / SD3.5 and FLUX.1 single files in the layouts they are shared in.

Keys (Stability's ``sd3_medium*.safetensors``, BFL's ``flux1-dev.safetensors``, ComfyUI's
all-in-one checkpoints)::

    model.diffusion_model.*            the transformer in its original names (or bare, as BFL's
                                       transformer-only files): SD3 ``joint_blocks.i.{x,context}_block``,
                                       FLUX ``double_blocks.i`` / ``single_blocks.i``
    first_stage_model.*                the VAE (LDM names)
    text_encoders.clip_l.transformer.* CLIP-L (transformers names)
    text_encoders.clip_g.transformer.* OpenCLIP bigG (SD3; transformers names)
    text_encoders.t5xxl.transformer.*  T5-XXL (transformers names; optional for SD3)

The transformer's names map onto diffusers' by one table per family (``sd3_rules`` /
``flux_rules``: renamed, fused q/k/v split, scale/shift halves swapped); exporting walks the
table one way. Loading SD3 goes through diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``;
FLUX through diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` for the released
width (3072: that converter has the width written in), through the table otherwise (toy sizes).
The transformer's config is read off the tensors' shapes; VAE and text-encoder configs come
from our exporter's header, else the bundled full-size family (``data/families/sd3``, ``flux``).
T5's tokenizer is in none of these files: it is read from a ``t5-tokenizer/`` folder beside
the checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from danqing.errors import CorruptModel
from danqing.files import atomic_save
from danqing.models.components import Components
from danqing.models.families import components_from_configs, load_family_config
from danqing.models.single_file import (CONFIG_KEY, VAE, _first_line, assign_weights, read_state_dict,
                                        vae_to_ldm)

DIT = "model.diffusion_model."
TEXT = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
        "t5": "text_encoders.t5xxl.transformer."}
# which component holds which encoder, per family (diffusers' names)
ENCODERS = {"sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5"},
            "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5"}}
T5_TOKENIZER_FOLDER = "t5-tokenizer"
ARCHITECTURE = {"sd3": "stable-diffusion-v3-medium", "flux": "flux-1-dev"}
FLUX_RELEASED_WIDTH = 3072


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------
def _bare(key: str) -> str:
    return key.removeprefix(DIT)


def flow_family_of_keys(keys) -> str | None:
    """"sd3" (``joint_blocks.*``) or "flux" (``double_blocks.*`` and ``single_blocks.*``),
    with or without the ``model.diffusion_model.`` prefix; None for anything else."""
    bare = {_bare(k).split(".", 1)[0] for k in keys}
    if "joint_blocks" in bare and "x_embedder" in bare:
        return "sd3"
    if "double_blocks" in bare and "single_blocks" in bare:
        return "flux"
    return None


# ---------------------------------------------------------------------------------------------
# The name tables: (original key or stem, diffusers key(s) or stem(s), how)
# how: "same" (renamed), "fused" (diffusers' tensors stacked along dim 0), "swap" (the two
# halves swapped: the original AdaLN gives shift, scale; diffusers' gives scale, shift).
# A stem takes ".weight" and ".bias"; a full key (``full=True``) is used as it is.
# ---------------------------------------------------------------------------------------------
def _rule(orig, diff, how="same", full=False):
    return (orig, diff if isinstance(diff, tuple) else (diff,), how, full)


def sd3_rules(config: dict) -> list:
    """The SD3 / SD3.5 table for a ``SD3Transformer2DModel`` config."""
    n = config["num_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    qk = config.get("qk_norm") is not None
    rules = [_rule("pos_embed", "pos_embed.pos_embed", full=True), _rule("x_embedder.proj", "pos_embed.proj"),
             _rule("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
             _rule("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
             _rule("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
             _rule("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
             _rule("context_embedder", "context_embedder"), _rule("final_layer.linear", "proj_out"),
             _rule("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")]
    for i in range(n):
        o, d, last = f"joint_blocks.{i}.", f"transformer_blocks.{i}.", i == n - 1
        x, c = o + "x_block.", o + "context_block."
        rules += [_rule(x + "attn.qkv", tuple(d + f"attn.to_{q}" for q in "qkv"), "fused"),
                  _rule(c + "attn.qkv", tuple(d + f"attn.add_{q}_proj" for q in "qkv"), "fused"),
                  _rule(x + "attn.proj", d + "attn.to_out.0"),
                  _rule(x + "adaLN_modulation.1", d + "norm1.linear"),
                  _rule(c + "adaLN_modulation.1", d + "norm1_context.linear", "swap" if last else "same"),
                  _rule(x + "mlp.fc1", d + "ff.net.0.proj"), _rule(x + "mlp.fc2", d + "ff.net.2")]
        if qk:
            rules += [_rule(x + "attn.ln_q.weight", d + "attn.norm_q.weight", full=True),
                      _rule(x + "attn.ln_k.weight", d + "attn.norm_k.weight", full=True),
                      _rule(c + "attn.ln_q.weight", d + "attn.norm_added_q.weight", full=True),
                      _rule(c + "attn.ln_k.weight", d + "attn.norm_added_k.weight", full=True)]
        if not last:
            rules += [_rule(c + "attn.proj", d + "attn.to_add_out"), _rule(c + "mlp.fc1", d + "ff_context.net.0.proj"),
                      _rule(c + "mlp.fc2", d + "ff_context.net.2")]
        if i in dual:
            rules += [_rule(x + "attn2.qkv", tuple(d + f"attn2.to_{q}" for q in "qkv"), "fused"),
                      _rule(x + "attn2.proj", d + "attn2.to_out.0")]
            if qk:
                rules += [_rule(x + "attn2.ln_q.weight", d + "attn2.norm_q.weight", full=True),
                          _rule(x + "attn2.ln_k.weight", d + "attn2.norm_k.weight", full=True)]
    return rules


def flux_rules(config: dict) -> list:
    """The FLUX.1 table for a ``FluxTransformer2DModel`` config."""
    rules = [_rule("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
             _rule("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
             _rule("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
             _rule("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
             _rule("txt_in", "context_embedder"), _rule("img_in", "x_embedder"), _rule("final_layer.linear", "proj_out"),
             _rule("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")]
    if config.get("guidance_embeds"):
        rules += [_rule("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                  _rule("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]
    for i in range(config["num_layers"]):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        rules += [_rule(o + "img_mod.lin", d + "norm1.linear"), _rule(o + "txt_mod.lin", d + "norm1_context.linear"),
                  _rule(o + "img_attn.qkv", tuple(d + f"attn.to_{q}" for q in "qkv"), "fused"),
                  _rule(o + "txt_attn.qkv", tuple(d + f"attn.add_{q}_proj" for q in "qkv"), "fused"),
                  _rule(o + "img_attn.norm.query_norm.scale", d + "attn.norm_q.weight", full=True),
                  _rule(o + "img_attn.norm.key_norm.scale", d + "attn.norm_k.weight", full=True),
                  _rule(o + "txt_attn.norm.query_norm.scale", d + "attn.norm_added_q.weight", full=True),
                  _rule(o + "txt_attn.norm.key_norm.scale", d + "attn.norm_added_k.weight", full=True),
                  _rule(o + "img_mlp.0", d + "ff.net.0.proj"), _rule(o + "img_mlp.2", d + "ff.net.2"),
                  _rule(o + "txt_mlp.0", d + "ff_context.net.0.proj"), _rule(o + "txt_mlp.2", d + "ff_context.net.2"),
                  _rule(o + "img_attn.proj", d + "attn.to_out.0"), _rule(o + "txt_attn.proj", d + "attn.to_add_out")]
    for i in range(config["num_single_layers"]):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rules += [_rule(o + "modulation.lin", d + "norm.linear"),
                  _rule(o + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"), "fused"),
                  _rule(o + "norm.query_norm.scale", d + "attn.norm_q.weight", full=True),
                  _rule(o + "norm.key_norm.scale", d + "attn.norm_k.weight", full=True),
                  _rule(o + "linear2", d + "proj_out")]
    return rules


RULES = {"sd3": sd3_rules, "flux": flux_rules}


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _expand(rules: list, have) -> list:
    """(orig key, diffusers keys, how) for every suffix a stem has in ``have`` (diffusers keys)."""
    out = []
    for orig, diff, how, full in rules:
        if full:
            out.append((orig, diff, how))
            continue
        for suffix in (".weight", ".bias"):
            if diff[0] + suffix in have:
                out.append((orig + suffix, tuple(k + suffix for k in diff), how))
    return out


def transformer_to_original(state_dict: dict, family: str, config: dict) -> dict:
    """diffusers transformer weights -> the original names (``model.diffusion_model.*``).
    Every diffusers tensor is used exactly once (else the table is wrong: an error)."""
    out, used = {}, set()
    for orig, diff, how in _expand(RULES[family](config), state_dict):
        tensors = [state_dict[k] for k in diff]
        used.update(diff)
        t = torch.cat(tensors, dim=0) if how == "fused" else tensors[0]
        out[DIT + orig] = _swap(t) if how == "swap" else t
    left = sorted(set(state_dict) - used)
    if left:
        raise ValueError(f"no original name for {left[:3]}")
    return out


def transformer_from_original(sd: dict, family: str, config: dict, shapes: dict) -> dict:
    """The inverse of ``transformer_to_original`` (``shapes``: the diffusers tensors' shapes, to
    split the fused ones)."""
    sd = {_bare(k): v for k, v in sd.items()}
    out = {}
    for orig, diff, how in _expand(RULES[family](config), shapes):
        t = sd[orig]
        if how == "swap":
            t = _swap(t)
        if how == "fused":
            for k, part in zip(diff, torch.split(t, [shapes[k][0] for k in diff], dim=0)):
                out[k] = part
        else:
            out[diff[0]] = t
    return out


# ---------------------------------------------------------------------------------------------
# Configs read off the tensors (files without our header)
# ---------------------------------------------------------------------------------------------
def _count(keys, root: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{root}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def transformer_config(sd: dict, family: str, head_dim: int | None = None) -> dict:
    """The diffusers transformer config of an original-layout transformer, from its shapes.

    Args:
        head_dim: attention head width (no tensor shows it); default that of every released
            model: 64 for SD3 / SD3.5, 128 for FLUX.1.
    """
    sd = {_bare(k): v for k, v in sd.items()}
    head = head_dim or (64 if family == "sd3" else 128)
    keys = list(sd)
    if family == "sd3":
        proj = sd["x_embedder.proj.weight"]  # (inner, C, p, p)
        p = proj.shape[-1]
        return {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": p,
                "in_channels": proj.shape[1], "num_layers": _count(keys, "joint_blocks"), "attention_head_dim": head,
                "num_attention_heads": proj.shape[0] // head, "joint_attention_dim": sd["context_embedder.weight"].shape[1],
                "caption_projection_dim": sd["context_embedder.weight"].shape[0],
                "pooled_projection_dim": sd["y_embedder.mlp.0.weight"].shape[1],
                "out_channels": sd["final_layer.linear.weight"].shape[0] // (p * p),
                "pos_embed_max_size": int(round(sd["pos_embed"].shape[1] ** 0.5)),
                "qk_norm": "rms_norm" if any(".ln_q." in k for k in keys) else None,
                "dual_attention_layers": sorted({int(k.split(".")[1]) for k in keys if ".attn2." in k})}
    img_in = sd["img_in.weight"]  # (inner, C * 4)
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": img_in.shape[1],
            "num_layers": _count(keys, "double_blocks"), "num_single_layers": _count(keys, "single_blocks"),
            "attention_head_dim": head, "num_attention_heads": img_in.shape[0] // head,
            "joint_attention_dim": sd["txt_in.weight"].shape[1],
            "pooled_projection_dim": sd["vector_in.in_layer.weight"].shape[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in sd, "axes_dims_rope": [16, 56, 56]}


def _default_configs(family: str, sd: dict) -> dict:
    configs = load_family_config(family)
    configs["transformer"] = transformer_config({k: v for k, v in sd.items() if not k.startswith(("first_stage_model.", "text_encoders."))}, family)
    if family == "flux" and not configs["transformer"]["guidance_embeds"]:  # FLUX.1 schnell: no shift
        configs["scheduler"] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                "shift": 1.0, "use_dynamic_shifting": False}
    return configs


def _configs_of(comps: Components) -> dict:
    cfg = {"transformer": dict(comps.unet.config), "vae": dict(comps.vae.config),
           "scheduler": dict(comps.scheduler_config)}
    for part in ENCODERS[comps.family]:
        if getattr(comps, part) is not None:
            cfg[part] = getattr(comps, part).config.to_diff_dict()
    if comps.t5_tokens is not None:
        cfg["t5_tokens"] = comps.t5_tokens
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


# ---------------------------------------------------------------------------------------------
# Export and load
# ---------------------------------------------------------------------------------------------
def export_flow_state_dict(comps: Components) -> dict:
    """All of an SD3 / FLUX model's weights in the shared single-file layout (module docstring)."""
    out = transformer_to_original(comps.unet.state_dict(), comps.family, dict(comps.unet.config))
    out.update(vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config)))
    for part, enc in ENCODERS[comps.family].items():
        module = getattr(comps, part)
        if module is None:
            continue
        for k, v in module.state_dict().items():
            if enc == "t5" and k == "encoder.embed_tokens.weight":
                continue  # tied to shared.weight; files keep the one
            if enc != "t5" and not k.startswith(("text_model.", "text_projection.")):
                k = "text_model." + k  # transformers 5's flattened CLIPTextModel -> the shared names
            out[TEXT[enc] + k] = v
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_flow_single_file(comps: Components, path: Path, *, metadata: dict | None = None,
                          overwrite: bool = False) -> Path:
    """Write an SD3 / FLUX model as one ``.safetensors`` file in the shared layout, atomically;
    the header carries ModelSpec keys and danqing's configs (toy sizes load back exactly)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURE[comps.family],
            "modelspec.title": path.stem, CONFIG_KEY: json.dumps(_configs_of(comps))}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return atomic_save(path, lambda tmp: save_file(export_flow_state_dict(comps), str(tmp), metadata=meta),
                       overwrite=overwrite)


def _t5_tokenizer(path: Path, family: str, beside: Path | None = None):
    """T5's tokenizer from ``t5-tokenizer/`` beside the checkpoint, else beside its T5 file."""
    from transformers import AutoTokenizer

    folders = [path.parent / T5_TOKENIZER_FOLDER] + ([beside.parent / T5_TOKENIZER_FOLDER] if beside else [])
    for folder in folders:
        if any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    raise CorruptModel(f"{path}: the {family.upper()} file's T5 text encoder needs the T5 tokenizer, which single "
                       f"files do not carry: put its files (tokenizer.json, or spiece.model, with "
                       f"tokenizer_config.json) in {folders[0]}/")


def _encoder_dict(sd: dict, enc: str, module, prefix: str | None = None) -> dict:
    prefix = TEXT[enc] if prefix is None else prefix
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if enc == "t5":
        out.setdefault("encoder.embed_tokens.weight", out.get("shared.weight"))
    elif not hasattr(module, "text_model"):  # transformers 5's flattened CLIPTextModel
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    else:  # CLIPTextModelWithProjection: text_model.* and text_projection
        out = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------
# Text encoders as separate files (ComfyUI's clip_l / clip_g / t5xxl files, models/text_encoder/)
# ---------------------------------------------------------------------------------------------
ENCODER_FILES = {"clip_l": ("CLIP-L", "clip_l.safetensors"), "clip_g": ("OpenCLIP bigG", "clip_g.safetensors"),
                 "t5": ("T5-XXL", "t5xxl_fp16.safetensors")}
TEXT_ENCODER_FOLDER = "models/text_encoder/"


def _bare_encoder(sd: dict) -> dict:
    """A text encoder file's tensors under transformers' names (an all-in-one prefix removed)."""
    for prefix in TEXT.values():
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _clip_shape(sd: dict) -> tuple[int, int]:
    """(width, layers) of a CLIP text encoder's tensors."""
    width = next(v.shape[1] for k, v in sd.items() if k.endswith("embeddings.token_embedding.weight"))
    layers = {int(m.group(1)) for k in sd if (m := re.search(r"encoder\.layers\.(\d+)\.", k))}
    return width, len(layers)


def encoder_kind(path: Path, sd: dict, family: str, configs: dict) -> str:
    """"clip_l", "clip_g" or "t5" for a text encoder file, from its keys: T5's blocks, else CLIP's,
    told apart by width and depth against the family's configs (by the file name when both fit).

    Raises:
        CorruptModel: not a text encoder, or one the family does not use.
    """
    keys = list(sd)
    needs = ENCODERS[family]
    if any(".SelfAttention." in k for k in keys):
        kind = "t5"
    elif any(k.endswith("embeddings.token_embedding.weight") for k in keys):
        shape = _clip_shape(sd)
        fits = [enc for part, enc in needs.items() if enc != "t5" and part in configs
                and (configs[part].get("hidden_size", 512), configs[part].get("num_hidden_layers", 12)) == shape]
        if len(fits) != 1:  # none fits (the checkpoint says otherwise), or both: the file's name
            fits = [enc for enc in ("clip_g", "clip_l") if enc in path.stem.lower() and enc in needs.values()] or fits
        if len(fits) != 1:
            raise CorruptModel(f"{path}: a CLIP text encoder of width {shape[0]} and {shape[1]} layers, which is none "
                               f"of the {family.upper()} model's (name the file clip_l or clip_g)")
        kind = fits[0]
    else:
        raise CorruptModel(f"{path}: not a text encoder file (no T5 blocks, no CLIP token embedding)")
    if kind not in needs.values():
        raise CorruptModel(f"{path}: a {ENCODER_FILES[kind][0]} text encoder, which {family.upper()} does not use "
                           f"(it takes {', '.join(ENCODER_FILES[e][0] for e in needs.values())})")
    return kind


def missing_encoder(path: Path, family: str, enc: str) -> CorruptModel:
    what, name = ENCODER_FILES[enc]
    return CorruptModel(f"{path.name}: this {family.upper()} file holds no {what} text encoder: give its file with "
                        f"--text-encoder (ComfyUI's {name}; keep text encoder files in {TEXT_ENCODER_FOLDER})")


def missing_vae(path: Path, family: str) -> CorruptModel:
    name = "ae.safetensors" if family == "flux" else "a VAE file"
    return CorruptModel(f"{path.name}: this {family.upper()} file holds no VAE: give it with --vae ({name}; keep "
                        "VAE files in models/vae/)")


def _transformer_dict(sd: dict, family: str, comps: Components) -> dict:
    from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    part = {k: v for k, v in sd.items() if not k.startswith(("first_stage_model.", "text_encoders."))}
    config = dict(comps.unet.config)
    if family == "sd3":
        return convert_sd3_transformer_checkpoint_to_diffusers(part)
    if config["num_attention_heads"] * config["attention_head_dim"] == FLUX_RELEASED_WIDTH:
        return convert_flux_transformer_checkpoint_to_diffusers(part)
    shapes = {k: tuple(v.shape) for k, v in comps.unet.state_dict().items()}
    return transformer_from_original(part, family, config, shapes)


def _encoder_sources(path: Path, sd: dict, family: str, configs: dict, encoder_files) -> dict:
    """{component: (state dict, prefix of its tensors)} of the family's text encoders: the
    checkpoint's own, else the given files' (``encoder_kind``); ``configs`` gains the configs of
    encoders from files (bundled full-size ones where the checkpoint's header has none)."""
    given: dict[str, tuple[dict, Path]] = {}
    for f in encoder_files:
        f = Path(f)
        tensors = _bare_encoder(read_state_dict(f)[0])
        kind = encoder_kind(f, tensors, family, {**load_family_config(family), **configs})
        if kind in given:
            raise CorruptModel(f"{f}: a second {ENCODER_FILES[kind][0]} text encoder (the first: {given[kind][1].name})")
        given[kind] = (tensors, f)
    sources = {}
    for part, enc in ENCODERS[family].items():
        inside = any(k.startswith(TEXT[enc]) for k in sd)
        if enc in given:
            if inside:
                raise CorruptModel(f"{given[enc][1]}: {path.name} holds its own {ENCODER_FILES[enc][0]} text encoder; "
                                   "give no --text-encoder for it")
            configs.setdefault(part, load_family_config(family)[part])
            sources[part] = (given[enc][0], "", given[enc][1])
        elif inside:
            sources[part] = (sd, TEXT[enc], path)
        elif part == "text_encoder_3":  # SD3 without T5
            configs.pop(part, None)
        else:
            raise missing_encoder(path, family, enc)
    return sources


def load_flow_single_file(path: Path, encoder_files=()) -> Components:
    """Load an SD3 / FLUX single file (module docstring) into CPU fp32 Components.

    Args:
        encoder_files: text encoder files (``clip_l``, ``clip_g``, ``t5xxl``: transformers names,
            as ComfyUI shares them) for a file that holds none; told apart by their keys.

    A file without its VAE loads with ``vae`` None: the caller gives one (``--vae``).

    Raises:
        CorruptModel: unreadable, or weights that do not fit; a text encoder the family needs
            that neither the file nor ``encoder_files`` hold; T5's tokenizer missing.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    sd, meta = read_state_dict(path)
    family = flow_family_of_keys(sd)
    try:
        configs = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else _default_configs(family, sd)
    except (ValueError, KeyError) as exc:
        raise CorruptModel(f"{path}: cannot read the {family} configuration ({_first_line(exc)})") from None
    sources = _encoder_sources(path, sd, family, configs, encoder_files)
    has_vae = any(k.startswith(VAE) for k in sd)
    configs.setdefault("vae", load_family_config(family)["vae"])  # built empty; the caller gives the VAE
    try:
        comps = components_from_configs(family, configs, empty=True)
        parts = {"unet": _transformer_dict(sd, family, comps)}
        if has_vae:
            parts["vae"] = convert_ldm_vae_checkpoint(sd, dict(comps.vae.config))
        for part, (tensors, prefix, _) in sources.items():
            parts[part] = _encoder_dict(tensors, ENCODERS[family][part], getattr(comps, part), prefix)
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as exc:
        raise CorruptModel(f"{path}: cannot convert the {family} checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None
    for name, tensors in parts.items():
        assign_weights(getattr(comps, name), tensors, name.replace("unet", "transformer"), sources.get(name, (0, 0, path))[2],
                       keep_fp8=name == "unet")  # an fp8 transformer stays fp8 (models.fp8)
    if not has_vae:
        comps.vae = None
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    if getattr(comps, t5) is not None:
        setattr(comps, "tokenizer_3" if family == "sd3" else "tokenizer_2",
                _t5_tokenizer(path, family, beside=sources[t5][2] if sources[t5][2] != path else None))
    comps.t5_tokens = configs.get("t5_tokens") if family == "sd3" else None
    comps.metadata.update({"source": str(path), "safetensors_metadata": meta})
    for m in comps.modules().values():
        m.eval()
    return comps
