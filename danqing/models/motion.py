"""AnimateDiff motion modules (Guo et al. 2023): loading diffusers ``MotionAdapter`` folders and
the original single files (``mm_sd_v15*.ckpt`` / ``.safetensors``), checking that one fits a
checkpoint, and the motion UNet they make together (diffusers' ``UNetMotionModel``).

Motion modules live in ``models/motion/``; a request names one by its name in that folder only
(``Registry.resolve``: never a path). Placing the modules on the device is the ModelManager's
(``place_module``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from danqing.errors import CorruptModel, InvalidRequest
from danqing.models.single_file import read_state_dict

FIELD = "motion_module"
# the original layout's key of the sinusoidal position table (its length is the module's frame window)
MODULE_KEY = re.compile(r"^((?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.\d+\.)(.*)$")
# diffusers' names of a motion layer's parts -> the original layout's
RENAMES = ((".attn1", ".attention_blocks.0"), (".attn2", ".attention_blocks.1"), (".norm1", ".norms.0"),
           (".norm2", ".norms.1"), (".norm3", ".ff_norm"))
POS_ENCODER = re.compile(r"^down_blocks\.0\.motion_modules\.0\..*attention_blocks\.0\.pos_encoder\.pe$")


def find_motion(registry, name: str):
    """The ``models/motion/`` entry ``name`` selects: a name of that folder's listing (a diffusers
    folder or a single file), never a path, whoever asks (``danqing.models.names.resolve``)."""
    return registry.resolve("motion", name, FIELD)


def motion_names(registry) -> list[str]:
    """Names of the installed motion modules."""
    return [e.name for e in registry.scan("motion")]


def load_motion_adapter(entry):
    """A ``MotionAdapter`` from a registry entry, on the CPU in float32, eval mode.

    Folders: diffusers ``MotionAdapter`` (``config.json`` + weights; local files only). Single
    files in the original AnimateDiff layout: converted by diffusers'
    ``convert_animatediff_checkpoint_to_diffusers``, the config read from a ``<stem>.json``
    beside the file or else from the weights (``original_config``). Pickles are read with
    ``weights_only=True``.
    """
    from diffusers import MotionAdapter

    path = Path(entry.path)
    if path.is_dir():
        try:
            return MotionAdapter.from_pretrained(path, local_files_only=True).float().eval()
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptModel(f"{path}: not a diffusers MotionAdapter folder ({str(exc).splitlines()[0][:200]})") from None
    sd, meta = read_state_dict(path)
    sidecar = path.with_suffix(".json")
    config = (json.loads(meta["config"]) if "config" in meta else
              json.loads(sidecar.read_text()) if sidecar.is_file() else original_config(sd, path))
    return adapter_from_original(sd, config, path)


def adapter_from_original(sd: dict, config: dict, path: Path | str = "motion module"):
    """A ``MotionAdapter`` of ``config`` holding the weights of an original-layout state dict."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    adapter = MotionAdapter(**config)
    converted = convert_animatediff_checkpoint_to_diffusers(sd)
    missing, unexpected = adapter.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    missing = [k for k in missing if not k.endswith(".pos_embed.pe")]  # sinusoidal: made by the adapter itself
    if missing or unexpected:
        shown = ", ".join((missing or unexpected)[:3])
        raise CorruptModel(f"{path}: not an AnimateDiff motion module of the shape its weights suggest "
                           f"({len(missing)} missing, {len(unexpected)} unexpected weights: {shown}); put its "
                           f"diffusers config as {Path(path).stem}.json beside it")
    return adapter.eval()


def original_config(sd: dict, path: Path | str = "motion module") -> dict:
    """The ``MotionAdapter`` config an original-layout file's weights show: channels and motion
    modules per block, transformer layers, mid block, and the frame window (the length of its
    position table; v1: 24, v2/v3: 32). Head count and norm groups do not change any shape;
    AnimateDiff's (8 and 32) are assumed."""
    if not any(POS_ENCODER.match(k) for k in sd):
        raise CorruptModel(f"{path}: not an AnimateDiff motion module (no down_blocks.0.motion_modules.0 "
                           f"position table) and no {Path(path).stem}.json config beside it")
    blocks: dict[int, set[int]] = {}
    channels: dict[int, int] = {}
    layers = set()
    for k, v in sd.items():
        m = re.match(r"^down_blocks\.(\d+)\.motion_modules\.(\d+)\.temporal_transformer\.(.*)$", k)
        if not m:
            continue
        b, j, rest = int(m[1]), int(m[2]), m[3]
        blocks.setdefault(b, set()).add(j)
        if rest == "proj_in.weight":
            channels[b] = int(v.shape[0])
        t = re.match(r"^transformer_blocks\.(\d+)\.", rest)
        if t:
            layers.add(int(t[1]))
    n = max(blocks) + 1
    pe = next(v for k, v in sd.items() if POS_ENCODER.match(k))
    return {
        "block_out_channels": [channels[b] for b in range(n)],
        "motion_layers_per_block": max(len(blocks[b]) for b in range(n)),
        "motion_transformer_layers_per_block": max(layers) + 1,
        "use_motion_mid_block": any(k.startswith("mid_block.motion_modules.") for k in sd),
        "motion_max_seq_length": int(pe.shape[1]),
    }


