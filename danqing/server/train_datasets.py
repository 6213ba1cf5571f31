"""Datasets uploaded as a .zip of pictures with their .txt captions, unpacked safely into
``HOME/datasets/NAME/`` for the training jobs (``server/train.py``; the Train tab's Upload and
``POST /api/v1/train/datasets``).

The standard library's ``zipfile`` reads the archive; what it leaves to the caller is checked
here, member by member, before anything is written: a path that is absolute, has a drive or a
backslash, or climbs out with ``..`` (zip slip); a symlink; a file that is not a picture, a
``.txt`` caption or a ``metadata.jsonl`` (Finder's ``__MACOSX/`` and ``.DS_Store`` are left
out); two members of one name; more than ``max_files`` files or more than ``max_bytes``
unpacked (counted while copying, not taken from the headers, so a zip bomb stops at the limit). The files are written into a hidden temporary folder beside the target,
checked as a training set (every picture readable and captioned, ``caption_folder``) and only then
renamed to ``NAME`` (``files.atomic_save_dir``): a refused or failed upload leaves nothing.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from danqing.errors import InvalidRequest
from danqing.files import atomic_save_dir, exists_message
from danqing.models.names import MAX_SHOWN, check_new_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # training.data.IMAGE_SUFFIXES (a test keeps them equal)
ALLOWED = "pictures (" + ", ".join(IMAGE_SUFFIXES) + "), .txt captions and a metadata.jsonl"
MAX_FILES = 5000                # files in one dataset upload
MAX_BYTES = 1024 * 1024 * 1024  # unpacked bytes of one dataset upload
CHUNK = 1 << 20


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """A member's path inside the dataset folder, or a refusal naming the member."""
    name = info.filename
    shown = name[:MAX_SHOWN]
    parts = PurePosixPath(name).parts
    if (name.startswith("/") or "\\" in name or (parts and ":" in parts[0]) or ".." in parts
            or any(p in ("", ".") for p in name.rstrip("/").split("/"))):
        raise InvalidRequest("file", f"{shown!r}: a member path must stay inside the dataset folder (no absolute "
                                     f"paths, drives, backslashes or '..')")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InvalidRequest("file", f"{shown!r} is a symlink; the archive may hold {ALLOWED} only")
    path = PurePosixPath(name)
    if not info.is_dir() and path.suffix.lower() not in (*IMAGE_SUFFIXES, ".txt") and path.name != "metadata.jsonl":
        raise InvalidRequest("file", f"{shown!r}: not allowed; the archive may hold {ALLOWED} only")
    return path


def _finder_litter(name: str) -> bool:
    """What macOS's Finder adds to every archive it makes (``__MACOSX/``, ``.DS_Store``): left out."""
    return name.startswith("__MACOSX/") or PurePosixPath(name).name == ".DS_Store"


def unpack_dataset(archive: str | Path | BinaryIO, folder: str | Path, *, max_files: int = MAX_FILES,
                   max_bytes: int = MAX_BYTES) -> dict:
    """Unpack a .zip of captioned pictures into the new folder ``folder`` (all or nothing).

    Args:
        archive: the .zip (a path or a binary file object).
        folder: the dataset folder to create (``HOME/datasets/NAME``); it must not exist.
        max_files, max_bytes: most files, most unpacked bytes.

    Returns:
        {"images": N, "captions": M, "bytes": B}.

    Raises:
        InvalidRequest: ``file`` (not a zip, a refused member, over a limit, not a training set:
            unreadable or uncaptioned pictures) or ``name`` (the folder exists).
    """
    from danqing.training.data import caption_folder  # imports torch: loaded by the first upload

    folder = Path(folder)
    if folder.exists():
        raise InvalidRequest("name", f"dataset {folder.name!r} exists; pick a new name")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise InvalidRequest("file", f"not a .zip archive; upload a .zip of {ALLOWED}") from None
    with zf:
        members = [(info, _member_path(info)) for info in zf.infolist() if not _finder_litter(info.filename)]
        files = [(info, path) for info, path in members if not info.is_dir()]
        if len(files) > max_files:
            raise InvalidRequest("file", f"{len(files)} files: more than the limit of {max_files} per dataset")
        seen: set[str] = set()
        for _, path in files:
            key = path.as_posix().casefold()
            if key in seen:
                raise InvalidRequest("file", f"{path.as_posix()[:MAX_SHOWN]!r} is in the archive twice")
            seen.add(key)
        if not files:
            raise InvalidRequest("file", f"the archive is empty; upload a .zip of {ALLOWED}")
        written = {"bytes": 0}

        def write(tmp: Path) -> None:
            for info, path in files:
                target = tmp.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "xb") as dst:
                        while block := src.read(CHUNK):
                            written["bytes"] += len(block)
                            if written["bytes"] > max_bytes:
                                raise InvalidRequest("file", f"more than the limit of {max_bytes} bytes unpacked")
                            dst.write(block)
                except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as exc:  # damaged, encrypted
                    raise InvalidRequest("file", f"{path.as_posix()[:MAX_SHOWN]!r}: unreadable member "
                                                 f"({type(exc).__name__})") from None
            try:
                caption_folder(tmp)  # every picture readable and captioned, or the whole upload is refused
            except InvalidRequest as exc:
                raise InvalidRequest("file", str(exc).removeprefix(f"{exc.field}: ").replace(str(tmp), folder.name)) \
                    from None

        try:
            atomic_save_dir(folder, write)
        except FileExistsError:
            raise InvalidRequest("name", exists_message(folder)) from None
    images = sum(p.suffix.lower() in IMAGE_SUFFIXES for _, p in files)
    return {"images": images, "captions": sum(p.suffix.lower() == ".txt" for _, p in files),
            "bytes": written["bytes"]}


def new_dataset(datasets_dir: Path, name: object, archive: str | Path | BinaryIO, **limits) -> dict:
    """``unpack_dataset`` into ``datasets_dir/NAME`` for a checked new name; the answer names it."""
    name = check_new_name(name, "name", "dataset")
    datasets_dir.mkdir(parents=True, exist_ok=True)
    return {"dataset": name, **unpack_dataset(archive, datasets_dir / name, **limits)}
