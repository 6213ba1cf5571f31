"""Single-file checkpoints in the original LDM / sgm key layout, as shared online.

Layout (Stability's ``ldm`` and ``sgm`` repositories, what A1111 and ComfyUI load)::

    model.diffusion_model.*                 UNet (openaimodel: input_blocks / middle_block / output_blocks)
    first_stage_model.*                     VAE (encoder.down.i.block.j, mid.attn_1.q as 1x1 convs, ...)
    cond_stage_model.transformer.text_model.*          SD1: OpenAI CLIP ViT-L (transformers layout)
    cond_stage_model.model.*                           SD2: OpenCLIP ViT-H (resblocks, fused in_proj)
    conditioner.embedders.0.transformer.text_model.*   SDXL: CLIP ViT-L
    conditioner.embedders.1.model.*                    SDXL: OpenCLIP ViT-bigG (+ text_projection)
    conditioner.embedders.0.model.*                    SDXL refiner: OpenCLIP ViT-bigG only

Loading converts to diffusers with diffusers' own converters (``single_file_utils``) and builds
the modules from danqing's bundled configs (or from the configs our exporter stores in the
file's metadata). Exporting is our own inverse mapping; the round trip through diffusers'
converter is a test. Pickles (.ckpt/.pt) are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from danqing.errors import CorruptModel, IncompatibleModel, ModelNotFound, UnknownFamily
from danqing.models.components import Components
from danqing.models.families import components_from_configs, load_family_config
from danqing.models.fp8 import FP8
from danqing.files import atomic_save, exists_message, publish

UNET = "model.diffusion_model."
VAE = "first_stage_model."
PREFIXES = {
    "sd1": {"clip": "cond_stage_model.transformer."},
    "sd2": {"openclip": "cond_stage_model.model."},
    "sdxl": {"clip": "conditioner.embedders.0.transformer.", "openclip": "conditioner.embedders.1.model."},
    "sdxl-refiner": {"openclip": "conditioner.embedders.0.model."},
}
CONFIG_KEY = "danqing.configs"
# Stability's ModelSpec architecture ids (https://github.com/Stability-AI/ModelSpec).
ARCHITECTURE = {("sd1", "epsilon"): "stable-diffusion-v1", ("sd1", "v_prediction"): "stable-diffusion-v1",
                ("sd2", "epsilon"): "stable-diffusion-v2-512", ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
                ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base", ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base",
                ("sdxl-refiner", "epsilon"): "stable-diffusion-xl-v1-refiner",
                ("sdxl-refiner", "v_prediction"): "stable-diffusion-xl-v1-refiner"}
# OpenCLIP ViT-H as trained had 24 blocks; SD2 reads the penultimate one and diffusers keeps 23.
SD2_OPENCLIP_BLOCKS = 24


# ---------------------------------------------------------------------------------------------
# Family detection
# ---------------------------------------------------------------------------------------------
def detect_family(keys) -> str:
    """"sd1", "sd2", "sdxl" or "sdxl-refiner" from the state-dict keys of an LDM / sgm-layout
    checkpoint.

    SD1: ``cond_stage_model.transformer.*`` (OpenAI CLIP); SD2: ``cond_stage_model.model.*``
    (OpenCLIP); SDXL base: ``conditioner.embedders.1.model.*`` (OpenCLIP bigG beside CLIP ViT-L);
    SDXL refiner: ``conditioner.embedders.0.model.*`` alone (OpenCLIP bigG only); each with
    ``model.diffusion_model.*``. Raises UnknownFamily otherwise.
    """
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has(UNET) and has("conditioner.embedders.1.model."):
        return "sdxl"
    if has(UNET) and has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        return "sdxl-refiner"
    if has(UNET) and has("cond_stage_model.model.transformer.resblocks."):
        return "sd2"
    if has(UNET) and has("cond_stage_model.transformer."):
        return "sd1"
    raise UnknownFamily(
        "unknown model family: expected the LDM layout of SD1.x, SD2.x, SDXL base or SDXL refiner "
        "(model.diffusion_model.* with cond_stage_model.* or conditioner.*), or SD3 (joint_blocks.*) or "
        "FLUX (double_blocks.* and single_blocks.*), "
        f"found keys starting with {', '.join(_key_roots(keys)) or 'nothing'}"
    )


def _key_roots(keys, limit: int = 6) -> list[str]:
    """A few distinct key prefixes, two levels deep under the LDM roots ("model.diffusion_model")."""
    roots = set()
    for key in keys:
        parts = key.split(".")
        roots.add(".".join(parts[:2]) if parts[0] in ("model", "cond_stage_model", "conditioner") and len(parts) > 2 else parts[0])
    return sorted(roots)[:limit]


# ---------------------------------------------------------------------------------------------
# Export: diffusers -> LDM
# ---------------------------------------------------------------------------------------------
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_prefix_map(config: dict) -> list[tuple[str, str]]:
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


def map_key(key: str, pairs: list[tuple[str, str]]) -> str:
    """One diffusers UNet key -> its openaimodel name (resnet layers renamed: ``norm1`` ->
    ``in_layers.0``, ...; attention blocks keep diffusers' names, which SpatialTransformer shares)."""
    for src, dst in pairs:
        if key.startswith(src):
            rest = key[len(src):]
            if ".resnets." in src or src.startswith("mid_block.resnets"):
                for a, b in _RESNET:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
            return dst + rest
    raise KeyError(f"no LDM name for UNet key {key!r} (an architecture SD1/SD2/SDXL do not have)")


def unet_to_ldm(state_dict: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel -> ``model.diffusion_model.*`` (openaimodel names)."""
    pairs = unet_prefix_map(config)
    return {UNET + map_key(k, pairs): v for k, v in state_dict.items()}


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


def openclip_to_ldm(state_dict: dict, prefix: str, *, n_blocks: int | None = None) -> dict:
    """transformers CLIP text model -> OpenCLIP layout (resblocks, fused q/k/v ``in_proj``).

    ``attn.in_proj_weight`` is q, k, v stacked: (3*hidden, hidden). ``text_projection`` (SDXL) is
    stored transposed, (hidden, proj), as OpenCLIP does. ``n_blocks`` larger than the model's
    layer count appends all-zero blocks, each an exact identity (x + 0 + 0) of a residual block.
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
    last = f"{prefix}transformer.resblocks.{n_layers - 1}."
    for i in range(n_layers, n_blocks or n_layers):
        for key in [k for k in out if k.startswith(last)]:
            out[f"{prefix}transformer.resblocks.{i}.{key[len(last):]}"] = torch.zeros_like(out[key])
    return out


def export_ldm_state_dict(comps: Components, *, to_cpu: bool = True) -> dict:
    """All of a model's weights in the single-file LDM / sgm layout of its family.

    SD2: diffusers' text encoder keeps the first 23 of OpenCLIP ViT-H's 24 blocks (SD2 conditions
    on the penultimate block's output, so the 24th never runs). A full-size SD2 is written with 24
    blocks, the 24th all zeros -- an exact identity block -- so the file has the key set and shapes
    of an original SD2 checkpoint (A1111, ComfyUI and model mergers find every key), and diffusers'
    converter drops ``resblocks.23`` by name when loading, so the round trip is exact. Other layer
    counts (toy configs) are written as they are: the converter would keep any extra block.
    """
    out = unet_to_ldm(comps.unet.state_dict(), dict(comps.unet.config))
    out.update(vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config)))
    prefixes = PREFIXES[comps.family]
    if "clip" in prefixes:
        out.update(clip_to_ldm(comps.text_encoder.state_dict(), prefixes["clip"]))
    if comps.family == "sd2":
        n = comps.text_encoder.config.num_hidden_layers
        blocks = SD2_OPENCLIP_BLOCKS if n == SD2_OPENCLIP_BLOCKS - 1 else n
        out.update(openclip_to_ldm(comps.text_encoder.state_dict(), prefixes["openclip"], n_blocks=blocks))
    elif comps.family in ("sdxl", "sdxl-refiner"):
        out.update(openclip_to_ldm(comps.text_encoder_2.state_dict(), prefixes["openclip"]))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()} if to_cpu else out


