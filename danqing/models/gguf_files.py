"""Quantised SD3 / FLUX transformers in GGUF files, kept quantised in memory as diffusers reads them.

A GGUF transformer (as shared for FLUX.1 and SD3.5: llama.cpp's ``gguf`` container, the
transformer's original names as bare keys, Q8_0 / Q4_0 / Q4_K / ... blocks) is read with diffusers'
``load_gguf_checkpoint``; every ``Linear`` whose weight is quantised becomes diffusers'
``GGUFLinear``, which keeps the blocks and dequantises the weight on each call to
``compute_dtype`` -- memory of the file's size, so FLUX.1's 12 B transformer takes about 12.7 GB
at Q8_0 and 6.8 GB at Q4_0 instead of 24 GB in bf16. Names map onto diffusers' with the same
table as single files (``flow_files``): fused q/k/v blocks split along rows, which quantisation
keeps whole (blocks run along a row).

The file holds the transformer only; ``load_gguf_transformer`` returns the module (the loader
does not take GGUF checkpoints yet: VAE and text encoders would come from elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import torch

from danqing.errors import CorruptModel, UnknownFamily
from danqing.models.flow_files import flow_family_of_keys, transformer_config, transformer_from_original
from danqing.models.flow_models import _transformer_class


def load_gguf_transformer(path: Path, *, config: dict | None = None, head_dim: int | None = None,
                          compute_dtype: torch.dtype = torch.float32):
    """An SD3 / FLUX transformer from a GGUF file, its quantised Linear weights left quantised.

    Args:
        path: the ``.gguf`` file.
        config: the diffusers transformer config; default read off the tensor shapes
            (``flow_files.transformer_config``, with ``head_dim``).
        compute_dtype: what quantised weights are dequantised to on each call (bf16 on a GPU).

    Raises:
        UnknownFamily: not an SD3 / FLUX transformer; CorruptModel: a weight the file lacks.
    """
    from accelerate import init_empty_weights
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import GGUFParameter, _replace_with_gguf_linear

    path = Path(path)
    try:
        sd = load_gguf_checkpoint(str(path), return_tensors=True)
    except (ValueError, OSError) as exc:  # an unsupported quantisation type names the supported ones
        raise CorruptModel(f"{path}: cannot read the GGUF file ({str(exc).strip().splitlines()[0][:200]})") from None
    family = flow_family_of_keys(sd)
    if family is None:
        raise UnknownFamily(f"{path}: not an SD3 (joint_blocks.*) or FLUX (double_blocks.*, single_blocks.*) "
                            f"transformer")
    config = config or transformer_config(sd, family, head_dim)
    with init_empty_weights():
        model = _transformer_class(family).from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # quantised tensors have their byte shape: rows are rows, which is all the split needs
    converted = transformer_from_original(sd, family, dict(model.config), shapes)
    _replace_with_gguf_linear(model, compute_dtype, converted)
    for key, value in converted.items():
        owner, name = key.rsplit(".", 1)
        module = model.get_submodule(owner)
        if isinstance(value, GGUFParameter):
            module._parameters[name] = value
        elif name in module._buffers:
            module._buffers[name] = value.to(compute_dtype)
        else:
            module._parameters[name] = torch.nn.Parameter(value.to(compute_dtype), requires_grad=False)
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:
        raise CorruptModel(f"{path}: the GGUF file lacks {len(left)} weights of the {family} transformer ({left[:3]})")
    return model.eval()
