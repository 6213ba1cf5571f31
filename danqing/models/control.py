"""Loading ControlNets (Zhang et al. 2023) and T2I-Adapters (Mou et al. 2023): diffusers folders
and single files in the original ControlNet 1.0/1.1 layout, and the inverse conversion that
writes that layout. Running them inside the loop is ``danqing.conditioning.control``'s; placing
and caching them is the ModelManager's (``load_control``).
"""

from __future__ import annotations

import json
from pathlib import Path

from danqing.errors import CorruptModel
from danqing.models.families import load_family_config
from danqing.models.single_file import assign_weights, map_key, read_state_dict, unet_prefix_map

# The base family of a UNet or ControlNet by its cross-attention width.
CROSS_ATTENTION_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def is_adapter_folder(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") in ("T2IAdapter", "MultiAdapter")


def load_control_model(entry):
    """A ControlNet or T2I-Adapter from a registry entry, on the CPU in float32.

    Folders: diffusers ``ControlNetModel`` / ``T2IAdapter`` (local files only). Single files:
    ControlNet 1.0 (``control_model.`` prefix) and 1.1 (no prefix) ``.pth``/``.safetensors``
    in the original layout, converted with diffusers' ``convert_controlnet_checkpoint`` into a
    config of the family its weights show; or a file in diffusers' key layout with a
    ``<stem>.json`` config beside it (how danqing ships its own). Pickles are read with
    ``weights_only=True``.

    Returns:
        (model, kind) with kind "controlnet" or "t2i".
    """
    import accelerate
    from diffusers import ControlNetModel, T2IAdapter
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    path = Path(entry.path)
    if path.is_dir():
        if is_adapter_folder(path):
            return T2IAdapter.from_pretrained(path, local_files_only=True).float().eval(), "t2i"
        try:
            return ControlNetModel.from_pretrained(path, local_files_only=True).float().eval(), "controlnet"
        except (OSError, ValueError) as exc:
            raise CorruptModel(f"{path}: not a diffusers ControlNet folder ({str(exc).splitlines()[0][:200]})") from None

    sd, meta = read_state_dict(path)
    sidecar = path.with_suffix(".json")
    if "config" in meta:
        config = json.loads(meta["config"])
    elif sidecar.is_file():
        config = json.loads(sidecar.read_text())
    else:
        config = ldm_controlnet_config(sd, path)
    if config.get("_class_name") == "T2IAdapter":
        model = T2IAdapter.from_config(config)
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model.eval(), "t2i"
    sd = convert_controlnet_checkpoint(sd, config)
    with accelerate.init_empty_weights():
        model = ControlNetModel.from_config(config)
    assign_weights(model, sd, "ControlNet", path)
    return model.float().eval(), "controlnet"


def ldm_controlnet_config(sd: dict, path: Path) -> dict:
    """The diffusers ControlNet config of an original-layout ControlNet file, from the bundled
    UNet config of the family its weights show (cross-attention width; SDXL's label embedding)."""
    prefix = "control_model." if any(k.startswith("control_model.") for k in sd) else ""
    if f"{prefix}input_hint_block.0.weight" not in sd:
        raise CorruptModel(f"{path}: not a ControlNet (no input_hint_block weights) and no {path.stem}.json config beside it")
    k = next((k for k in sd if k.startswith(f"{prefix}input_blocks") and k.endswith("attn2.to_k.weight")), None)
    dim = sd[k].shape[1] if k else None
    family = "sdxl" if f"{prefix}label_emb.0.0.weight" in sd else CROSS_ATTENTION_FAMILY.get(dim)
    if family is None:
        raise CorruptModel(f"{path}: a ControlNet of cross-attention width {dim}, which no bundled family has "
                           f"(768 SD1, 1024 SD2, 2048 SDXL); put its diffusers config as {path.stem}.json beside it")
    unet = load_family_config(family)["unet"]
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block",
            "flip_sin_to_cos", "freq_shift", "norm_num_groups", "norm_eps", "upcast_attention")
    config = {k: unet[k] for k in keys if k in unet}
    config["conditioning_channels"] = int(sd[f"{prefix}input_hint_block.0.weight"].shape[1])
    if family == "sdxl" and f"{prefix}input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight" not in sd:
        config["down_block_types"] = ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    return config


def controlnet_to_ldm(state_dict: dict, config: dict, prefix: str = "") -> dict:
    """diffusers ControlNetModel -> the original ControlNet layout (lllyasviel's ``cldm``):
    the UNet encoder in openaimodel names, ``input_hint_block.{0,2,...}``, ``zero_convs.i.0``,
    ``middle_block_out.0``; ``prefix`` "control_model." gives ControlNet 1.0's files. The inverse
    of diffusers' ``convert_controlnet_checkpoint`` (a test round-trips through it)."""
    up = [t.replace("Down", "Up") for t in reversed(config["down_block_types"])]
    pairs = unet_prefix_map({**config, "up_block_types": up})
    n_hint = len({k.split(".")[2] for k in state_dict if k.startswith("controlnet_cond_embedding.blocks.")})
    out = {}
    for k, v in state_dict.items():
        if k.startswith("controlnet_cond_embedding."):
            rest = k[len("controlnet_cond_embedding."):]
            if rest.startswith("conv_in."):
                name = "input_hint_block.0." + rest[len("conv_in."):]
            elif rest.startswith("conv_out."):
                name = f"input_hint_block.{2 * (n_hint + 1)}." + rest[len("conv_out."):]
            else:
                _, j, tail = rest.split(".", 2)
                name = f"input_hint_block.{2 * (int(j) + 1)}.{tail}"
        elif k.startswith("controlnet_down_blocks."):
            _, i, tail = k.split(".", 2)
            name = f"zero_convs.{i}.0.{tail}"
        elif k.startswith("controlnet_mid_block."):
            name = "middle_block_out.0." + k[len("controlnet_mid_block."):]
        else:
            name = map_key(k, pairs)
        out[prefix + name] = v
    return out
