"""Writing images with their metadata, atomically, and reading the metadata back."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from danqing.errors import ImageError
from danqing.files import atomic_save, atomic_write_text

USER_COMMENT = 0x9286  # EXIF UserComment, where A1111 writes the infotext of JPEG/WebP files
EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment belongs (piexif and A1111 put it there)


def save_png(image: Image.Image, path: Path, infotext: str, *, overwrite: bool = False) -> Path:
    """Write ``image`` as PNG with a ``parameters`` text chunk: temp file + fsync + rename.

    Parent folders are created. Raises FileExistsError (and leaves the file alone) when ``path``
    exists and not ``overwrite``; the final step is then a hard link, which fails instead of
    replacing a file that appeared meanwhile. No temp file is left behind, whatever fails.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)  # Pillow writes iTXt (UTF-8) when not Latin-1
    return atomic_save(path, lambda p: image.save(p, format="PNG", pnginfo=info), overwrite=overwrite)


def save_text(text: str, path: Path, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) as ``save_png`` writes a picture: temp file + fsync + link/rename,
    never over an existing file unless ``overwrite``."""
    return atomic_write_text(path, text, overwrite=overwrite)


def _decode_utf16(body: bytes) -> str:
    """UTF-16 of unknown byte order: a BOM decides, else where the zero bytes of ASCII text sit."""
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        return body.decode("utf-16", errors="replace")
    even_zeros = body[0::2].count(0)
    odd_zeros = body[1::2].count(0)
    codec = "utf-16-le" if odd_zeros > even_zeros else "utf-16-be"  # A1111/piexif write big-endian
    return body.decode(codec, errors="replace")


def _decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment: an 8-byte character-code prefix, then the text."""
    if isinstance(raw, str):
        return raw.rstrip("\x00")
    raw = bytes(raw)
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        text = _decode_utf16(body[: len(body) // 2 * 2])
    elif prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        text = body.decode("utf-8", errors="replace")
    else:  # no (known) prefix: the whole value is the text
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\x00")


def _user_comment(img: Image.Image) -> bytes | str | None:
    exif = img.getexif()
    raw = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    if raw is None:
        raw = exif.get(USER_COMMENT)  # some writers put it in IFD0
    return raw


def read_infotext(path: Path) -> str:
    """The generation parameters of an image: PNG ``parameters`` text or EXIF UserComment.

    Raises ImageError when the file cannot be read as an image, or carries neither.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # PNG text chunks after the image data are read only now
            text = img.info.get("parameters")
            raw = None if text else _user_comment(img)
    except Exception as exc:  # Pillow raises many kinds on damaged files
        reason = str(exc) or type(exc).__name__
        raise ImageError(f"cannot read image {path}: {reason}") from None
    if not text and raw:
        text = _decode_user_comment(raw)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not text or not text.strip():
        raise ImageError(f"{path} carries no generation parameters (no PNG 'parameters' text or EXIF UserComment)")
    return text


_COUNTER = re.compile(r"^(\d{5,})-")


def next_output_path(folder: Path, seed: int, *, ext: str = "png") -> Path:
    """A1111 naming: ``NNNNN-SEED.png``, NNNNN one more than the highest counter in ``folder``.

    A missing or empty folder starts at 00000; names without a leading counter are ignored.
    """
    folder = Path(folder)
    highest = -1
    if folder.is_dir():
        for p in folder.iterdir():
            m = _COUNTER.match(p.name)
            if m:
                highest = max(highest, int(m.group(1)))
    return folder / f"{highest + 1:05d}-{seed}.{ext.lstrip('.')}"


def atomic_save_image(image: Image.Image, path: Path, *, overwrite: bool = False) -> Path:
    """A PNG without generation parameters (canvases, masks, upscales), written as ``save_png``."""
    return save_png(image, path, "", overwrite=overwrite)
