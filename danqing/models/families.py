"""Model families and their bundled configs (``data/families/<name>/*.json``).

``sd1`` (SD1.5), ``sd2`` (SD2.x 768-v; 512-base differs only in prediction type), ``sdxl``
(SDXL base 1.0) and ``sdxl-refiner`` (SDXL refiner 1.0: OpenCLIP bigG only, a 384-channel UNet
with 2560 added-embedding inputs) are the full-size architectures single files are loaded into; ``tiny-*`` are
toy-size configs of the same architectures for CPU tests and the built-in random model.
``tiny-sd3`` and ``tiny-flux`` are toy-size SD3 (MMDiT, CLIP-L + bigG + T5) and FLUX.1 (CLIP-L + T5,
guidance-distilled) configs; their T5 tokenizer is not bundled (``flow_models``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from importlib import resources

import torch

from danqing.errors import UnknownFamily
from danqing.models.components import TRANSFORMER_FAMILIES, Components
from danqing.models.flow_models import flow_components_from_configs
from danqing.models.tokenizer import clip_tokenizer

PARTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler")
BUILTIN_CONFIG = "tiny-sd1"  # the built-in random-weight model: this config, seeded
BUILTIN_SEED = 0


def family_names() -> list[str]:
    """Names of the bundled family configs ("sd1", ..., "tiny-sdxl")."""
    root = resources.files("danqing").joinpath("data/families")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


# Architectures of our own models, by the family they belong to.
OWN_MODELS = {"danqing-tiny": "sd1"}


def base_family(name: str) -> str:
    """"tiny-sd1" -> "sd1"; "danqing-tiny" (danqing's own trained model) -> "sd1"."""
    return OWN_MODELS.get(name, name.removeprefix("tiny-"))


def load_family_config(name: str) -> dict[str, dict]:
    """{part: config} of a bundled family, read from ``data/families/<name>/<part>.json``.

    Parts: ``unet``/``vae`` (diffusers configs), ``text_encoder``/``text_encoder_2`` (kwargs of
    ``transformers.CLIPTextConfig``; ``text_encoder_2`` for SDXL only, and only it for the SDXL
    refiner) and ``scheduler``.
    """
    root = resources.files("danqing").joinpath(f"data/families/{name}")
    if not name or "/" in name or not root.is_dir():
        raise UnknownFamily(f"no bundled family config {name!r}; bundled: {', '.join(family_names())}")
    out = {}
    for part in PARTS:
        f = root.joinpath(f"{part}.json")
        if f.is_file():
            out[part] = json.loads(f.read_text(encoding="utf-8"))
    return out


def components_from_configs(
    family: str, configs: dict[str, dict], *, prediction_type: str | None = None, empty: bool = False
) -> Components:
    """Modules built from configs: random-init, or with ``empty=True`` parameters on the meta
    device (no memory, no init time; buffers stay real) for a caller that loads every weight
    afterwards with ``load_state_dict(..., assign=True)``."""
    if family in TRANSFORMER_FAMILIES:
        return flow_components_from_configs(family, configs, empty=empty)
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sched = dict(configs["scheduler"])
    if prediction_type:
        sched["prediction_type"] = prediction_type
    te2 = configs.get("text_encoder_2")
    with init_empty_weights() if empty else contextlib.nullcontext():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        te1 = configs.get("text_encoder")
        text_encoder = CLIPTextModel(CLIPTextConfig(**te1)) if te1 else None
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2)) if te2 else None
    return Components(
        family=family,
        prediction_type=sched.get("prediction_type", "epsilon"),
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        # OpenAI CLIP pads with <|endoftext|>, OpenCLIP (SD2, SDXL's second encoder) with "!".
        tokenizer=clip_tokenizer("!" if family == "sd2" else "<|endoftext|>") if text_encoder is not None else None,
        scheduler_config=sched,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer("!") if te2 else None,
    )


def build_components(name: str, *, prediction_type: str | None = None, seed: int = 0) -> Components:
    """Seeded random-weight Components of a bundled config (the global RNG is left untouched)."""
    configs = load_family_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        comps = components_from_configs(base_family(name), configs, prediction_type=prediction_type)
    for m in comps.modules().values():
        m.eval()
    comps.metadata["config"] = name
    return comps


def builtin_components() -> Components:
    """danqing's tiny SD1-architecture model with random weights (seeded): a stand-in until the
    bundled trained model exists. Its images are noise-like patterns, not pictures."""
    comps = build_components(BUILTIN_CONFIG, seed=BUILTIN_SEED)
    comps.metadata["source"] = "builtin"
    return comps


@functools.lru_cache(maxsize=1)
def builtin_sha256() -> str:
    """sha256 over the built-in model's tensors (name + raw bytes, sorted): stable across machines."""
    comps = builtin_components()
    h = hashlib.sha256()
    for part, module in comps.modules().items():
        for name, tensor in sorted(module.state_dict().items()):
            h.update(f"{part}.{name}".encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
