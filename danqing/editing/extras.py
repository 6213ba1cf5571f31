"""Upscaling one picture as A1111's "Extras" tab does: a picture or model upscaler, optionally SD
upscale (img2img tile by tile), then face restoration. The CLI's ``danqing upscale`` is a shell
over ``check_upscale`` + ``upscale_picture``; a server route would call the same two."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from danqing.editing.faces import restore_faces as restore
from danqing.editing.upscale import sd_upscale, upscale_image
from danqing.errors import DanqingError, InvalidRequest
from danqing.outputs.infotext import parse_infotext
from danqing.outputs.store import read_infotext
from danqing.request import GenerationRequest


@dataclass(frozen=True)
class UpscaleOptions:
    """What to do with the picture, with the defaults of ``danqing upscale``.

    Attributes:
        scale: factor, 1-16.
        upscaler: Lanczos, Nearest, or an installed model upscaler (``studio.upscalers``).
        upscaler_tile / upscaler_overlap: model upscalers' tiles, in input pixels (0 = no tiling).
        restore_faces: an installed face-restoration model, run after upscaling; None = none.
        face_visibility: 0 keeps the picture, 1 the restored faces.
        sd: SD upscale: img2img every ``tile`` x ``tile`` piece (``overlap`` pixels shared) with
            ``prompt`` at ``strength``, ``steps``, seed + i for tile i, checkpoint ``model``.
    """

    scale: float = 2.0
    upscaler: str = "Lanczos"
    upscaler_tile: int = 256
    upscaler_overlap: int = 32
    restore_faces: Optional[str] = None
    face_visibility: float = 1.0
    sd: bool = False
    prompt: str = ""
    tile: int = 512
    overlap: int = 64
    strength: float = 0.3
    steps: int = 20
    seed: int = 0
    model: Optional[str] = None


def check_upscale(studio, options: UpscaleOptions) -> None:
    """Refuse bad options before any work: ranges, and unknown upscaler or face-model names
    (the message lists the installed ones)."""
    if not 1 <= options.scale <= 16:
        raise InvalidRequest("scale", f"must be between 1 and 16, got {options.scale:g}")
    if not 0 <= options.face_visibility <= 1:
        raise InvalidRequest("face_visibility", f"must be between 0 and 1, got {options.face_visibility:g}")
    studio.upscalers.check(options.upscaler)
    if options.restore_faces is not None:
        studio.upscalers.file(options.restore_faces, faces=True)


def picture_prompt(path: Path) -> str:
    """The prompt in a picture's own metadata, or "" when it carries none."""
    try:
        return parse_infotext(read_infotext(path))[0]
    except DanqingError:
        return ""


def upscale_picture(studio, image: Image.Image, options: UpscaleOptions, *,
                    on_tile: Callable[[int, int], None] | None = None) -> tuple[Image.Image, list[str]]:
    """The upscaled (and face-restored) picture, with warnings from face restoration.

    Args:
        studio: the ``Studio`` (its upscalers, and its ``generate`` for SD upscale).
        on_tile: SD upscale progress, called with (tile done, tiles).
    """
    check_upscale(studio, options)
    if options.sd:
        req = GenerationRequest.create(prompt=options.prompt, steps=options.steps, seed=options.seed,
                                       denoising_strength=options.strength, model=options.model,
                                       width=options.tile, height=options.tile)
        result = sd_upscale(studio, image, req, scale=options.scale, tile=options.tile, overlap=options.overlap,
                            upscaler=options.upscaler, on_tile=on_tile)
    else:
        result = upscale_image(image, int(image.width * options.scale), int(image.height * options.scale),
                               options.upscaler, studio.upscalers, tile=options.upscaler_tile,
                               overlap=options.upscaler_overlap)
    warnings: list[str] = []
    if options.restore_faces is not None:
        result, warnings = restore(result, studio.upscalers.face_model(options.restore_faces),
                                   visibility=options.face_visibility)
    return result, warnings
