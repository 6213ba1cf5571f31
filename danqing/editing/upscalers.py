"""Model upscalers and face restorers from user-provided weight files, through spandrel.

Files (``.pth``, ``.pt``, ``.safetensors``) are looked for in these folders of the models
folder; the name is the file's stem (the first folder in this order wins a clash):

    upscalers/  ESRGAN/  RealESRGAN/  SwinIR/  DAT/  HAT/     super-resolution models
    face_restore/  GFPGAN/  Codeformer/                       face restoration models

spandrel (https://github.com/chaiNNer-org/spandrel) reads the architecture and its
hyper-parameters from the state dict (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, GFPGAN, ...), so
no network is written by hand. Loading a file is ``danqing.models.upscalers``'; placing and
caching the models is the ModelManager's (``load_upscaler``).

Tiling (``upscale_tensor``): the picture is cut into ``tile`` x ``tile`` pieces overlapping by
``overlap`` pixels (``tile_boxes``), each is run through the model and the outputs are blended
with linear ramps over the overlap (``tile_weight``), so memory depends on the tile, not on the
picture. SD upscale (``danqing.editing.upscale``) tiles the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from danqing.errors import InvalidRequest
from danqing.models.names import inside
from danqing.models.upscalers import import_spandrel

BUILTIN = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}  # the upscalers without a model file
UPSCALER_FOLDERS = ("upscalers", "ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT")
FACE_FOLDERS = ("face_restore", "GFPGAN", "Codeformer")
SUFFIXES = (".pth", ".pt", ".safetensors")
DEFAULT_TILE, DEFAULT_OVERLAP = 256, 32  # input pixels; A1111's ESRGAN_tile is 192, overlap 8
MAX_PASSES = 3  # as A1111: a x4 model runs twice for x8, and Lanczos takes it to the exact size


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


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles of tile x tile covering width x height, each overlapping its neighbours by at least
    ``overlap`` pixels; the last row/column is moved in to end at the edge."""
    def starts(total: int) -> list[int]:
        if total <= tile:
            return [0]
        step = tile - overlap
        n = -(-(total - overlap) // step)
        return [min(i * step, total - tile) for i in range(n)]

    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in starts(height) for x in starts(width)]


def tile_weight(w: int, h: int, overlap: int) -> np.ndarray:
    """A tile's blend weight: 1 inside, ramping linearly to ~0 over ``overlap`` pixels at the edges."""
    if overlap <= 0:
        return np.ones((h, w), np.float32)
    rx = np.minimum(np.arange(w) + 1, np.arange(w)[::-1] + 1) / (overlap + 1)
    ry = np.minimum(np.arange(h) + 1, np.arange(h)[::-1] + 1) / (overlap + 1)
    return np.clip(np.outer(ry, rx), 0, 1).astype(np.float32)


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
    spandrel = import_spandrel()
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
        return list(BUILTIN) + sorted(find_files(self.models_dir, UPSCALER_FOLDERS, names_only=self.names_only),
                                      key=str.casefold)

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
