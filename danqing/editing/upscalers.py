"""Model upscalers and face restorers from user-provided weight files, through spandrel.

Files (``.pth``, ``.pt``, ``.safetensors``) are looked for in these folders of the models
folder; the name is the file's stem (the first folder in this order wins a clash):

    upscalers/  ESRGAN/  RealESRGAN/  SwinIR/  DAT/  HAT/     super-resolution models
    face_restore/  GFPGAN/  Codeformer/                       face restoration models

spandrel (https://github.com/chaiNNer-org/spandrel) reads the architecture and its
hyper-parameters from the state dict (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, GFPGAN, ...), so
no network is written by hand here. Pickle files are read by spandrel's restricted unpickler
(tensors and plain containers only; the same guarantee as ``torch.load(weights_only=True)``).

Tiling (``upscale_tensor``): the picture is cut into ``tile`` x ``tile`` pieces overlapping by
``overlap`` pixels (``upscale.tile_boxes``), each is run through the model and the outputs are
blended with linear ramps over the overlap (``upscale.tile_weight``), so memory depends on the
tile, not on the picture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from danqing.errors import InvalidRequest, ModelError
from danqing.models.names import inside

UPSCALER_FOLDERS = ("upscalers", "ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT")
FACE_FOLDERS = ("face_restore", "GFPGAN", "Codeformer")
SUFFIXES = (".pth", ".pt", ".safetensors")
DEFAULT_TILE, DEFAULT_OVERLAP = 256, 32  # input pixels; A1111's ESRGAN_tile is 192, overlap 8
MAX_PASSES = 3  # as A1111: a x4 model runs twice for x8, and Lanczos takes it to the exact size

_STANDINS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _import_spandrel():
    """Import spandrel without torchvision.

    spandrel 0.4.2 declares and imports torchvision, but PyPI has no torchvision that works with
    the CPU torch build danqing pins (../shared/DESIGN.md). Only two of its architectures use
    it (LaMa: ``InterpolationMode``, ``rotate``; RestoreFormer: ``normalize``), yet
    ``import spandrel`` imports every architecture. So, only when torchvision is truly absent,
    stand-in modules are put into ``sys.modules`` for the import and removed right after it
    (``finally``): transformers and diffusers probe ``importlib.util.find_spec("torchvision")``
    and must never see them. The stand-ins' functions raise a clear error, so LaMa and
    RestoreFormer files fail loudly when run; every other architecture works.
    """
    import enum
    import importlib.util
    import sys
    import types

    if "spandrel" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import spandrel

        return spandrel

    def needs_torchvision(*args, **kwargs):
        raise ModelError("the LaMa/RestoreFormer architecture needs torchvision, which has no build for "
                         "the CPU torch danqing pins")

    class InterpolationMode(enum.Enum):  # torchvision's members, for LaMa's module-level uses
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    tv, tr, fn = (types.ModuleType(name) for name in _STANDINS)
    tv.transforms, tr.functional = tr, fn
    fn.InterpolationMode, fn.rotate, fn.normalize = InterpolationMode, needs_torchvision, needs_torchvision
    sys.modules.update(zip(_STANDINS, (tv, tr, fn)))
    try:
        import spandrel
    finally:
        for name in _STANDINS:
            sys.modules.pop(name, None)
    return spandrel


def find_files(models_dir: Path, folders: tuple[str, ...], *, names_only: bool = False) -> dict[str, Path]:
    """name (file stem) -> file, for the weight files under ``models_dir/<folder>`` (recursive),
    in folder order; the first file of a name wins. ``names_only`` (the server) leaves out
    symlinks that lead out of their folder (``danqing.models.names``)."""
    out: dict[str, Path] = {}
    for folder in folders:
        root = Path(models_dir) / folder
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                if p.suffix.lower() in SUFFIXES and not fn.startswith(".") and (not names_only or inside(p, root)):
                    out.setdefault(p.stem, p)
    return out


def load_descriptor(path: Path):
    """A spandrel ``ImageModelDescriptor`` for a weight file, on the CPU in fp32.

    spandrel's ``ModelLoader`` reads ``.pth`` with a restricted unpickler and ``.safetensors``
    with safetensors; ``.pt`` files are read as state dicts only (never TorchScript, which runs
    code)."""
    spandrel = _import_spandrel()
    path = Path(path)
    loader = spandrel.ModelLoader(device="cpu", registry=_registry(spandrel))
    try:
        if path.suffix.lower() == ".pt":
            state = spandrel.canonicalize_state_dict(loader._load_pth(path))
        else:
            state = loader.load_state_dict_from_file(path)
        desc = loader.load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        extra = "" if _extra_arches() else ", which is not installed"
        raise ModelError(f"{path.name}: not an upscaler or face-restoration model that spandrel knows "
                         f"(CodeFormer files need the separate spandrel_extra_arches package{extra})") from None
    except ModelError:
        raise
    except Exception as e:  # a corrupt or foreign file: one line, the file named
        raise ModelError(f"{path.name}: cannot be read as an upscaler ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise ModelError(f"{path.name}: a {desc.architecture.name} model ({desc.purpose}), not an upscaler "
                         f"or a face-restoration model")
    return desc.float().eval()


def _extra_arches():
    """spandrel_extra_arches (CodeFormer, ...), a separate package whose CodeFormer weights come
    under a non-commercial licence: used when the user installed it (``pip install --no-deps
    spandrel-extra-arches==0.2.0``; it declares torchvision too), else None."""
    import importlib.util

    if importlib.util.find_spec("spandrel_extra_arches") is None:
        return None
    import spandrel_extra_arches

    return spandrel_extra_arches


def _registry(spandrel):
    """spandrel's main registry, plus spandrel_extra_arches' when installed (a new registry: the
    library's global one is left as it is)."""
    extra = _extra_arches()
    if extra is None:
        return spandrel.MAIN_REGISTRY
    reg = spandrel.ArchRegistry()
    reg.add(*spandrel.MAIN_REGISTRY)
    reg.add(*extra.EXTRA_REGISTRY, ignore_duplicates=True)
    return reg


# -- running a model -----------------------------------------------------------------------------

def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)[None]


