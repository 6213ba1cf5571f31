"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"): a picture
as part of the conditioning, beside the prompt.

A CLIP vision encoder turns the picture into an embedding; the adapter's image projection
turns that into a few extra "image tokens"; decoupled cross-attention layers (``to_k_ip``,
``to_v_ip``) attend to them in every cross-attention of the UNet and add the result, times
the weight, to the text attention.

Everything model-side is diffusers' own machinery: ``UNet2DConditionModel._load_ip_adapter_weights``
(the loader behind ``IPAdapterMixin.load_ip_adapter``) builds the ``IPAdapterAttnProcessor2_0``
processors and the ``encoder_hid_proj`` image projection (``ImageProjection``, or
``IPAdapterPlusImageProjection`` for the "plus" adapters), and the UNet takes the image
embeddings as ``added_cond_kwargs["image_embeds"]``. danqing installs them on the shared UNet
for the duration of one request (``install``) and puts back the UNet's original processors,
projection and config in ``finally``; the encoded pictures reach ``build_conditioning``
in the request's ``ConditioningContext`` and travel in ``Conditioning.added``, so our own loop
runs unchanged.

The files (``models/ipadapter/``, ``models/clip_vision/``) are found and read by
``danqing.models.ip_adapter``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from danqing.cache import LRUCache, file_key
from danqing.errors import InvalidRequest, ModelNotFound
from danqing.models.ip_adapter import (ADAPTER_KIND, ENCODER_KIND, SUFFIXES, adapter_metadata, load_image_encoder,
                                      read_ip_adapter)
from danqing.models.registry import BUNDLED_KINDS
from danqing.models.names import Named, resolve, within


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def is_plus(state: dict) -> bool:
    """"Plus" adapters (a perceiver resampler over the encoder's penultimate hidden states)
    have learned ``latents``; the base ones a linear projection of the image embedding."""
    return "latents" in state["image_proj"]


# ---------------------------------------------------------------------------------------------
# Image embeddings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePrompt:
    """The encoded pictures of one request.

    Attributes:
        embeds: (1, n_images, D) image embeddings, or (1, n_images, 257, C) penultimate hidden
            states for "plus" adapters.
        negative: the unconditional branch's: zeros (base) or the encoding of a black picture
            (plus), as diffusers' ``encode_image``.
    """

    embeds: torch.Tensor
    negative: torch.Tensor

    def batch(self, batch: int, use_cfg: bool) -> list[torch.Tensor]:
        """``added_cond_kwargs["image_embeds"]``: one (2B or B, n_images, ...) tensor
        ([uncond; cond] with CFG, the order of our text context)."""
        pos = self.embeds.expand(batch, *self.embeds.shape[1:])
        if not use_cfg:
            return [pos]
        return [torch.cat([self.negative.expand(batch, *self.negative.shape[1:]), pos])]


@torch.no_grad()
def encode_images(encoder, processor, images, *, plus: bool) -> ImagePrompt:
    """Encode PIL pictures with the CLIP vision encoder (diffusers' ``encode_image``)."""
    param = next(encoder.parameters())
    pixels = processor(images, return_tensors="pt").pixel_values.to(device=param.device, dtype=param.dtype)
    if plus:
        pos = encoder(pixels, output_hidden_states=True).hidden_states[-2]  # (n, 257, C)
        neg = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    else:
        pos = encoder(pixels).image_embeds  # (n, D)
        neg = torch.zeros_like(pos)
    return ImagePrompt(pos[None], neg[None])


# ---------------------------------------------------------------------------------------------
# Installing on the UNet for one request
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def install(unet, state: dict, weight: float) -> Iterator[None]:
    """diffusers' IP-Adapter processors and image projection on ``unet`` inside the block,
    the original processors (the same objects), projection and config afterwards.

    Args:
        unet: the shared ``UNet2DConditionModel``.
        state: ``read_ip_adapter``'s dict.
        weight: the image prompt's scale (``IPAdapterAttnProcessor.scale``); 0 = no effect.
    """
    original_procs = dict(unet.attn_processors)
    original_proj = unet.encoder_hid_proj
    original_type = unet.config.encoder_hid_dim_type
    try:
        # diffusers' loader (IPAdapterMixin.load_ip_adapter calls it); it also moves the new
        # modules to the UNet's device and dtype.
        unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
        for proc in unet.attn_processors.values():
            if hasattr(proc, "to_k_ip"):
                proc.scale = [weight] * len(proc.scale)
        yield
    finally:
        # the projection first: a "plus" projection has attention layers of its own, which
        # ``attn_processors`` would count
        unet.encoder_hid_proj = original_proj
        unet.config.encoder_hid_dim_type = original_type  # as diffusers' unload_ip_adapter
        unet.set_attn_processor(original_procs)


