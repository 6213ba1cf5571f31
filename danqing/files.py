"""Atomic file writes: the one way danqing puts a file (or a folder) on disk.

Every writer -- pictures with their infotext, model files, embeddings, LoRA files, training
folders, caches -- goes through ``atomic_save`` (a file) or ``atomic_save_dir`` (a folder):

1. the content is written to a hidden temporary name beside the target
   (``.NAME.XXXXXXXX.tmp``), so a reader never sees half a file and a crash leaves only a
   temporary name behind (the job queue removes those on start);
2. the file is flushed to disk (``fsync``), then moved into place; without ``overwrite`` the
   move is a hard link, which fails instead of replacing a file that appeared meanwhile
   (where links are unsupported, FAT or some network drives: check, then rename);
3. the folder entry itself is flushed (best effort).

An existing target is never replaced unless the caller passes ``overwrite=True``; the refusal is a
``FileExistsError`` whose message says what to do. No temporary file is left behind, whatever
fails.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["atomic_save", "atomic_save_dir", "atomic_write_bytes", "atomic_write_text", "exists_message", "publish"]


def is_url(location) -> bool:
    """Whether ``location`` names a place by URL (``scheme://...``, fsspec) rather than a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(location)) is not None


def exists_message(path: Path) -> str:
    """The one-line refusal for a target that exists."""
    return f"{path} already exists; danqing never overwrites, pick another name"


def _temp_name(folder: Path, name: str) -> Path:
    return folder / f".{name}.{secrets.token_hex(4)}.tmp"


def _new_temp_file(folder: Path, name: str) -> Path:
    """A new, empty hidden file beside the target. It is created with mode 0666 and the kernel
    applies the process umask, so it gets the mode a plain ``open()`` would give (``tempfile``
    makes private 0600 files, and the umask can only be read by setting it, which would race
    with other threads)."""
    for _ in range(100):
        tmp = _temp_name(folder, name)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"cannot create a temporary file in {folder}")


def _new_temp_dir(folder: Path, name: str) -> Path:
    """A new hidden folder beside the target (mode 0777 less the umask, as ``mkdir`` gives)."""
    for _ in range(100):
        tmp = _temp_name(folder, name)
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"cannot create a temporary folder in {folder}")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort; not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path, overwrite: bool = False) -> None:
    """Move a finished temporary file ``tmp`` to ``path`` (same folder); without ``overwrite``
    never replace an existing file, even one that appeared after the caller's own check.
    ``tmp`` may remain (after a hard link): the caller removes it."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and refuses to replace a file that appeared meanwhile
    except FileExistsError:
        raise FileExistsError(exists_message(path)) from None
    except OSError as exc:  # no hard links here: check + rename
        if exc.errno == errno.EEXIST or path.exists():
            raise FileExistsError(exists_message(path)) from None
        os.replace(tmp, path)


def _target(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` checked (refused when it exists and not ``overwrite``), its folder created."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(exists_message(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Write a file with ``writer(temporary path)``, then move it to ``path`` atomically.

    Args:
        path: the target file; its parent folders are created.
        writer: writes the whole content to the path it is given (e.g.
            ``lambda p: save_file(tensors, str(p))``); the file exists, empty, when it is called.
        overwrite: replace an existing ``path`` (keeping its permission bits); default: refuse.

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false (nothing is written).
    """
    path = _target(path, overwrite)
    tmp = _new_temp_file(path.parent, path.name)
    try:
        if overwrite and path.exists():  # keep the mode of the file being replaced
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        writer(tmp)
        _fsync_file(tmp)
        publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)  # after a link: the extra name; after a replace: already gone
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """``data`` as the whole content of ``path``, written as ``atomic_save`` writes."""
    return atomic_save(path, lambda p: p.write_bytes(data), overwrite=overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """``text`` (UTF-8) as the whole content of ``path``, written as ``atomic_save`` writes."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_save_dir(path: str | os.PathLike, writer: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Write a folder with ``writer(temporary folder)`` (e.g. ``module.save_pretrained``), then
    rename it to ``path``.

    With ``overwrite`` an existing ``path`` is removed just before the rename (a reader may then
    briefly find no folder, never a half-written one); without it an existing ``path`` is refused.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false (nothing is written).
    """
    path = _target(path, overwrite)
    tmp = _new_temp_dir(path.parent, path.name)
    try:
        writer(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(exists_message(path))
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when something failed
    _fsync_dir(path.parent)
    return path