def _configs_of(comps: Components) -> dict:
    cfg = {"unet": dict(comps.unet.config), "vae": dict(comps.vae.config), "scheduler": dict(comps.scheduler_config)}
    if comps.text_encoder is not None:  # the SDXL refiner has only the second encoder
        cfg["text_encoder"] = comps.text_encoder.config.to_diff_dict()
    if comps.text_encoder_2 is not None:
        cfg["text_encoder_2"] = comps.text_encoder_2.config.to_diff_dict()
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _modelspec(comps: Components, path: Path) -> dict:
    """Stability's ModelSpec header keys (what sd-scripts and ComfyUI write and read)."""
    scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    side = comps.unet.config.sample_size * scale
    return {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": ARCHITECTURE[comps.family, comps.prediction_type],
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.prediction_type": "v" if comps.prediction_type == "v_prediction" else "epsilon",
            "modelspec.resolution": f"{side}x{side}",
            "modelspec.title": path.stem}


_publish = publish  # the final step of every atomic write (danqing.files)


def save_single_file(comps: Components, path: Path, *, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a model as one ``.safetensors`` file in the LDM layout, atomically.

    Written to a temporary file in the same folder, then moved into place. The header carries
    ModelSpec keys (``modelspec.architecture``, ``modelspec.prediction_type``, ...) and danqing's
    configs under ``danqing.configs`` (so toy-size models load back exactly); other tools ignore
    them. ``metadata`` adds or overrides header entries (values are stored as strings).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(exists_message(path))
    meta = {**_modelspec(comps, path), CONFIG_KEY: json.dumps(_configs_of(comps))}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return atomic_save(path, lambda tmp: save_file(export_ldm_state_dict(comps), str(tmp), metadata=meta),
                       overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Load: LDM -> diffusers (diffusers' converters)
# ---------------------------------------------------------------------------------------------
def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def read_state_dict(path: Path) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of a .safetensors / .ckpt / .pt file, on the CPU.

    Pickles are read only with ``torch.load(weights_only=True)`` (no pickled code runs); a
    top-level ``"state_dict"`` entry (Lightning checkpoints) is unwrapped, non-tensors dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"{path}: no such model file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptModel(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptModel(f"{path}: not a readable checkpoint; pickles are loaded with weights_only=True ({_first_line(exc)})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CorruptModel(f"{path}: holds no state dict")
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, {}


def assign_weights(module, state_dict: dict, what: str, path: Path, error=CorruptModel, keep_fp8: bool = False) -> None:
    """Load every weight of ``module`` (built with meta parameters) from ``state_dict``, strictly.

    Floating tensors become float32 (CPU fp32 is the loaded form; fp16 files are upcast), fp8
    ones too unless ``keep_fp8`` (``models.fp8``: they stay fp8 and are upcast per layer).
    ``position_ids`` (a fixed arange that transformers keeps as a non-persistent buffer; some
    merged checkpoints carry a broken float copy) are dropped from the file's side.
    """
    sd = {k: (v.float() if v.is_floating_point() and not (keep_fp8 and v.dtype in FP8) else v).contiguous()
          for k, v in state_dict.items() if not k.endswith("position_ids")}
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatch
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), _first_line(exc))
        raise error(f"{path}: {what} weights do not fit its config ({first[:200]})") from None
    if missing or unexpected:
        raise error(f"{path}: {what} weights do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")


_V_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?(\w+)[\"']?\s*(#.*)?$", re.M)


def _sidecar_prediction_type(path: Path) -> str | None:
    """A1111's convention: ``<stem>.yaml`` next to the checkpoint, ``parameterization: "v"``."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    m = _V_PARAMETERIZATION.search(sidecar.read_text(encoding="utf-8", errors="replace"))
    if m is None:
        return None
    return "v_prediction" if m.group(1) == "v" else "epsilon"


def probe_v_prediction(unet) -> bool:
    """A1111's probe: at t=999 an eps model's output stays near x; a v model's is far below it.

    x = 0.5 * ones(1, 4, 8, 8), context = 0.5 * ones(1, 2, cross_attention_dim); v if
    mean(out - x) < -1. For UNets without added conditioning (SD1/SD2).
    """
    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    ctx = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=ctx).sample
    return (out.float() - x.float()).mean().item() < -1


def resolve_prediction_type(path: Path, family: str, meta: dict, unet, explicit: str | None = None) -> str:
    """"epsilon" or "v_prediction", in order: ``explicit``; the header's ``modelspec.prediction_type``;
    a sidecar ``<stem>.yaml``; for SD2 only, A1111's probe (SD1 and SDXL default to epsilon)."""
    if explicit:
        return explicit
    spec = meta.get("modelspec.prediction_type", "").strip().lower()
    if spec:
        return "v_prediction" if spec in ("v", "v_prediction", "v-prediction") else "epsilon"
    sidecar = _sidecar_prediction_type(path)
    if sidecar:
        return sidecar
    if family != "sd2":
        return "epsilon"
    return "v_prediction" if probe_v_prediction(unet) else "epsilon"


def _load_configs(family: str, meta: dict, path: Path) -> dict:
    """danqing's configs from the header (our exporter writes them), else the bundled family's."""
    if CONFIG_KEY not in meta:
        return load_family_config(family)
    try:
        return json.loads(meta[CONFIG_KEY])
    except ValueError as exc:
        raise CorruptModel(f"{path}: unreadable {CONFIG_KEY} header ({_first_line(exc)})") from None


def _text_encoder_dicts(family: str, sd: dict, comps: Components) -> dict:
    """{component: diffusers/transformers state dict} of the text encoders (diffusers' converters)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    prefixes = PREFIXES[family]
    out = {}
    if "clip" in prefixes:
        clip = {k: v for k, v in sd.items() if k.startswith(prefixes["clip"])}
        out["text_encoder"] = convert_ldm_clip_checkpoint(clip)
    if family == "sd2":  # drops resblocks.23 and text_projection by name (see export_ldm_state_dict)
        out["text_encoder"] = convert_open_clip_checkpoint(comps.text_encoder, sd, prefix=prefixes["openclip"])
    elif family in ("sdxl", "sdxl-refiner"):
        out["text_encoder_2"] = convert_open_clip_checkpoint(comps.text_encoder_2, sd, prefix=prefixes["openclip"])
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.``); WithProjection keeps it.
    for name, tensors in out.items():
        if not hasattr(getattr(comps, name), "text_model"):
            out[name] = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    return out


def load_single_file(path: Path, *, prediction_type: str | None = None, configs: dict | None = None) -> Components:
    """Load an SD1/SD2/SDXL/SDXL-refiner single-file checkpoint (LDM / sgm layout) into
    Components (CPU, fp32).

    Args:
        path: .safetensors, or .ckpt/.pt (read with ``torch.load(weights_only=True)``).
        prediction_type: force "epsilon" / "v_prediction" (else header, .yaml sidecar, probe).
        configs: {part: diffusers config} for a non-standard architecture; default: the configs
            stored by our exporter, else the bundled full-size family config.

    Raises:
        ModelNotFound, CorruptModel (unreadable, incomplete, or weights that do not fit the
        configs), UnknownFamily (not SD1/SD2/SDXL base/SDXL refiner).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    path = Path(path)
    sd, meta = read_state_dict(path)
    family = detect_family(sd.keys())
    configs = configs or _load_configs(family, meta, path)
    try:
        comps = components_from_configs(family, configs, empty=True)
        parts = {"unet": convert_ldm_unet_checkpoint(sd, dict(comps.unet.config)),
                 "vae": convert_ldm_vae_checkpoint(sd, dict(comps.vae.config)),
                 **_text_encoder_dicts(family, sd, comps)}
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as exc:
        raise CorruptModel(f"{path}: cannot convert the {family} checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None
    names = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}
    for name, tensors in parts.items():
        assign_weights(getattr(comps, name), tensors, names[name], path)
    del sd, parts
    comps.prediction_type = resolve_prediction_type(path, family, meta, comps.unet, prediction_type)
    comps.scheduler_config["prediction_type"] = comps.prediction_type
    comps.metadata.update({"source": str(path), "safetensors_metadata": meta})
    for m in comps.modules().values():
        m.eval()
    return comps


# ---------------------------------------------------------------------------------------------
# Standalone VAE files
# ---------------------------------------------------------------------------------------------
def load_vae_file(path: Path, family: str):
    """A standalone VAE file for a ``family`` model, as shared online: LDM layout with bare keys
    (``encoder.down.0.block.0...``, ``quant_conv.*``) or ``first_stage_model.*`` keys, or a
    diffusers-layout ``AutoencoderKL`` state dict. Configs: from our header, else the family's.

    Raises:
        ModelNotFound, CorruptModel (unreadable file), IncompatibleModel (not a VAE, or not one
        of this family's shape).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    sd, meta = read_state_dict(path)
    sd = {k.removeprefix(VAE): v for k, v in sd.items() if not k.startswith(("model_ema.", "loss."))}
    if not any(k.startswith("encoder.") for k in sd) or not any(k.startswith("decoder.") for k in sd):
        raise IncompatibleModel(f"VAE {path.name} is not a VAE (no encoder.*/decoder.* weights); pick a VAE made for {family}")
    config = _load_configs(family, meta, path).get("vae") or load_family_config(family)["vae"]
    vae = _empty_vae(config)
    try:
        if any(".down_blocks." in k or ".up_blocks." in k for k in sd):  # already diffusers keys
            converted = sd
        else:
            converted = convert_ldm_vae_checkpoint({VAE + k: v for k, v in sd.items()}, dict(vae.config))
    except (KeyError, IndexError, RuntimeError, ValueError) as exc:
        raise IncompatibleModel(f"VAE {path.name} does not fit a {family} model ({type(exc).__name__}: {_first_line(exc, 150)})") from None
    try:
        assign_weights(vae, converted, "VAE", path, error=IncompatibleModel)
    except IncompatibleModel as exc:
        raise IncompatibleModel(f"VAE {path.name} does not fit a {family} model: {str(exc).split(': ', 1)[-1]}") from None
    return vae.eval()


def _empty_vae(config: dict):
    """An ``AutoencoderKL`` from ``config`` with meta parameters (every weight is assigned later)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        return AutoencoderKL.from_config(config)


def save_vae_file(vae, path: Path, *, prefixed: bool = False, config_in_metadata: bool = True, overwrite: bool = False) -> Path:
    """Write a VAE alone in the LDM layout: bare ``encoder.*`` keys as shared online, or
    ``first_stage_model.*`` with ``prefixed``; its diffusers config in the header unless told not to."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(exists_message(path))
    sd = vae_to_ldm(vae.state_dict(), dict(vae.config), prefix=VAE if prefixed else "")
    config = json.loads(json.dumps(dict(vae.config), default=list))
    meta = {CONFIG_KEY: json.dumps({"vae": config})} if config_in_metadata else {}
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    return atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite=overwrite)