# ---------------------------------------------------------------------------------------------
# The models folder
# ---------------------------------------------------------------------------------------------
class IPAdapterLibrary:
    """Finds IP-Adapter files and CLIP vision encoders in the models folder; caches what it
    read (adapter state dicts by path and mtime, encoders by folder -- immutable inputs, not
    request state). Encoders are placed by the ModelManager.

    Args:
        registry: the models-folder ``Registry``; manager: the ``ModelManager``.
    """

    def __init__(self, registry, manager):
        self.registry = registry
        self.manager = manager
        self._states: LRUCache[dict] = LRUCache(1)
        self._encoders: LRUCache[tuple] = LRUCache(1)

    def adapters(self) -> list:
        """The adapter files of ``models/ipadapter/``."""
        root = self.registry.models_dir / ADAPTER_KIND
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES) if root.is_dir() else []
        return within(found, root) if self.registry.names_only else found

    def encoders(self) -> list:
        """The encoder folders of ``models/clip_vision/``."""
        root = self.registry.models_dir / ENCODER_KIND
        found = sorted(p.parent for p in root.rglob("config.json")) if root.is_dir() else []
        return within(found, root) if self.registry.names_only else found

    def _named(self, found: list[Path], where: Path, kind: str, key) -> list[Named]:
        """The folder's models and after them the bundled ones of the same kind no file shadows."""
        named = [Named(key(f.relative_to(where)), f, (f.name, f.stem)) for f in found]
        taken = {n.name for n in named}
        return named + [Named(e.name, e.path, (e.path.name,)) for e in BUNDLED_KINDS[kind]() if e.name not in taken]

    def adapter_path(self, name: str | None, model: str | None = None) -> Path:
        """The adapter file called ``name`` (file name, stem or path; danqing's bundled adapters
        too). None = the only one in ``models/ipadapter/``, or, when that folder has none, the
        bundled adapter made for ``model`` (its file's ``base_model``)."""
        found = self.adapters()
        where = self.registry.models_dir / ADAPTER_KIND
        named = self._named(found, where, ADAPTER_KIND, lambda rel: rel.with_suffix("").as_posix())
        if name is None:
            if len(found) == 1:
                return found[0]
            if not found:
                for_model = [n.path for n in named if model is not None and adapter_metadata(n.path).get("base_model") == model]
                if len(for_model) == 1:
                    return for_model[0]
                raise ModelNotFound(f"no IP-Adapter in {where}; put the weight file there (e.g. "
                                    "ip-adapter_sd15.safetensors, or the .bin with image_proj and ip_adapter)")
            raise InvalidRequest("ip_adapter", f"several IP-Adapters are installed; name one of "
                                 f"{', '.join(p.stem for p in found)}")
        if self.registry.names_only:  # the server: names of the listing only, never paths
            return resolve(name, named, field="ip_adapter", what="IP-Adapter", folder=ADAPTER_KIND).path
        p = Path(name).expanduser()
        if p.is_file():
            return p
        for n in named:
            if name == n.name or name in n.aliases:
                return n.path
        raise ModelNotFound(f"IP-Adapter {name!r} not found in {where}; put the weight file (.safetensors or .bin) "
                            f"there; installed: {', '.join(n.name for n in named) or 'none'}")

    def encoder_path(self, name: str | None, adapter: Path | None = None) -> Path:
        """The CLIP vision encoder folder called ``name`` (danqing's bundled CLIP models too).
        None = the encoder ``adapter``'s file names (``image_encoder``, danqing's own adapters),
        else the only one in ``models/clip_vision/``."""
        found = self.encoders()
        where = self.registry.models_dir / ENCODER_KIND
        named = self._named(found, where, ENCODER_KIND, lambda rel: rel.as_posix())
        hint = (f"put the CLIP vision encoder folder (CLIPVisionModelWithProjection: config.json + "
                f"model.safetensors, the IP-Adapter release's image_encoder/) in {where}/")
        if name is None:
            own = adapter_metadata(adapter).get("image_encoder") if adapter is not None else None
            match = [n.path for n in named if own is not None and own == n.name]
            if match:
                return match[0]
            if len(found) == 1:
                return found[0]
            if not found:
                raise ModelNotFound(f"IP-Adapter needs an image encoder and {where} has none; {hint}")
            raise InvalidRequest("ip_adapter_encoder", f"several image encoders are installed; name one of "
                                 f"{', '.join(p.name for p in found)}")
        if self.registry.names_only:
            return resolve(name, named, field="ip_adapter_encoder", what="image encoder", folder=ENCODER_KIND).path
        p = Path(name).expanduser()
        if p.is_dir():
            return p
        for n in named:
            if name == n.name or name == n.path.name:
                return n.path
        raise ModelNotFound(f"image encoder {name!r} not found; {hint} (installed: "
                            f"{', '.join(n.name for n in named) or 'none'})")

    def state(self, path: Path) -> dict:
        return self._states.get_or_load(file_key(path), lambda: read_ip_adapter(path))

    def encoder(self, folder: Path):
        return self._encoders.get_or_load(str(folder), lambda: self._load_encoder(folder))

    def _load_encoder(self, folder: Path) -> tuple:
        encoder, processor = load_image_encoder(folder)
        self.manager.place_module(encoder)
        return encoder, processor


