"""Weights stored in 8-bit floats, computed in the model's dtype: layerwise upcasting.

FLUX.1 and SD3.5 transformers are shared with their Linear weights in ``float8_e4m3fn`` (one
byte a weight: FLUX.1's 12 B parameters in about 12 GB). Loaded, those weights stay in fp8; each
layer whose weight the file stores in fp8 gets diffusers' layerwise-casting hook
(``diffusers.hooks.apply_layerwise_casting``): before the layer runs its weights are cast to the
compute dtype, after it back to fp8, so only one layer at a time is held wide. The layers the
file stores wider (norms, embedders) are kept in the compute dtype and get no hook. The hook
casts a layer's bias with its weight: a bias stored wider than fp8 beside an fp8 weight is held
in fp8 too (the released fp8 files store both in fp8).
"""

from __future__ import annotations

import re

import torch

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_layers(module) -> dict[str, torch.dtype]:
    """{submodule name: fp8 dtype} of the layers whose own weight is stored in an fp8 dtype."""
    out = {}
    for name, sub in module.named_modules():
        weight = sub._parameters.get("weight") if hasattr(sub, "_parameters") else None
        if weight is not None and weight.dtype in FP8:
            out[name] = weight.dtype
    return out


def stores_fp8(module) -> bool:
    """Whether any parameter of ``module`` is stored in an fp8 dtype."""
    return any(p.dtype in FP8 for p in module.parameters())


def place_fp8(module, device, dtype: torch.dtype) -> None:
    """Put a model with fp8-stored layers on ``device``, computing in ``dtype``: the fp8 layers
    keep their storage and upcast per call (diffusers' layerwise casting), every other floating
    parameter and buffer is cast to ``dtype``. Called once, when the model is placed."""
    from diffusers.hooks import apply_layerwise_casting

    layers = fp8_layers(module)
    storage = set(layers.values())
    if len(storage) != 1:
        raise ValueError(f"one fp8 storage dtype per model, got {sorted(map(str, storage))}")
    module.to(device=device)
    for name, sub in module.named_modules():
        if name in layers:
            continue
        for key, p in list(sub._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype not in FP8 and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for key, b in list(sub._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                sub._buffers[key] = b.to(dtype)
    # skipped by exact name: the largest subtrees that hold no fp8 layer
    def holds(name: str) -> bool:
        return any(n == name or n.startswith(name + ".") for n in layers)

    skip = tuple(f"^{re.escape(name)}$" for name, _ in module.named_modules()
                 if name and not holds(name) and (holds(name.rpartition(".")[0]) or "." not in name))
    apply_layerwise_casting(module, storage_dtype=storage.pop(), compute_dtype=dtype, skip_modules_pattern=skip)
