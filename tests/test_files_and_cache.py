"""The shared mechanisms: atomic writes (danqing/danqing/files.py), the LRU cache
(danqing/cache.py) and the table of editing infotext fields (outputs/metadata.py)."""

from __future__ import annotations

import os
import stat
import sys
import threading

import pytest

from danqing.cache import LRUCache, file_key
from danqing.files import atomic_save, atomic_save_dir, atomic_write_bytes, atomic_write_text
from danqing.outputs.metadata import EDITING_FIELDS, request_from_infotext, request_infotext
from danqing.request import GenerationRequest
from danqing.sampling.samplers import resolve_schedule


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
def test_write_refuse_and_overwrite(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "first")
    assert path.read_text() == "first"
    with pytest.raises(FileExistsError, match=r"a\.txt already exists; danqing never overwrites, pick another name"):
        atomic_write_bytes(path, b"second")
    assert path.read_text() == "first"
    atomic_write_bytes(path, b"second", overwrite=True)
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["a.txt"]  # no temporary file left


def test_a_failing_writer_leaves_nothing(tmp_path):
    def broken(p):
        p.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save(tmp_path / "a.bin", broken)
    with pytest.raises(RuntimeError):
        atomic_save_dir(tmp_path / "d", lambda p: broken(p / "x"))
    assert os.listdir(tmp_path) == []


def test_file_that_appears_meanwhile_is_never_replaced(tmp_path):
    target = tmp_path / "a.bin"

    def writer(p):
        p.write_bytes(b"ours")
        target.write_bytes(b"theirs")  # another process wins the race

    with pytest.raises(FileExistsError):
        atomic_save(target, writer)
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["a.bin"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_modes_are_not_private_and_replacing_keeps_the_mode(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    os.chmod(path, 0o640)
    atomic_write_text(path, "y", overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_folders(tmp_path):
    def write(p):
        (p / "model.json").write_text("{}")

    folder = atomic_save_dir(tmp_path / "m", write)
    assert os.listdir(folder) == ["model.json"]
    with pytest.raises(FileExistsError):
        atomic_save_dir(folder, write)
    atomic_save_dir(folder, lambda p: (p / "other.json").write_text("{}"), overwrite=True)
    assert os.listdir(folder) == ["other.json"] and os.listdir(tmp_path) == ["m"]


# ---------------------------------------------------------------------------------------------
# LRU
# ---------------------------------------------------------------------------------------------
def test_lru_keeps_the_most_recently_used():
    evicted = []
    cache = LRUCache(2, on_evict=lambda k, v: evicted.append((k, v)))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert evicted == [("b", 2)] and cache.keys() == ["a", "c"]
    assert cache.get("b") is None and cache.get("b", "none") == "none"
    assert cache.pop("a") == 1 and evicted[-1] == ("a", 1)
    cache.clear()
    assert len(cache) == 0 and evicted[-1] == ("c", 3)
    with pytest.raises(ValueError):
        LRUCache(0)


def test_get_or_load_loads_once_per_key():
    calls = []
    cache = LRUCache(4)
    for _ in range(3):
        assert cache.get_or_load("k", lambda: calls.append(1) or "v") == "v"
    assert calls == [1] and "k" in cache


def test_lru_threads():
    cache = LRUCache(8)

    def work(i):
        for j in range(200):
            cache.get_or_load((i, j % 10), lambda: j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 8


def test_file_key_changes_when_the_file_does(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"1")
    k1 = file_key(p)
    p.write_bytes(b"22")
    assert file_key(p) != k1 and file_key(p)[0] == str(p)


# ---------------------------------------------------------------------------------------------
# Editing fields of the infotext: one table, read back to the same request
# ---------------------------------------------------------------------------------------------
REQUESTS = [
    dict(init_image="/x/i.png", denoising_strength=0.5),
    dict(init_image="/x/i.png", resize_mode="crop and resize", image_cfg_scale=1.2, mask="/x/m.png", mask_blur=3,
         inpainting_fill="fill", inpaint_full_res=True, inpaint_full_res_padding=40, inpainting_mask_invert=True),
    dict(init_image="/x/i.png", mask="/x/m.png"),
    dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4, hr_upscaler="Lanczos", hr_sampler_name="Euler",
         hr_prompt="b, c", hr_negative_prompt="n"),
    dict(enable_hr=True, hr_resize_x=640, hr_resize_y=448),
    dict(p2p_source="a c", p2p_reweight=(("b", 1.5),), p2p_local_blend=True, p2p_features=0.5, p2p_cross=(0.1, 0.7),
         p2p_self=(0.0, 0.3)),
    dict(p2p_source="a c", init_image="/x/i.png", sampler="DDIM", null_text_iterations=3),
]


@pytest.mark.parametrize("fields", REQUESTS)
def test_editing_fields_round_trip(fields):
    sampler = fields.get("sampler", "DPM++ 2M")
    r = GenerationRequest.create(prompt="a b", model="m", seed=1, schedule=resolve_schedule(sampler, "Automatic"), **fields)
    text = request_infotext(r, seed=1, subseed=None, model_name="m", model_hash="0123456789ab")
    assert request_from_infotext(text) == r


def test_the_table_names_each_key_once_and_real_fields():
    keys = [row[0] for row in EDITING_FIELDS]
    assert len(keys) == len(set(keys))
    for _, names, *_ in EDITING_FIELDS:
        for name in names if isinstance(names, tuple) else (names,):
            assert name in GenerationRequest.model_fields
