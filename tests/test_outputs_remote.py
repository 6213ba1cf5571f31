"""Pictures written under an fsspec URL (danqing.outputs.remote): memory:// (a stand-in for an
object store: one put) and file:// (local: temp file + rename); the PNG keeps its infotext, the
A1111 counter continues, the listing finds them, nothing is half-written or overwritten."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from PIL import Image

from danqing.errors import ImageError
from danqing.outputs import remote
from danqing.outputs.infotext import parse_infotext
from danqing.outputs.remote import (is_url, list_pictures, next_output_url, read_infotext_url, save_png_url,
                                    write_bytes_url)

TEXT = "a red circle, 一个红色的圆形\nNegative prompt: blur\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64"


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(params=["memory", "memory-move", "file"])
def folder(request, tmp_path, monkeypatch):
    """An outputs folder URL: memory:// published by one put (as object stores), memory:// by a
    temp name and a move (as filesystems other than local and object stores), and file://."""
    if request.param == "memory-move":
        monkeypatch.setitem(remote.PUBLISH, "memory", "move")
    if request.param.startswith("memory"):
        url = f"memory://danqing-{uuid.uuid4().hex}/txt2img-images/2026-01-01"
        yield url
        import fsspec

        fs = fsspec.filesystem("memory")
        fs.rm(url.split("://", 1)[1].split("/")[0], recursive=True)
    else:
        yield f"file://{tmp_path}/txt2img-images/2026-01-01"


def _read_image(url: str) -> Image.Image:
    import io

    import fsspec

    with fsspec.open(url, "rb") as f:
        return Image.open(io.BytesIO(f.read())).convert("RGB")


def test_pictures_round_trip_with_their_infotext_and_counter(folder):
    written = []
    for seed in (5, 6, 7):
        url = next_output_url(folder, seed)
        written.append(save_png_url(_picture(seed), url, TEXT.replace("Seed: 5", f"Seed: {seed}")))
    assert [u.rsplit("/", 1)[-1] for u in written] == ["00000-5.png", "00001-6.png", "00002-7.png"]
    for seed, url in zip((5, 6, 7), written):
        assert np.array_equal(np.asarray(_read_image(url)), np.asarray(_picture(seed)))  # lossless
        assert parse_infotext(read_infotext_url(url))[2]["Seed"] == str(seed)
    listed = list_pictures(folder.rsplit("/", 2)[0])  # the history: every picture under the outputs root
    assert [u.rsplit("/", 1)[-1] for u in listed] == ["00000-5.png", "00001-6.png", "00002-7.png"]
    assert all(is_url(u) for u in listed)
    assert parse_infotext(read_infotext_url(listed[1]))[:2] == ("a red circle, 一个红色的圆形", "blur")


def test_an_existing_file_is_never_overwritten_and_no_temp_is_left(folder):
    url = save_png_url(_picture(1), next_output_url(folder, 1), TEXT)
    with pytest.raises(FileExistsError, match="already exists"):
        save_png_url(_picture(2), url, TEXT)
    assert np.array_equal(np.asarray(_read_image(url)), np.asarray(_picture(1)))
    import fsspec

    fs, path = fsspec.core.url_to_fs(folder)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] == ["00000-1.png"]  # no temp file


def test_a_failed_write_leaves_nothing(folder, monkeypatch):
    """A write that fails part way leaves no file under the name (nor a temp file)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(folder)
    url = f"{folder}/00000-1.png"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    if folder.startswith("file://"):  # the last step, the link or rename, fails
        import danqing.files as files

        monkeypatch.setattr(files.os, "replace", broken)
        monkeypatch.setattr(files.os, "link", broken)
    elif remote.PUBLISH["memory"] == "move":  # the move of the finished temp file fails
        monkeypatch.setattr(type(fs), "mv", broken)
    else:  # the put fails
        monkeypatch.setattr(type(fs), "pipe_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_url(url, b"\x89PNG whole picture")
    assert not fs.exists(path + "/00000-1.png")
    assert not fs.isdir(path) or fs.ls(path, detail=False) == []


def test_a_picture_without_parameters_is_one_clear_error(folder):
    url = write_bytes_url(f"{folder}/00000-1.png", b"not a png")
    with pytest.raises(ImageError, match="cannot read image"):
        read_infotext_url(url)


def test_urls_and_paths_are_told_apart():
    assert is_url("s3://bucket/danqing") and is_url("memory://x") and is_url("file:///tmp/x")
    assert not is_url("/tmp/outputs") and not is_url("outputs") and not is_url("C:\\outputs")
