"""Single-file checkpoints in the original LDM / sgm key layout, as shared online.

Layout (Stability's ``ldm`` and ``sgm`` repositories, what A1111 and ComfyUI load)::

    model.diffusion_model.*                 UNet (openaimodel: input_blocks / middle_block / output_blocks)
    first_stage_model.*                     VAE (encoder.down.i.block.j, mid.attn_1.q as 1x1 convs, ...)
    cond_stage_model.transformer.text_model.*          SD1: OpenAI CLIP ViT-L (transformers layout)
    cond_stage_model.model.*                           SD2: OpenCLIP ViT-H (resblocks, fused in_proj)
    conditioner.embedders.0.transformer.text_model.*   SDXL: CLIP ViT-L
    conditioner.embedders.1.model.*                    SDXL: OpenCLIP ViT-bigG (+ text_projection)

Loading converts to diffusers with diffusers' own converters (``single_file_utils``) and builds
the modules from danqing's bundled configs (or from the configs our exporter stores in the
file's metadata). Exporting is our own inverse mapping; the round trip through diffusers'
converter is a test. Pickles (.ckpt/.pt) are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from danqing.errors import CorruptModel, IncompatibleModel, ModelNotFound, UnknownFamily
from danqing.models.components import Components

UNET = "model.diffusion_model."
VAE = "first_stage_model."
PREFIXES = {
    "sd1": {"clip": "cond_stage_model.transformer."},
    "sd2": {"openclip": "cond_stage_model.model."},
    "sdxl": {"clip": "conditioner.embedders.0.transformer.", "openclip": "conditioner.embedders.1.model."},
}
ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}
CONFIG_KEY = "danqing.configs"


# ---------------------------------------------------------------------------------------------
# Family detection
# ---------------------------------------------------------------------------------------------
def detect_family(keys) -> str:
    """"sd1", "sd2" or "sdxl" from the state-dict keys of an LDM-layout checkpoint."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise UnknownFamily("this is an SDXL refiner checkpoint (OpenCLIP bigG only); refiners are not supported yet")
    if has(UNET) and has("cond_stage_model.model.transformer.resblocks."):
        return "sd2"
    if has(UNET) and has("cond_stage_model.transformer."):
        return "sd1"
    tops = sorted({k.split(".")[0] for k in keys})[:6]
    raise UnknownFamily(
        f"unknown model family: expected the LDM layout of SD1.x, SD2.x or SDXL base "
        f"(model.diffusion_model.* with cond_stage_model.* or conditioner.*), found keys starting with {', '.join(tops) or 'nothing'}"
    )


# ---------------------------------------------------------------------------------------------
# Export: diffusers -> LDM
# ---------------------------------------------------------------------------------------------
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for every UNet block, from its config."""
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * n if isinstance(layers, int) else list(layers)
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    idx = 1
    for i in range(n):
        for j in range(layers[i]):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.")]
            idx += 1
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op."))
            idx += 1
    up_types = config["up_block_types"]
    up_layers = list(reversed(layers))
    idx = 0
    for i in range(n):
        has_attn = "CrossAttn" in up_types[i]
        for j in range(up_layers[i] + 1):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.")]
            idx += 1
        if i < n - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{idx - 1}.{2 if has_attn else 1}.conv."))
    return pairs


def _map_key(key: str, pairs: list[tuple[str, str]]) -> str:
    for src, dst in pairs:
        if key.startswith(src):
            rest = key[len(src):]
            if ".resnets." in src or src.startswith("mid_block.resnets"):
                for a, b in _RESNET:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
            return dst + rest
    raise KeyError(key)


def unet_to_ldm(state_dict: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel -> ``model.diffusion_model.*`` (openaimodel names)."""
    pairs = _unet_prefix_map(config)
    return {UNET + _map_key(k, pairs): v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: dict, config: dict, prefix: str = VAE) -> dict:
    """diffusers AutoencoderKL -> LDM ``first_stage_model.*``; mid-block attention as 1x1 convs."""
    n = len(config["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."), (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, value in state_dict.items():
        new = key
        for src, dst in pairs:
            if key.startswith(src):
                new = dst + key[len(src):]
                break
        new = new.replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in new:
            head, tail = new.split(".mid.attn_1.")
            for a, b in attn.items():
                if tail.startswith(a):
                    tail = b + tail[len(a):]
                    break
            new = f"{head}.mid.attn_1.{tail}"
            if value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)  # (C, C) linear -> (C, C, 1, 1) conv
        out[prefix + new] = value
    return out


def clip_to_ldm(state_dict: dict, prefix: str) -> dict:
    """transformers CLIPTextModel (v5: no ``text_model.`` prefix) -> ``<prefix>text_model.*``."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state_dict.items()}


def openclip_to_ldm(state_dict: dict, prefix: str) -> dict:
    """transformers CLIP text model -> OpenCLIP layout (resblocks, fused q/k/v ``in_proj``).

    ``text_projection`` (SDXL) is stored transposed, (hidden, proj), as OpenCLIP does.
    """
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"], prefix + "ln_final.bias": sd["final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    n_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for i in range(n_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
    return out


def export_ldm_state_dict(comps: Components, *, to_cpu: bool = True) -> dict:
    """All of a model's weights in the single-file LDM layout of its family."""
    out = unet_to_ldm(comps.unet.state_dict(), dict(comps.unet.config))
    out.update(vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config)))
    prefixes = PREFIXES[comps.family]
    if "clip" in prefixes:
        out.update(clip_to_ldm(comps.text_encoder.state_dict(), prefixes["clip"]))
    if comps.family == "sd2":
        # diffusers keeps OpenCLIP-H's first 23 layers (SD2 uses the penultimate layer); the
        # 24th is not part of the model and is not written (A1111 loads non-strictly).
        out.update(openclip_to_ldm(comps.text_encoder.state_dict(), prefixes["openclip"]))
    elif comps.family == "sdxl":
        out.update(openclip_to_ldm(comps.text_encoder_2.state_dict(), prefixes["openclip"]))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()} if to_cpu else out