def to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> PIL RGB."""
    arr = x[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.round(arr * 255).astype(np.uint8))


def upscale_tensor(fn, x: torch.Tensor, scale: int, tile: int = DEFAULT_TILE,
                   overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """Run ``fn`` ((1, C, h, w) -> (1, C, h * scale, w * scale)) over ``x`` (1, C, H, W) tile by
    tile: ``tile`` x ``tile`` pieces overlapping by ``overlap`` input pixels, the outputs blended
    with linear ramps over the overlap (scaled by ``scale``). ``tile`` 0, or a picture that fits
    one tile, runs in one piece. Returns (1, C, H * scale, W * scale) on ``x``'s device.
    """
    from danqing.editing.upscale import tile_boxes, tile_weight

    _, c, H, W = x.shape
    if tile <= 0 or (H <= tile and W <= tile):
        return fn(x)
    if not 0 <= overlap < tile // 2:
        raise InvalidRequest("overlap", f"must be between 0 and {tile // 2 - 1} pixels, got {overlap}")
    s = scale
    acc = torch.zeros((1, c, H * s, W * s), dtype=torch.float32, device=x.device)
    wsum = torch.zeros((1, 1, H * s, W * s), dtype=torch.float32, device=x.device)
    for x1, y1, x2, y2 in tile_boxes(W, H, tile, overlap):
        out = fn(x[:, :, y1:y2, x1:x2]).float()  # (1, C, (y2 - y1) * s, (x2 - x1) * s)
        wgt = torch.from_numpy(tile_weight((x2 - x1) * s, (y2 - y1) * s, overlap * s)).to(x.device)
        acc[:, :, y1 * s:y2 * s, x1 * s:x2 * s] += out * wgt
        wsum[:, :, y1 * s:y2 * s, x1 * s:x2 * s] += wgt
    return acc / wsum


def run_model(desc, img: Image.Image, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """One pass of a placed spandrel descriptor over a picture (tiled unless the model
    says tiling is not supported); the output is ``desc.scale`` times the input."""
    spandrel = _import_spandrel()
    if getattr(desc, "tiling", None) == spandrel.ModelTiling.INTERNAL:
        tile = 0
    x = to_tensor(img).to(device=desc.device, dtype=desc.dtype)
    with torch.inference_mode():
        y = upscale_tensor(desc, x, desc.scale, tile, overlap)  # the descriptor pads to size_requirements
    return to_image(y)


@dataclass(frozen=True)
class UpscalerFile:
    name: str
    path: Path


class UpscalerLibrary:
    """The upscaler and face-restoration files of a models folder. Loading, placing and caching
    the models is the ModelManager's (``load_upscaler``); this object holds no per-request state.

    Args:
        models_dir: the models folder (``settings.models_dir``).
        manager: the ModelManager that loads and places models.
    """

    def __init__(self, models_dir: Path, manager):
        self.models_dir = Path(models_dir)
        self.manager = manager

    @property
    def names_only(self) -> bool:
        """The server's names-only mode, as the manager's registry has it."""
        return bool(getattr(getattr(self.manager, "registry", None), "names_only", False))

    def names(self) -> list[str]:
        """Built-in upscalers, then the installed model upscalers."""
        from danqing.editing.upscale import BUILTIN

        return list(BUILTIN) + sorted(find_files(self.models_dir, UPSCALER_FOLDERS, names_only=self.names_only), key=str.casefold)

    def face_names(self) -> list[str]:
        return sorted(find_files(self.models_dir, FACE_FOLDERS, names_only=self.names_only), key=str.casefold)

    def file(self, name: str, *, faces: bool = False) -> Path:
        files = find_files(self.models_dir, FACE_FOLDERS if faces else UPSCALER_FOLDERS, names_only=self.names_only)
        if name not in files:
            if faces:
                raise InvalidRequest("face_restoration_model", f"unknown face-restoration model {name!r}; installed: "
                                     f"{', '.join(self.face_names()) or 'none'} (put GFPGAN files in "
                                     f"{self.models_dir / 'face_restore'})")
            raise InvalidRequest("upscaler", f"unknown upscaler {name!r}; installed: {', '.join(self.names())}")
        return files[name]

    def check(self, name: str) -> None:
        """Raise InvalidRequest unless ``name`` is a built-in or installed upscaler."""
        from danqing.editing.upscale import BUILTIN

        if name not in BUILTIN:
            self.file(name)

    def face_model_name(self, name: str | None) -> str:
        """``name`` checked, or the first installed face-restoration model when None."""
        if name is not None:
            self.file(name, faces=True)
            return name
        names = self.face_names()
        if not names:
            raise InvalidRequest("restore_faces", f"no face-restoration model is installed; put a GFPGAN file "
                                 f"(.pth or .safetensors) in {self.models_dir / 'face_restore'}")
        return names[0]

    def face_model(self, name: str):
        """The loaded face-restoration model ``name`` (a spandrel descriptor, purpose "FaceSR")."""
        desc = self.manager.load_upscaler(self.file(name, faces=True))
        if desc.purpose != "FaceSR":
            raise InvalidRequest("face_restoration_model", f"{name!r} is a {desc.architecture.name} model ({desc.purpose}), "
                                 f"not a face-restoration model")
        return desc

    def upscale(self, img: Image.Image, width: int, height: int, name: str, *, tile: int = DEFAULT_TILE,
                overlap: int = DEFAULT_OVERLAP) -> Image.Image:
        """``img`` upscaled to width x height by model ``name``: the model runs (tiled) until the
        picture is at least that large (at most ``MAX_PASSES`` times), then Lanczos resizes it to
        the exact size, as A1111 does."""
        desc = self.manager.load_upscaler(self.file(name))
        if desc.purpose == "FaceSR":
            raise InvalidRequest("upscaler", f"{name!r} is a face-restoration model; use it with restore_faces")
        out = img.convert("RGB")
        for _ in range(MAX_PASSES):
            if out.width >= width and out.height >= height:
                break
            out = run_model(desc, out, tile=tile, overlap=overlap)
            if desc.scale == 1:
                break
        return out if out.size == (width, height) else out.resize((width, height), Image.LANCZOS)
