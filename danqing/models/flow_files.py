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


def _t5_tokenizer(path: Path, family: str):
    from transformers import AutoTokenizer

    folder = path.parent / T5_TOKENIZER_FOLDER
    if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise CorruptModel(f"{path}: the {family.upper()} file's T5 text encoder needs the T5 tokenizer, which single "
                           f"files do not carry: put its files (tokenizer.json, or spiece.model, with "
                           f"tokenizer_config.json) in {folder}/")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _encoder_dict(sd: dict, enc: str, module) -> dict:
    prefix = TEXT[enc]
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if enc == "t5":
        out.setdefault("encoder.embed_tokens.weight", out.get("shared.weight"))
    elif not hasattr(module, "text_model"):  # transformers 5's flattened CLIPTextModel
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    return out


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


def load_flow_single_file(path: Path) -> Components:
    """Load an SD3 / FLUX single file (module docstring) into CPU fp32 Components.

    Raises:
        CorruptModel: unreadable, or weights that do not fit; a text encoder the family needs
            that the file lacks; T5's tokenizer missing beside the file.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    sd, meta = read_state_dict(path)
    family = flow_family_of_keys(sd)
    try:
        configs = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else _default_configs(family, sd)
    except (ValueError, KeyError) as exc:
        raise CorruptModel(f"{path}: cannot read the {family} configuration ({_first_line(exc)})") from None
    for part, enc in ENCODERS[family].items():
        if not any(k.startswith(TEXT[enc]) for k in sd):
            if part == "text_encoder_3":  # SD3 without T5
                configs.pop(part, None)
                continue
            raise CorruptModel(f"{path}: this {family.upper()} file holds no {enc} text encoder ({TEXT[enc]}*); "
                               f"files without their text encoders load only as a diffusers folder (with "
                               f"{part}/) for now")
    if not any(k.startswith(VAE) for k in sd):
        raise CorruptModel(f"{path}: this {family.upper()} file holds no VAE ({VAE}*); files without their VAE "
                           f"load only as a diffusers folder (with vae/) for now")
    try:
        comps = components_from_configs(family, configs, empty=True)
        parts = {"unet": _transformer_dict(sd, family, comps), "vae": convert_ldm_vae_checkpoint(sd, dict(comps.vae.config))}
        for part, enc in ENCODERS[family].items():
            if getattr(comps, part) is not None:
                parts[part] = _encoder_dict(sd, enc, getattr(comps, part))
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as exc:
        raise CorruptModel(f"{path}: cannot convert the {family} checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None
    for name, tensors in parts.items():
        assign_weights(getattr(comps, name), tensors, name.replace("unet", "transformer"), path)
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    if getattr(comps, t5) is not None:
        setattr(comps, "tokenizer_3" if family == "sd3" else "tokenizer_2", _t5_tokenizer(path, family))
    comps.metadata.update({"source": str(path), "safetensors_metadata": meta})
    for m in comps.modules().values():
        m.eval()
    return comps
