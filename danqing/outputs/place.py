"""Where saved pictures go: a local folder or an fsspec URL (``s3://bucket/danqing``,
``memory://...``, ``file://...``), behind one set of functions.

A *location* is a ``Path`` (a local file or folder) or a URL string. Everything that saves or
reads back a generated picture -- ``Studio.generate``, the CLI's default folders, the server's
worker, its job and A1111 routes, the web UI's galleries, the Ray replicas -- goes through these
functions, so a URL works wherever a folder does. Local pictures are written by
``outputs.store`` (temp file + fsync + link), URL pictures by ``outputs.remote`` (one put for
object stores); both never overwrite and keep A1111's ``NNNNN-SEED.png`` counter.
"""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path
from typing import Union

from PIL import Image

from danqing.files import atomic_write_bytes, is_url
from danqing.outputs import remote, store

Location = Union[Path, str]


def pictures_root(settings) -> Location:
    """Where a run's pictures go: ``settings.outputs_url`` when set, else ``outputs_dir``."""
    return settings.outputs_url or settings.outputs_dir


def join(base: Location, *parts: str) -> Location:
    """``base/part/...`` for a folder or a URL."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def dated_folder(settings, kind: str) -> Location:
    """``ROOT/KIND/YYYY-MM-DD``, where A1111 puts its pictures (``txt2img-images``, ...)."""
    return join(pictures_root(settings), kind, date.today().isoformat())


def name_of(location: Location) -> str:
    """The file name at the end of a location."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def beside(location: Location, name: str) -> Location:
    """The location of ``name`` in the folder of ``location``."""
    if is_url(location):
        return str(location).rsplit("/", 1)[0] + "/" + name
    return Path(location).with_name(name)


def next_picture(folder: Location, seed, *, ext: str = "png") -> Location:
    """A1111's next name in ``folder``: ``NNNNN-SEED.EXT``, one more than the highest counter."""
    if is_url(folder):
        return remote.next_output_url(str(folder), seed, ext=ext)
    return store.next_output_path(Path(folder), seed, ext=ext)


def planned(folder: Location, seeds: list[int]) -> list[Location]:
    """A run's names: consecutive counters after the folder's highest, one per seed."""
    if not seeds:
        return []
    start = int(name_of(next_picture(folder, seeds[0])).split("-", 1)[0])
    return [join(folder, f"{start + i:05d}-{s}.png") for i, s in enumerate(seeds)]


def save_picture(image: Image.Image, location: Location, infotext: str, *, overwrite: bool = False) -> Location:
    """The PNG with its ``parameters`` text at ``location``, whole or not at all.

    Raises:
        FileExistsError: something is there already and not ``overwrite`` (nothing is written).
    """
    if is_url(location):
        return remote.save_png_url(image, str(location), infotext, overwrite=overwrite)
    return store.save_png(image, Path(location), infotext, overwrite=overwrite)


def read_bytes(location: Location) -> bytes:
    """The bytes of a saved file (a job's picture, for the API and the UI)."""
    if is_url(location):
        fs, path, _ = remote.url_fs(str(location))
        return fs.cat_file(path)
    return Path(location).read_bytes()


def open_picture(location: Location) -> Image.Image:
    """A saved picture, loaded (a URL's bytes read once)."""
    with Image.open(io.BytesIO(read_bytes(location))) as img:
        img.load()
        return img.copy() if img.mode in ("RGB", "RGBA", "L") else img.convert("RGB")


def exists(location: Location) -> bool:
    if is_url(location):
        fs, path, _ = remote.url_fs(str(location))
        return fs.exists(path)
    return Path(location).exists()


def remove(location: Location) -> None:
    """Delete a file if it is there (the pictures a cancelled or interrupted run had planned)."""
    if is_url(location):
        fs, path, _ = remote.url_fs(str(location))
        if fs.exists(path):
            fs.rm(path)
    else:
        Path(location).unlink(missing_ok=True)


def local_copy(location: Location, cache_dir: Path) -> Path:
    """A local file with the very bytes of ``location`` (itself when local): a URL's picture is
    copied once into ``cache_dir`` (the web UI shows and reads files, infotext included)."""
    if not is_url(location):
        return Path(location)
    import hashlib

    target = Path(cache_dir) / f"{hashlib.sha1(str(location).encode()).hexdigest()[:16]}-{name_of(location)}"
    if not target.exists():
        atomic_write_bytes(target, read_bytes(location), overwrite=True)
    return target
