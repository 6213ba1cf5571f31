"""unCLIP families: Stable unCLIP and Kandinsky 2.2 (image variations), loaded from diffusers folders.

Stable unCLIP (Stability AI 2023, after Ramesh et al. 2022, "Hierarchical Text-Conditional
Image Generation with CLIP Latents" -- DALL-E 2) is SD 2.1 whose UNet also takes a CLIP image
embedding: the embedding, noised to a chosen level and followed by the level's sinusoidal
embedding, goes through the UNet's ``class_embedding`` (a projection) and is added to the time
embedding. Given a picture's embedding it makes variations of the picture.

Folder layout (diffusers' ``StableUnCLIPImg2ImgPipeline`` folder)::

    unet/ vae/ text_encoder/ tokenizer/ scheduler/         as SD 2.1
    image_encoder/ (CLIPVisionModelWithProjection) feature_extractor/ (CLIPImageProcessor)
    image_normalizer/ (the embedding's mean and std) image_noising_scheduler/

Kandinsky 2.2 (Razzhigaev et al. 2023) is unCLIP proper: a prior (a transformer) turns the
text into a CLIP image embedding, a decoder UNet conditioned only on image embeddings makes
MoVQ latents from it. A picture's own embedding in place of the prior's gives variations.
Two folders, as released (``KandinskyV22PriorPipeline`` / ``KandinskyV22Pipeline``)::

    prior:   prior/ (PriorTransformer) text_encoder/ (CLIPTextModelWithProjection) tokenizer/
             image_encoder/ (CLIPVisionModelWithProjection) image_processor/ scheduler/ (UnCLIP)
    decoder: unet/ movq/ (VQModel) scheduler/ (DDPM)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danqing.errors import CorruptModel
from danqing.models.components import Components
from danqing.models.tokenizer import clip_tokenizer

UNCLIP_PIPELINES = {"StableUnCLIPImg2ImgPipeline": "unclip", "KandinskyV22PriorPipeline": "kandinsky-prior",
                    "KandinskyV22Pipeline": "kandinsky-decoder"}
UNCLIP_PARTS = ("unet", "vae", "text_encoder", "image_encoder", "image_normalizer")


@dataclass
class UnclipModel:
    """A Stable unCLIP model.

    Attributes:
        kind: "unclip".
        components: the SD 2.1 parts (family "sd2": its text encoding and latents).
        image_encoder: ``transformers.CLIPVisionModelWithProjection``.
        feature_extractor: ``transformers.CLIPImageProcessor`` (the encoder's resize, crop, norm).
        image_normalizer: diffusers' ``StableUnCLIPImageNormalizer`` (embedding mean and std).
        noising_config: the scheduler config that noises the image embedding.
    """

    kind: str
    components: Components
    image_encoder: Any
    feature_extractor: Any
    image_normalizer: Any
    noising_config: dict
    metadata: dict = field(default_factory=dict)


def unclip_kind_of_folder(path: Path) -> str | None:
    """"unclip" (Stable unCLIP), "kandinsky-prior" or "kandinsky-decoder" (Kandinsky 2.2) for a
    diffusers folder of these families (its ``model_index.json``), else None."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return UNCLIP_PIPELINES.get(json.loads(index.read_text()).get("_class_name", ""))
    except ValueError:
        return None


def _scheduler_config(path: Path, sub: str, what: str = "Stable unCLIP") -> dict:
    f = path / sub / "scheduler_config.json"
    if not f.is_file():
        raise CorruptModel(f"{path}: the {what} folder has no {sub}/scheduler_config.json")
    return json.loads(f.read_text())


def load_unclip_folder(path: Path) -> UnclipModel:
    """Load a Stable unCLIP diffusers folder (local files only, CPU fp32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    path = Path(path)
    if unclip_kind_of_folder(path) != "unclip":
        raise CorruptModel(f"{path}: not a Stable unCLIP folder (model_index.json names StableUnCLIPImg2ImgPipeline)")
    for sub in UNCLIP_PARTS:
        if not (path / sub / "config.json").is_file():
            raise CorruptModel(f"{path}: the Stable unCLIP folder has no {sub}/config.json")
    if not (path / "feature_extractor" / "preprocessor_config.json").is_file():
        raise CorruptModel(f"{path}: the Stable unCLIP folder has no feature_extractor/preprocessor_config.json "
                           "(the CLIP image processor's settings)")
    kw = {"local_files_only": True}
    tok_dir = path / "tokenizer"
    try:
        tokenizer = (CLIPTokenizer.from_pretrained(tok_dir, **kw)
                     if (tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file()
                     else clip_tokenizer("!"))
        scheduler_config = _scheduler_config(path, "scheduler")
        comps = Components(
            family="sd2", prediction_type=scheduler_config.get("prediction_type", "epsilon"),
            unet=UNet2DConditionModel.from_pretrained(path / "unet", **kw),
            vae=AutoencoderKL.from_pretrained(path / "vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **kw), tokenizer=tokenizer,
            scheduler_config=scheduler_config, metadata={"source": str(path)},
        )
        model = UnclipModel(
            kind="unclip", components=comps,
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(path / "image_encoder", **kw),
            feature_extractor=CLIPImageProcessor.from_pretrained(path / "feature_extractor", **kw),
            image_normalizer=StableUnCLIPImageNormalizer.from_pretrained(path / "image_normalizer", **kw),
            noising_config=_scheduler_config(path, "image_noising_scheduler"), metadata={"source": str(path)},
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptModel(f"{path}: cannot load Stable unCLIP folder ({str(exc).splitlines()[0]})") from None
    for m in (comps.unet, comps.vae, comps.text_encoder, model.image_encoder, model.image_normalizer):
        m.eval()
    return model


@dataclass
class KandinskyPrior:
    """Kandinsky 2.2's prior: text -> CLIP image embedding; its image encoder embeds pictures.

    Attributes:
        prior: ``diffusers.PriorTransformer``; scheduler_config: its ``UnCLIPScheduler`` config.
        text_encoder, tokenizer: ``CLIPTextModelWithProjection`` (pooled + hidden states) and its tokenizer.
        image_encoder, image_processor: ``CLIPVisionModelWithProjection``, ``CLIPImageProcessor``.
    """

    prior: Any
    scheduler_config: dict
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any
    image_processor: Any
    kind: str = "kandinsky-prior"
    metadata: dict = field(default_factory=dict)


@dataclass
class KandinskyDecoder:
    """Kandinsky 2.2's decoder: ``unet`` (image-embedding conditioned, noise + variance out),
    ``movq`` (``diffusers.VQModel``) and its ``scheduler_config`` (DDPM)."""

    unet: Any
    movq: Any
    scheduler_config: dict
    kind: str = "kandinsky-decoder"
    metadata: dict = field(default_factory=dict)


def _need(path: Path, subs: tuple[str, ...], what: str, kind: str) -> None:
    if unclip_kind_of_folder(path) != kind:
        raise CorruptModel(f"{path}: not a {what} folder (model_index.json names "
                           f"{next(k for k, v in UNCLIP_PIPELINES.items() if v == kind)})")
    for sub in subs:
        if not (path / sub).is_file():
            raise CorruptModel(f"{path}: the {what} folder has no {sub}")


def load_kandinsky_prior(path: Path) -> KandinskyPrior:
    """Load a Kandinsky 2.2 prior folder (local files only, CPU fp32); its CLIP tokenizer is the
    folder's own or, without one, the bundled CLIP tokenizer."""
    from diffusers import PriorTransformer
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    path, what = Path(path), "Kandinsky 2.2 prior"
    _need(path, ("prior/config.json", "text_encoder/config.json", "image_encoder/config.json",
                 "image_processor/preprocessor_config.json"), what, "kandinsky-prior")
    kw = {"local_files_only": True}
    tok_dir = path / "tokenizer"
    try:
        model = KandinskyPrior(
            prior=PriorTransformer.from_pretrained(path / "prior", **kw),
            scheduler_config=_scheduler_config(path, "scheduler", what),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(path / "text_encoder", **kw),
            tokenizer=(CLIPTokenizer.from_pretrained(tok_dir, **kw)
                       if (tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file()
                       else clip_tokenizer("<|endoftext|>")),
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(path / "image_encoder", **kw),
            image_processor=CLIPImageProcessor.from_pretrained(path / "image_processor", **kw),
            metadata={"source": str(path)},
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptModel(f"{path}: cannot load {what} folder ({str(exc).splitlines()[0]})") from None
    for m in (model.prior, model.text_encoder, model.image_encoder):
        m.eval()
    return model


def load_kandinsky_decoder(path: Path) -> KandinskyDecoder:
    """Load a Kandinsky 2.2 decoder folder (local files only, CPU fp32)."""
    from diffusers import UNet2DConditionModel, VQModel

    path, what = Path(path), "Kandinsky 2.2 decoder"
    _need(path, ("unet/config.json", "movq/config.json"), what, "kandinsky-decoder")
    kw = {"local_files_only": True}
    try:
        model = KandinskyDecoder(unet=UNet2DConditionModel.from_pretrained(path / "unet", **kw),
                                 movq=VQModel.from_pretrained(path / "movq", **kw),
                                 scheduler_config=_scheduler_config(path, "scheduler", what),
                                 metadata={"source": str(path)})
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptModel(f"{path}: cannot load {what} folder ({str(exc).splitlines()[0]})") from None
    model.unet.eval()
    model.movq.eval()
    return model


def _save_pipeline_folder(path: Path, class_name: str, modules: dict, files: dict, schedulers: dict) -> Path:
    """A diffusers pipeline folder written atomically (an existing one is refused): ``modules``
    name -> (module, library) and ``files`` name -> (tokenizer or processor, class name) each
    ``save_pretrained`` into its sub-folder, ``schedulers`` name -> config, and the
    ``model_index.json`` that names them."""
    from danqing.files import atomic_save_dir, exists_message

    path = Path(path)
    if path.exists():
        raise FileExistsError(exists_message(path))

    def write(tmp: Path) -> None:
        index = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
        for name, (module, lib) in modules.items():
            module.save_pretrained(tmp / name, safe_serialization=True)
            index[name] = [lib, type(module).__name__]
        for name, (obj, cls) in files.items():
            obj.save_pretrained(tmp / name)
            index[name] = ["transformers", cls]
        for name, cfg in schedulers.items():
            (tmp / name).mkdir(parents=True, exist_ok=True)
            (tmp / name / "scheduler_config.json").write_text(json.dumps(cfg, indent=2))
            index[name] = ["diffusers", cfg["_class_name"]]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

    return atomic_save_dir(path, write)


def save_unclip_folder(model: UnclipModel, path: Path) -> Path:
    """Write a Stable unCLIP model as diffusers' ``StableUnCLIPImg2ImgPipeline`` folder (what
    ``load_unclip_folder`` and diffusers' ``from_pretrained`` read)."""
    comps = model.components
    return _save_pipeline_folder(
        path, "StableUnCLIPImg2ImgPipeline",
        {"unet": (comps.unet, "diffusers"), "vae": (comps.vae, "diffusers"),
         "text_encoder": (comps.text_encoder, "transformers"), "image_encoder": (model.image_encoder, "transformers"),
         "image_normalizer": (model.image_normalizer, "stable_diffusion")},
        {"tokenizer": (comps.tokenizer, "CLIPTokenizer"), "feature_extractor": (model.feature_extractor, "CLIPImageProcessor")},
        {"scheduler": comps.scheduler_config, "image_noising_scheduler": model.noising_config})


def save_kandinsky_prior(prior: KandinskyPrior, path: Path) -> Path:
    """Write an unCLIP prior as diffusers' ``KandinskyV22PriorPipeline`` folder (what
    ``load_kandinsky_prior`` and diffusers' ``from_pretrained`` read)."""
    return _save_pipeline_folder(
        path, "KandinskyV22PriorPipeline",
        {"prior": (prior.prior, "diffusers"), "text_encoder": (prior.text_encoder, "transformers"),
         "image_encoder": (prior.image_encoder, "transformers")},
        {"tokenizer": (prior.tokenizer, "CLIPTokenizer"), "image_processor": (prior.image_processor, "CLIPImageProcessor")},
        {"scheduler": prior.scheduler_config})


def save_kandinsky_decoder(decoder: KandinskyDecoder, path: Path) -> Path:
    """Write an unCLIP decoder as diffusers' ``KandinskyV22Pipeline`` folder (what
    ``load_kandinsky_decoder`` and diffusers' ``from_pretrained`` read)."""
    return _save_pipeline_folder(path, "KandinskyV22Pipeline",
                                 {"unet": (decoder.unet, "diffusers"), "movq": (decoder.movq, "diffusers")},
                                 {}, {"scheduler": decoder.scheduler_config})


def movq_from_vae(vae, codebook_from=None, codes: int = 256):
    """A ``diffusers.VQModel`` (Kandinsky's MoVQ format) that computes what ``vae`` (an
    ``AutoencoderKL``) computes, in its scaled latent space: ``encode`` gives the KL posterior's
    mean times the scaling factor, ``decode(z, force_not_quantize=True)`` is ``vae.decode(z /
    scaling_factor)`` (as Kandinsky's pipeline decodes). The KL encoder's last convolution and its
    ``quant_conv`` fold into one (the mean's half), the scaling into it and into
    ``post_quant_conv``; the VQ ``quant_conv`` is the identity. The codebook (read only by a
    quantising decode, which the pipeline never asks for) is ``codes`` k-means centres of the
    latent vectors in ``codebook_from`` (N, C, h, w), or of a standard normal draw without them."""
    import torch
    from diffusers import VQModel

    c, sf = vae.config, float(vae.config.scaling_factor)
    lc = c.latent_channels
    vq = VQModel(in_channels=c.in_channels, out_channels=c.out_channels, down_block_types=tuple(c.down_block_types),
                 up_block_types=tuple(c.up_block_types), block_out_channels=tuple(c.block_out_channels),
                 layers_per_block=c.layers_per_block, act_fn=c.act_fn, latent_channels=lc, sample_size=c.sample_size,
                 num_vq_embeddings=codes, norm_num_groups=c.norm_num_groups, scaling_factor=1.0,
                 mid_block_add_attention=c.mid_block_add_attention)
    src = {k: v.float() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        state = {k: v for k, v in src.items() if k.startswith("decoder.") or (k.startswith("encoder.")
                                                                             and not k.startswith("encoder.conv_out."))}
        q_w, q_b = src["quant_conv.weight"][:lc, :, 0, 0], src["quant_conv.bias"][:lc]  # the mean's rows
        w, b = src["encoder.conv_out.weight"], src["encoder.conv_out.bias"]
        state["encoder.conv_out.weight"] = sf * torch.einsum("ok,kihw->oihw", q_w, w)
        state["encoder.conv_out.bias"] = sf * (q_w @ b + q_b)
        state["quant_conv.weight"] = torch.eye(lc)[:, :, None, None]
        state["quant_conv.bias"] = torch.zeros(lc)
        state["post_quant_conv.weight"] = src["post_quant_conv.weight"] / sf
        state["post_quant_conv.bias"] = src["post_quant_conv.bias"]
        g = torch.Generator().manual_seed(0)
        points = (codebook_from.float().permute(0, 2, 3, 1).reshape(-1, lc) if codebook_from is not None
                  else torch.randn(codes * 64, lc, generator=g))
        state["quantize.embedding.weight"] = _kmeans(points, codes, g)
    vq.load_state_dict(state, strict=True)
    return vq.eval()


def _kmeans(points, k: int, g, iters: int = 20):
    """``k`` centres of ``points`` (N, D) by Lloyd's iterations from a seeded random pick."""
    import torch

    points = points[torch.randperm(len(points), generator=g)[:max(k * 256, k)]]
    centres = points[torch.randperm(len(points), generator=g)[:k]].clone()
    for _ in range(iters):
        nearest = torch.cdist(points, centres).argmin(1)
        for j in range(k):
            members = points[nearest == j]
            if len(members):
                centres[j] = members.mean(0)
    return centres
