"""SD3 / SD3.5 and FLUX.1 as Components: built from configs, or loaded from a diffusers folder.

Folder layout (diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline`` folders)::

    SD3:   transformer/ vae/ text_encoder/ (CLIP-L) text_encoder_2/ (OpenCLIP bigG)
           [text_encoder_3/ + tokenizer_3/ (T5-XXL; optional)] tokenizer/ tokenizer_2/ scheduler/
    FLUX:  transformer/ vae/ text_encoder/ (CLIP-L) text_encoder_2/ + tokenizer_2/ (T5-XXL)
           tokenizer/ scheduler/

The CLIP tokenizers fall back to danqing's bundled one; T5's tokenizer has to be in the folder
(no registry package ships it, and nothing is downloaded): a missing one is an error that says
where its files go.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from danqing.errors import CorruptModel
from danqing.models.components import Components
from danqing.models.tokenizer import clip_tokenizer

TRANSFORMER_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# The text encoders of each family: (component, transformers class, what it is, required).
TEXT_PARTS = {
    "sd3": (("text_encoder", "CLIPTextModelWithProjection", "CLIP-L", True),
            ("text_encoder_2", "CLIPTextModelWithProjection", "OpenCLIP bigG", True),
            ("text_encoder_3", "T5EncoderModel", "T5-XXL", False)),
    "flux": (("text_encoder", "CLIPTextModel", "CLIP-L", True),
             ("text_encoder_2", "T5EncoderModel", "T5-XXL", True)),
}
T5_TOKENIZER = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}
# model_index.json's key for a model trained with another SD3 context length than the pipeline's
# 256 T5 tokens (``Components.t5_tokens``): what to pass diffusers' pipeline as max_sequence_length
T5_TOKENS_KEY = "_max_sequence_length"


def folder_t5_tokens(path: Path) -> int | None:
    """The T5 context length a folder's model_index.json names (None: the pipeline's own)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    value = json.loads(index.read_text()).get(T5_TOKENS_KEY)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 512):
        raise CorruptModel(f"{index}: {T5_TOKENS_KEY} must be a whole number 0-512, got {value!r}")
    return value


def flow_family_of_folder(path: Path) -> str | None:
    """"sd3" or "flux" for a diffusers folder with a flow-matching transformer, else None."""
    cfg = Path(path) / "transformer" / "config.json"
    if not cfg.is_file():
        return None
    name = json.loads(cfg.read_text()).get("_class_name", "")
    if name not in TRANSFORMER_CLASSES:
        raise CorruptModel(f"{path}: transformer/ holds a {name or 'model of unknown class'}; danqing loads "
                           f"{', '.join(TRANSFORMER_CLASSES)}")
    return TRANSFORMER_CLASSES[name]


def _transformer_class(family: str):
    import diffusers

    return getattr(diffusers, next(k for k, v in TRANSFORMER_CLASSES.items() if v == family))


def _text_class(name: str):
    import transformers

    return getattr(transformers, name)


def _text_config(class_name: str, kwargs: dict):
    from transformers import CLIPTextConfig, T5Config

    return (T5Config if class_name == "T5EncoderModel" else CLIPTextConfig)(**kwargs)


def flow_components_from_configs(family: str, configs: dict[str, dict], *, empty: bool = False) -> Components:
    """Random-init modules of a bundled SD3 / FLUX config (``empty``: parameters on the meta
    device, for a caller that assigns every weight). T5 tokenizers are not built here."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights() if empty else contextlib.nullcontext():
        transformer = _transformer_class(family).from_config(configs["transformer"])
        vae = AutoencoderKL.from_config(configs["vae"])
        texts = {}
        for part, cls, _, _ in TEXT_PARTS[family]:
            if part in configs:
                texts[part] = _text_class(cls)(_text_config(cls, configs[part]))
    return Components(
        family=family, prediction_type="flow", unet=transformer, vae=vae,
        text_encoder=texts.get("text_encoder"), tokenizer=clip_tokenizer("<|endoftext|>"),
        scheduler_config=dict(configs["scheduler"]), text_encoder_2=texts.get("text_encoder_2"),
        tokenizer_2=clip_tokenizer("!") if family == "sd3" else None, text_encoder_3=texts.get("text_encoder_3"),
    )


def _missing_encoder(path: Path, family: str, part: str, what: str, cls: str) -> CorruptModel:
    return CorruptModel(f"{path}: the {family.upper()} model needs its {what} text encoder: put its config.json and "
                        f"weights (a transformers {cls}) in {path / part}/")


def _missing_tokenizer(path: Path, family: str, sub: str) -> CorruptModel:
    return CorruptModel(f"{path}: the {family.upper()} model needs the T5 tokenizer: put its files (tokenizer.json, "
                        f"or spiece.model, with tokenizer_config.json) in {path / sub}/ -- no tokenizer is downloaded")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model", "vocab.json"))


def load_flow_folder(path: Path, family: str) -> Components:
    """Load an SD3 or FLUX diffusers folder (local files only) to CPU fp32 Components."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTokenizer

    path = Path(path)
    for sub in ("transformer", "vae"):
        if not (path / sub / "config.json").is_file():
            raise CorruptModel(f"{path}: not a complete diffusers model folder (missing {sub}/config.json)")
    present = {}
    for part, cls, what, required in TEXT_PARTS[family]:
        if (path / part / "config.json").is_file():
            present[part] = cls
        elif required:
            raise _missing_encoder(path, family, part, what, cls)
    t5_tok = T5_TOKENIZER[family]
    t5_part = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    if t5_part in present and not _has_tokenizer(path / t5_tok):
        raise _missing_tokenizer(path, family, t5_tok)
    sched_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    scheduler_config.setdefault("_class_name", "FlowMatchEulerDiscreteScheduler")
    kw = {"local_files_only": True}

    def clip_tok(sub: str, pad: str):
        return CLIPTokenizer.from_pretrained(path / sub, **kw) if _has_tokenizer(path / sub) else clip_tokenizer(pad)

    try:
        texts = {part: _text_class(cls).from_pretrained(path / part, **kw) for part, cls in present.items()}
        t5_tokenizer = AutoTokenizer.from_pretrained(path / t5_tok, **kw) if t5_part in present else None
        return Components(
            family=family, prediction_type="flow",
            unet=_transformer_class(family).from_pretrained(path / "transformer", **kw),
            vae=AutoencoderKL.from_pretrained(path / "vae", **kw),
            text_encoder=texts["text_encoder"], tokenizer=clip_tok("tokenizer", "<|endoftext|>"),
            scheduler_config=scheduler_config, text_encoder_2=texts.get("text_encoder_2"),
            tokenizer_2=clip_tok("tokenizer_2", "!") if family == "sd3" else t5_tokenizer,
            text_encoder_3=texts.get("text_encoder_3"), tokenizer_3=t5_tokenizer if family == "sd3" else None,
            t5_tokens=folder_t5_tokens(path) if family == "sd3" else None, metadata={"source": str(path)},
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptModel(f"{path}: cannot load diffusers folder ({str(exc).splitlines()[0]})") from None