def _configs_of(comps: Components) -> dict:
    cfg = {"unet": dict(comps.unet.config), "vae": dict(comps.vae.config), "text_encoder": comps.text_encoder.config.to_diff_dict(),
           "scheduler": dict(comps.scheduler_config)}
    if comps.text_encoder_2 is not None:
        cfg["text_encoder_2"] = comps.text_encoder_2.config.to_diff_dict()
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save_single_file(comps: Components, path: Path, *, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a model as one ``.safetensors`` file in the LDM layout, atomically.

    The header carries ModelSpec keys (``modelspec.architecture``, ``modelspec.prediction_type``)
    and danqing's configs (so toy-size models load back exactly); other tools ignore them.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; danqing never overwrites, pick another name")
    arch = ARCHITECTURE[comps.family] + ("-768-v" if comps.family == "sd2" and comps.prediction_type == "v_prediction" else "")
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
            "modelspec.prediction_type": "v" if comps.prediction_type == "v_prediction" else "epsilon",
            CONFIG_KEY: json.dumps(_configs_of(comps))}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(export_ldm_state_dict(comps), str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Load: LDM -> diffusers (diffusers' converters)
# ---------------------------------------------------------------------------------------------
def read_state_dict(path: Path) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of a .safetensors / .ckpt / .pt file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"{path}: no such model file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:
            raise CorruptModel(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptModel(f"{path}: not a readable checkpoint; pickles are loaded with weights_only=True ({str(exc).splitlines()[0][:200]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CorruptModel(f"{path}: holds no state dict")
    return sd, {}


def _strict_load(module, state_dict: dict, what: str, path: Path) -> None:
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatch
        first = next((l.strip() for l in str(exc).splitlines() if "size mismatch" in l), str(exc).splitlines()[0])
        raise CorruptModel(f"{path}: {what} weights do not fit its config ({first[:200]})") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CorruptModel(f"{path}: {what} weights incomplete (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _prediction_type(path: Path, family: str, meta: dict, unet, explicit: str | None) -> str:
    if explicit:
        return explicit
    spec = meta.get("modelspec.prediction_type")
    if spec:
        return "v_prediction" if spec.lower() in ("v", "v_prediction") else "epsilon"
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file() and re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", sidecar.read_text(errors="replace"), re.M):
        return "v_prediction"
    if family != "sd2":
        return "epsilon"
    # A1111's probe: at t=999 an eps model predicts ~x; a v model is far below it.
    with torch.no_grad():
        x = torch.ones(1, 4, 8, 8) * 0.5
        ctx = torch.ones(1, 2, unet.config.cross_attention_dim) * 0.5
        out = unet(x, torch.tensor([999]), encoder_hidden_states=ctx).sample
    return "v_prediction" if (out - x).mean().item() < -1 else "epsilon"


def load_single_file(path: Path, *, prediction_type: str | None = None, configs: dict | None = None) -> Components:
    """Load an SD1/SD2/SDXL single-file checkpoint into Components (CPU, fp32).

    Args:
        path: .safetensors, or .ckpt/.pt (read with ``torch.load(weights_only=True)``).
        prediction_type: force "epsilon" / "v_prediction" (else metadata, .yaml sidecar, probe).
        configs: {part: diffusers config} for a non-standard architecture; default: the configs
            stored by our exporter, else the bundled full-size family config.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint

    from danqing.models.families import components_from_configs, load_family_config

    path = Path(path)
    sd, meta = read_state_dict(path)
    family = detect_family(sd.keys())
    if configs is None:
        configs = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else load_family_config(family)
    try:
        comps = components_from_configs(family, configs)
        unet_sd = convert_ldm_unet_checkpoint(sd, dict(comps.unet.config))
        vae_sd = convert_ldm_vae_checkpoint(sd, dict(comps.vae.config))
    except (KeyError, IndexError, RuntimeError, ValueError) as exc:
        raise CorruptModel(f"{path}: cannot convert the {family} checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    _strict_load(comps.unet, unet_sd, "UNet", path)
    _strict_load(comps.vae, vae_sd, "VAE", path)
    prefixes = PREFIXES[family]
    if "clip" in prefixes:
        p = prefixes["clip"] + "text_model."
        _strict_load(comps.text_encoder, {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, "text encoder", path)
    if family == "sd2":
        te = convert_open_clip_checkpoint(comps.text_encoder, sd, prefix=prefixes["openclip"])
        _strict_load(comps.text_encoder, {k.removeprefix("text_model."): v for k, v in te.items()}, "text encoder", path)
    elif family == "sdxl":
        te2 = convert_open_clip_checkpoint(comps.text_encoder_2, sd, prefix=prefixes["openclip"])
        _strict_load(comps.text_encoder_2, te2, "text encoder 2", path)
    comps.prediction_type = _prediction_type(path, family, meta, comps.unet, prediction_type)
    comps.scheduler_config["prediction_type"] = comps.prediction_type
    comps.metadata.update({"source": str(path), "safetensors_metadata": meta})
    for m in comps.modules().values():
        m.eval()
    return comps


def load_vae_file(path: Path, family: str):
    """A standalone VAE file (bare ``encoder.*`` keys or ``first_stage_model.*``) for ``family``."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from danqing.models.families import load_family_config

    path = Path(path)
    sd, meta = read_state_dict(path)
    sd = {k.removeprefix(VAE): v for k, v in sd.items() if not k.startswith(("model_ema.", "loss."))}
    config = json.loads(meta[CONFIG_KEY])["vae"] if CONFIG_KEY in meta else load_family_config(family)["vae"]
    if not any(k.startswith("encoder.") for k in sd) or not any(k.startswith("decoder.") for k in sd):
        raise IncompatibleModel(f"{path.name} is not a VAE (no encoder.*/decoder.* weights)")
    vae = AutoencoderKL.from_config(config)
    try:
        converted = convert_ldm_vae_checkpoint({VAE + k: v for k, v in sd.items()}, dict(vae.config))
        missing, unexpected = vae.load_state_dict(converted, strict=False)
    except (KeyError, IndexError, RuntimeError) as exc:
        raise IncompatibleModel(f"VAE {path.name} does not fit a {family} model ({type(exc).__name__}: {str(exc).splitlines()[0][:150]})") from None
    if missing or unexpected:
        raise IncompatibleModel(f"VAE {path.name} does not fit a {family} model (missing {missing[:2]}, unexpected {unexpected[:2]})")
    return vae.eval()


def save_vae_file(vae, path: Path, *, prefixed: bool = False, config_in_metadata: bool = True) -> Path:
    """Write a VAE alone in the LDM layout (bare keys as shared online, or ``first_stage_model.``)."""
    from safetensors.torch import save_file

    sd = vae_to_ldm(vae.state_dict(), dict(vae.config), prefix=VAE if prefixed else "")
    meta = {CONFIG_KEY: json.dumps({"vae": json.loads(json.dumps(dict(vae.config), default=list))})} if config_in_metadata else {}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return Path(path)
