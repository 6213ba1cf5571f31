"""Pictures written under an fsspec URL (``s3://bucket/danqing/...``, ``memory://...``,
``file://...``), by the same rule as local files: a reader sees the whole file or none of it.

How each filesystem gets there is a table (``PUBLISH``): local files go through
``danqing.files`` (temp file + fsync + link/rename); object stores take one put of the finished
bytes, which they publish whole; any other filesystem gets a temp name beside the target and a
move.
"""

from __future__ import annotations

import io
import re
import uuid

from PIL import Image, PngImagePlugin

from danqing.errors import ImageError
from danqing.files import atomic_write_bytes, exists_message, is_url  # noqa: F401 -- is_url: this module's users

# fsspec protocol -> how a finished file is published; protocols not listed: "move"
PUBLISH = {
    "file": "local", "local": "local",
    "s3": "put", "s3a": "put", "gs": "put", "gcs": "put", "az": "put", "abfs": "put", "abfss": "put",
    "memory": "put",
}
_COUNTER = re.compile(r"^(\d{5,})-")


def url_fs(url: str):
    """(filesystem, path inside it, its protocol) of ``url``."""
    import fsspec  # lazy: only URL outputs need it

    fs, path = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return fs, path, protocol


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    """``image`` as PNG with a ``parameters`` text chunk (as ``store.save_png`` writes it)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_bytes_url(url: str, data: bytes, *, overwrite: bool = False) -> str:
    """Write ``data`` at ``url``, whole or not at all (``PUBLISH``); parent folders are created.

    Raises:
        FileExistsError: ``url`` exists and not ``overwrite`` (nothing is written).
    """
    fs, path, protocol = url_fs(url)
    how = PUBLISH.get(protocol, "move")
    if how == "local":
        atomic_write_bytes(path, data, overwrite=overwrite)
        return url
    if not overwrite and fs.exists(path):
        raise FileExistsError(exists_message(url))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if how == "put":
        fs.pipe_file(path, data)  # one put: the object appears with all its bytes
        return url
    tmp = f"{parent}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp" if parent else f".{path}.{uuid.uuid4().hex}.tmp"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return url


def save_png_url(image: Image.Image, url: str, infotext: str, *, overwrite: bool = False) -> str:
    """``store.save_png`` for a URL: the PNG with its infotext, whole or not at all."""
    return write_bytes_url(url, png_bytes(image, infotext), overwrite=overwrite)


def next_output_url(folder: str, seed: int, *, ext: str = "png") -> str:
    """A1111 naming under a URL folder: ``NNNNN-SEED.png``, one more than the highest counter."""
    fs, path, _ = url_fs(folder)
    highest = -1
    if fs.isdir(path):
        for entry in fs.ls(path, detail=False):
            m = _COUNTER.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                highest = max(highest, int(m.group(1)))
    return f"{folder.rstrip('/')}/{highest + 1:05d}-{seed}.{ext.lstrip('.')}"


def list_pictures(folder: str) -> list[str]:
    """The URLs of the pictures (``.png``) under a URL folder, oldest counter first (the history)."""
    fs, path, _ = url_fs(folder)
    if not fs.isdir(path):
        return []
    found = [p for p in fs.find(path) if p.endswith(".png") and not p.rsplit("/", 1)[-1].startswith(".")]
    return [fs.unstrip_protocol(p) for p in sorted(found, key=lambda p: p.rsplit("/", 1)[-1])]


def read_infotext_url(url: str) -> str:
    """The ``parameters`` text of a PNG under a URL (``store.read_infotext`` for URLs)."""
    fs, path, _ = url_fs(url)
    try:
        with Image.open(io.BytesIO(fs.cat_file(path))) as img:
            img.load()
            text = img.info.get("parameters")
    except Exception as exc:  # fsspec and Pillow raise many kinds
        raise ImageError(f"cannot read image {url}: {str(exc) or type(exc).__name__}") from None
    if not text:
        raise ImageError(f"{url} carries no generation parameters (no PNG 'parameters' text)")
    return text
