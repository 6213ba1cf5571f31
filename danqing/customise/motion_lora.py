"""Motion LoRAs (AnimateDiff's MotionLoRA, Guo et al. 2023: camera moves such as zoom, pan, tilt
and roll learnt as low-rank changes of a motion module's temporal attention).

A motion LoRA is a LoRA file whose every layer is a motion module's. It is used like any LoRA,
``<lora:NAME:weight>`` in a video prompt (as A1111's AnimateDiff extension uses them, from
``models/Lora``); the layers are named in the original AnimateDiff layout
(``down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.
processor.to_q_lora.down.weight``, the released ``v2_lora_*.ckpt`` files) or diffusers' (``...
motion_modules.0.transformer_blocks.0.attn1.to_q.lora.down.weight``, with or without ``unet.``).
The file is read, parsed and hashed as every LoRA is (``customise.lora``); here it is told apart
and matched against the request's motion UNet, whose weights ``lora.patched`` then changes for
the ``with`` block (the motion UNet is made per request, so nothing shared changes).
"""

from __future__ import annotations

from types import SimpleNamespace

from danqing.customise.lora import Activation, LoraTag, NetworkCache, ResolvedNetwork, find_network
from danqing.errors import IncompatibleModel
from danqing.models.motion import diffusers_module_name, is_motion_network


def motion_module_name(key: str) -> str:
    """A motion LoRA's layer key -> the module's name in a ``UNetMotionModel``."""
    return diffusers_module_name(key.removeprefix("unet."))


def split_motion_tags(tags: list[LoraTag], *, registry, cache: NetworkCache) -> tuple[list[LoraTag], list[LoraTag]]:
    """(the tags of picture LoRAs, the tags of motion LoRAs)."""
    pictures, motion = [], []
    for tag in tags:
        entry, digest = find_network(tag, registry)
        (motion if is_motion_network(cache.get(entry.path, digest)) else pictures).append(tag)
    return pictures, motion


def resolve_motion(name: str, sha256: str, modules: dict, unet, motion_name: str) -> ResolvedNetwork:
    """Match a motion LoRA to a motion UNet (``UNetMotionModel``); one that does not fit its
    motion module (another family's, or another shape) is refused naming both."""
    out = ResolvedNetwork(name, sha256)
    names = dict(unet.named_modules())
    bad = []
    for key, m in modules.items():
        layer = motion_module_name(key)
        target = names.get(layer)
        if target is None or not hasattr(target, "weight") or not m.fits(target.weight.shape):
            bad.append(key)
            continue
        out.targets[("unet", layer)] = m
    if bad:
        raise IncompatibleModel(f"motion LoRA {name!r} does not fit motion module {motion_name!r}: {len(bad)} of "
                                f"{len(modules)} layers do not match (first: {bad[0]}); use a motion LoRA made for "
                                f"that module (v2 LoRAs for v2 modules)")
    return out


def activate_motion(tags: list[LoraTag], unet, *, registry, cache: NetworkCache,
                    motion_name: str) -> list[Activation]:
    """The motion LoRAs of ``tags`` matched against ``unet`` (the tag's unet weight is the
    multiplier); patch them in with ``lora.patched(motion_target(unet), activations)``."""
    acts = []
    for tag in tags:
        entry, digest = find_network(tag, registry)
        acts.append(Activation(resolve_motion(tag.name, digest, cache.get(entry.path, digest), unet, motion_name),
                               tag.unet, 0.0))
    return acts


def motion_target(unet) -> SimpleNamespace:
    """What ``lora.patched`` changes for motion LoRAs: the motion UNet, as the ``unet``
    component."""
    return SimpleNamespace(unet=unet)


__all__ = ["motion_module_name", "split_motion_tags", "resolve_motion", "activate_motion",
           "motion_target"]
