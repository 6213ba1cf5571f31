"""Loading models from a ModelEntry: diffusers folders, single files (via ``single_file``) and
the built-in random-weight model. Always local files only."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from danqing.errors import CorruptModel, IncompatibleModel, ModelNotFound
from danqing.models.components import Components
from danqing.models.families import builtin_components
from danqing.models.components import TRANSFORMER_FAMILIES
from danqing.models.flow_files import flow_family_of_keys, load_flow_single_file, save_flow_single_file
from danqing.models.cascade_models import if_kind_of_folder
from danqing.models.svd import is_svd_folder
from danqing.models.unclip_models import unclip_kind_of_folder
from danqing.models.flow_models import PIPELINES, T5_TOKENS_KEY, flow_family_of_folder, load_flow_folder
from danqing.models.registry import ModelEntry
from danqing.models.single_file import detect_family, load_single_file, load_vae_file, save_single_file
from danqing.models.tokenizer import clip_tokenizer
from danqing.files import atomic_save_dir, exists_message


def family_of_folder(unet_cfg: dict, te_cfg: dict | None, has_te2: bool) -> str:
    """SDXL if a second text encoder exists (the refiner if it is the only one); SD2 if the text
    encoder is OpenCLIP (gelu); else SD1."""
    if te_cfg is None and has_te2:
        return "sdxl-refiner"
    if has_te2 or unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if te_cfg.get("hidden_act") == "gelu" else "sd1"


def load_diffusers_folder(path: Path) -> Components:
    """A diffusers-format pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/);
    a ``UNet3DConditionModel`` in unet/ makes it a text-to-video model (ModelScope / zeroscope's
    ``TextToVideoSDPipeline`` folders), whose text encoder and VAE are SD2's or SD1's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    flow = flow_family_of_folder(path)
    if flow is not None:  # SD3 / FLUX: a transformer, CLIP + T5
        return load_flow_folder(path, flow)
    if if_kind_of_folder(path) is not None:
        raise CorruptModel(f"{path.name}: a DeepFloyd IF stage ({if_kind_of_folder(path)}); it runs through "
                           "danqing generate --model (danqing.sampling.cascade.run_if; docs/models.md), not as an "
                           "SD checkpoint")
    if is_svd_folder(path):
        raise CorruptModel(f"{path.name}: a Stable Video Diffusion model (image-to-video); it runs through "
                           "danqing video --init-image PICTURE (docs/video.md), not as a picture model")
    if unclip_kind_of_folder(path) is not None:
        raise CorruptModel(f"{path.name}: an unCLIP model ({unclip_kind_of_folder(path)}); it runs through "
                           "danqing variations / danqing generate --model (docs/models.md), not as an SD checkpoint")
    has_te1 = (path / "text_encoder" / "config.json").is_file()
    has_te2 = (path / "text_encoder_2" / "config.json").is_file()
    for sub in ("unet", "vae") + (() if has_te2 else ("text_encoder",)):
        if not (path / sub / "config.json").is_file():
            raise CorruptModel(f"{path}: not a complete diffusers model folder (missing {sub}/config.json)")
    unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    te_cfg = json.loads((path / "text_encoder" / "config.json").read_text()) if has_te1 else None
    family = family_of_folder(unet_cfg, te_cfg, has_te2)
    unet_class = UNet3DConditionModel if unet_cfg.get("_class_name") == "UNet3DConditionModel" else UNet2DConditionModel
    sched_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched_file.read_text()) if sched_file.is_file() else {}

    def tok(sub: str, pad: str):
        # vocab.json + merges.txt (older savers) or tokenizer.json (transformers 5)
        if (path / sub / "vocab.json").is_file() or (path / sub / "tokenizer.json").is_file():
            return CLIPTokenizer.from_pretrained(path / sub, local_files_only=True)
        return clip_tokenizer(pad)

    try:
        kw = {"local_files_only": True}
        comps = Components(
            family=family,
            prediction_type=scheduler_config.get("prediction_type", "epsilon"),
            unet=unet_class.from_pretrained(path / "unet", **kw),
            vae=AutoencoderKL.from_pretrained(path / "vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **kw) if has_te1 else None,
            tokenizer=tok("tokenizer", "!" if family == "sd2" else "<|endoftext|>") if has_te1 else None,
            scheduler_config=scheduler_config,
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw) if has_te2 else None,
            tokenizer_2=tok("tokenizer_2", "!") if has_te2 else None,
            metadata={"source": str(path)},
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptModel(f"{path}: cannot load diffusers folder ({str(exc).splitlines()[0]})") from None
    return comps


def load_components(entry: ModelEntry, *, prediction_type: str | None = None, text_encoders=()) -> Components:
    """Load a checkpoint entry to CPU fp32 Components; ``text_encoders``: encoder files for an
    SD3 / FLUX single file that holds none (``flow_files.load_flow_single_file``)."""
    if entry.is_builtin and not text_encoders:
        return builtin_components()
    if entry.path is not None and not entry.path.exists():
        raise ModelNotFound(f"{entry.path}: no such model file")
    flow = not entry.is_builtin and entry.format != "diffusers" and flow_family_of_keys(checkpoint_keys(entry.path))
    if flow:  # SD3 / FLUX single files
        return load_flow_single_file(entry.path, text_encoders)
    if text_encoders:
        raise IncompatibleModel(f"{entry.name}: holds its own text encoders; text encoder files (--text-encoder) "
                                "complete SD3 / FLUX single files that hold none")
    if entry.format == "diffusers":
        return load_diffusers_folder(entry.path)
    return load_single_file(entry.path, prediction_type=prediction_type)


def export_single_file(comps: Components, path: Path, *, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a model as one ``.safetensors`` file in the layout its family is shared in: LDM /
    sgm for SD1/SD2/SDXL (``single_file``), the SD3 / FLUX layout for those (``flow_files``)."""
    save = save_flow_single_file if comps.family in TRANSFORMER_FAMILIES else save_single_file
    return save(comps, path, metadata=metadata, overwrite=overwrite)


def load_vae(entry: ModelEntry, family: str, like=None):
    """A VAE overriding a checkpoint's: a diffusers AutoencoderKL folder or a single file."""
    if entry.format == "diffusers":
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(entry.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CorruptModel(f"{entry.path}: cannot load VAE folder ({str(exc).splitlines()[0]})") from None
    else:
        vae = load_vae_file(entry.path, family)
    if like is not None and vae.config.latent_channels != like.config.latent_channels:
        raise IncompatibleModel(
            f"VAE {entry.name} has {vae.config.latent_channels} latent channels but the {family} model uses "
            f"{like.config.latent_channels}; pick a VAE made for {family}"
        )
    return vae


def checkpoint_keys(path: Path) -> list[str]:
    """State-dict keys of a single file without loading its tensors (safetensors header, or a
    memory-mapped ``torch.load(weights_only=True)`` for pickles)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptModel(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CorruptModel(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return list(sd) if isinstance(sd, dict) else []


def describe_checkpoint(entry: ModelEntry) -> str:
    """The family of a checkpoint entry ("sd1", "sd2", "sdxl") without loading it."""
    if entry.is_builtin:
        return "sd1 (tiny, random weights)"
    if entry.format == "diffusers":
        p = Path(entry.path)
        flow = flow_family_of_folder(p)
        if flow is not None:
            return flow
        if if_kind_of_folder(p) is not None:  # DeepFloyd IF: a pixel stage
            return if_kind_of_folder(p)
        if unclip_kind_of_folder(p) is not None:  # Stable unCLIP, Kandinsky 2.2 prior / decoder
            return unclip_kind_of_folder(p)
        unet_cfg = json.loads((p / "unet" / "config.json").read_text())
        te_file = p / "text_encoder" / "config.json"
        te_cfg = json.loads(te_file.read_text()) if te_file.is_file() else None
        return family_of_folder(unet_cfg, te_cfg, (p / "text_encoder_2").is_dir())
    keys = checkpoint_keys(entry.path)
    return flow_family_of_keys(keys) or detect_family(keys)


def save_diffusers_folder(comps: Components, path: Path) -> Path:
    """Write Components as a diffusers pipeline folder (loadable by diffusers' ``from_pretrained``
    and by ``load_diffusers_folder``). Refuses to write into an existing folder."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(exists_message(path))
    pipeline = {"sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
                **PIPELINES}.get(comps.family, "StableDiffusionPipeline")

    def write(tmp: Path) -> None:
        index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
        if comps.family == "sdxl-refiner":
            index.update(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        if comps.t5_tokens is not None:  # a private key: diffusers' from_pretrained passes it by
            index[T5_TOKENS_KEY] = comps.t5_tokens
        for name, module in comps.modules().items():
            module.save_pretrained(tmp / name, safe_serialization=True)
            lib = "diffusers" if name in ("unet", "transformer", "vae") else "transformers"
            index[name] = [lib, type(module).__name__]
        for name, tok in (("tokenizer", comps.tokenizer), ("tokenizer_2", comps.tokenizer_2),
                          ("tokenizer_3", comps.tokenizer_3)):
            if tok is not None:
                tok.save_pretrained(tmp / name)
                index[name] = ["transformers", "CLIPTokenizer" if "CLIP" in type(tok).__name__ else type(tok).__name__]
        sched = {"_class_name": comps.scheduler_config.get("_class_name", "EulerDiscreteScheduler"), **comps.scheduler_config}
        if comps.prediction_type != "flow":  # flow-matching schedulers have no prediction_type
            sched["prediction_type"] = comps.prediction_type
        (tmp / "scheduler").mkdir(parents=True, exist_ok=True)
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index["scheduler"] = ["diffusers", sched["_class_name"]]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

    return atomic_save_dir(path, write)