def check_fits(state: dict, unet, encoder, name: str) -> None:
    """Refuse an adapter made for another model (cross-attention width) or encoder (embedding
    width), naming both numbers."""
    proj = state["image_proj"]
    cross = unet.config.cross_attention_dim
    k_ip = next((v for k, v in state["ip_adapter"].items() if k.endswith("to_k_ip.weight")), None)
    if k_ip is not None and k_ip.shape[-1] != cross:
        raise InvalidRequest("ip_adapter", f"{name} is made for a model with {k_ip.shape[-1]}-wide text conditioning "
                             f"but this model's is {cross} ({k_ip.shape[-1]} vs {cross}); use the adapter of this model family")
    if "proj.weight" in proj:
        want, have = proj["proj.weight"].shape[-1], encoder.config.projection_dim
        what = "projection_dim"
    elif "proj_in.weight" in proj:
        want, have = proj["proj_in.weight"].shape[-1], encoder.config.hidden_size
        what = "hidden_size"
    else:
        return
    if want != have:
        raise InvalidRequest("ip_adapter_encoder", f"{name} expects {want}-wide image features but the image encoder's "
                             f"{what} is {have} ({want} vs {have}); use the encoder the adapter was trained with")


def ip_adapter_params(request, adapter_hash: str | None = None) -> dict:
    """Infotext entries of a request's image prompt (danqing's own keys; A1111 writes
    IP-Adapter settings through its ControlNet extension's unit lines)."""
    if request.ip_adapter is None:
        return {}
    name = request.ip_adapter
    return {"IP-Adapter": f"{name} [{adapter_hash[:10]}]" if adapter_hash else name,
            "IP-Adapter weight": request.ip_adapter_weight,
            "IP-Adapter image": "|".join(request.ip_adapter_image),
            "IP-Adapter encoder": request.ip_adapter_encoder}


def ip_adapter_fields(params: dict) -> dict:
    """The inverse of ``ip_adapter_params``."""
    import re

    if not params.get("IP-Adapter"):
        return {}
    f = {"ip_adapter": re.sub(r" \[[0-9a-fA-F]+\]$", "", params["IP-Adapter"]),
         "ip_adapter_image": tuple(p for p in params.get("IP-Adapter image", "").split("|") if p)}
    if "IP-Adapter weight" in params:
        f["ip_adapter_weight"] = float(params["IP-Adapter weight"])
    if params.get("IP-Adapter encoder"):
        f["ip_adapter_encoder"] = params["IP-Adapter encoder"]
    return f
