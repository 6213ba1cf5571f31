"""Writing images with their metadata, atomically, and reading the metadata back."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from danqing.errors import ImageError

USER_COMMENT = 0x9286  # EXIF UserComment, where A1111 writes the infotext of JPEG/WebP files
EXIF_IFD = 0x8769


def save_png(image: Image.Image, path: Path, infotext: str, *, overwrite: bool = False) -> Path:
    """Write ``image`` as PNG with a tEXt ``parameters`` chunk: temp file + fsync + rename.

    Raises FileExistsError (and leaves the file alone) when ``path`` exists and not ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; danqing never overwrites, pick another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} already exists; danqing never overwrites, pick another name")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _decode_user_comment(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    if raw.startswith(b"UNICODE\x00"):
        body = raw[8:]
        return body.decode("utf-16-be" if body[:1] == b"\x00" or len(body) < 2 else "utf-16-be", errors="replace")
    if raw.startswith(b"ASCII\x00\x00\x00"):
        raw = raw[8:]
    return raw.decode("utf-8", errors="replace")


def read_infotext(path: Path) -> str:
    """The generation parameters of an image: PNG ``parameters`` text or EXIF UserComment."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            text = img.info.get("parameters")
            if not text:
                exif = img.getexif().get_ifd(EXIF_IFD)
                raw = exif.get(USER_COMMENT) or img.getexif().get(USER_COMMENT)
                text = _decode_user_comment(raw) if raw else None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None
    if not text:
        raise ImageError(f"{path} carries no generation parameters (no PNG 'parameters' text or EXIF UserComment)")
    return text


_COUNTER = re.compile(r"^(\d{5})-")


def next_output_path(folder: Path, seed: int, *, ext: str = "png") -> Path:
    """A1111 naming: ``NNNNN-SEED.png`` with NNNNN one more than the highest counter present."""
    folder = Path(folder)
    highest = -1
    if folder.is_dir():
        for p in folder.iterdir():
            m = _COUNTER.match(p.name)
            if m:
                highest = max(highest, int(m.group(1)))
    return folder / f"{highest + 1:05d}-{seed}.{ext}"