def adapter_to_original(adapter) -> dict:
    """A ``MotionAdapter``'s weights in the original AnimateDiff layout (the inverse of
    diffusers' ``convert_animatediff_checkpoint_to_diffusers``), with the position table the
    original files carry in each of a block's two attentions (``pos_encoder.pe``,
    (1, frames, channels), sinusoidal)."""
    out = {}
    for k, v in adapter.state_dict().items():
        m = MODULE_KEY.match(k)
        if m is None:  # a PIA conv_in: not part of a motion module
            out[k] = v
            continue
        head, rest = f"{m[1]}temporal_transformer.", m[2]
        if rest.endswith(".pos_embed.pe"):  # one table in diffusers, one per attention in the original
            block = rest[: -len(".pos_embed.pe")]
            for i in (0, 1):
                out[f"{head}{block}.attention_blocks.{i}.pos_encoder.pe"] = v.clone()
            continue
        for diffusers, original in RENAMES:
            rest = rest.replace(diffusers, original)
        out[head + rest] = v
    return out


def is_motion_network(keys) -> bool:
    """Whether every layer key of a parsed LoRA names a motion module's layer (a motion LoRA)."""
    keys = list(keys)
    return bool(keys) and all(".motion_modules." in f".{k}" for k in keys)


def diffusers_module_name(key: str) -> str:
    """A motion module's layer named in the original layout (``...motion_modules.0.
    temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q``) -> its name in a
    diffusers ``MotionAdapter`` / ``UNetMotionModel`` (``...motion_modules.0.transformer_blocks.0.
    attn1.to_q``); a diffusers name is returned as it is."""
    key = key.replace(".temporal_transformer.", ".")
    for diffusers, original in RENAMES:
        key = key.replace(original, diffusers)
    return key


def check_fits(adapter, unet_config: dict, *, motion_name: str, model_name: str) -> None:
    """Refuse (one line, both sides said) a motion module whose blocks do not match the
    checkpoint's UNet: the number of blocks, their channels and their layers per block."""
    acfg, ucfg = adapter.config, unet_config
    n = len(ucfg["block_out_channels"])
    per_block = ucfg["layers_per_block"]
    unet_layers = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * n
    mp = acfg["motion_layers_per_block"]
    motion_layers = list(mp) if isinstance(mp, (list, tuple)) else [mp] * len(acfg["block_out_channels"])
    if list(acfg["block_out_channels"]) != list(ucfg["block_out_channels"]) or motion_layers != unet_layers:
        raise InvalidRequest(FIELD, f"motion module {motion_name!r} (blocks of {list(acfg['block_out_channels'])} "
                                    f"channels, {motion_layers} layers) does not fit checkpoint {model_name!r} "
                                    f"(blocks of {list(ucfg['block_out_channels'])} channels, {unet_layers} layers); "
                                    f"use a motion module made for its family (SD1.5 modules for SD1.5 checkpoints)")
    if acfg.get("conv_in_channels"):
        raise InvalidRequest(FIELD, f"motion module {motion_name!r} is a PIA image-to-video module "
                                    f"({acfg['conv_in_channels']} input channels), which is not supported")


def motion_unet(unet, adapter):
    """diffusers' ``UNetMotionModel`` from a (loaded, possibly LoRA-patched) 2D UNet and a motion
    adapter: the UNet's weights copied, the motion modules taken from the adapter. It is a new
    module, made per request, so the checkpoint's UNet stays as it was; the caller places it."""
    from diffusers import UNetMotionModel

    model = UNetMotionModel.from_unet2d(unet, adapter)
    # from_unet2d copies neither SDXL's added-conditioning MLP (pooled text and size ids) nor a
    # class embedding: they would stay randomly initialised (diffusers PR #6721 review, left open)
    for part in ("add_embedding", "class_embedding"):
        mine, theirs = getattr(model, part, None), getattr(unet, part, None)
        if mine is not None and theirs is not None:
            mine.load_state_dict(theirs.state_dict())
    model.requires_grad_(False)
    return model.eval()
