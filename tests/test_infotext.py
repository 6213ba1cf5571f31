"""A1111 infotext format and atomic PNG saving."""

from __future__ import annotations

import os
import stat
import sys

import pytest
from conftest import need
from PIL import Image, features

from danqing.errors import ImageError
from danqing.outputs.infotext import format_infotext, parse_infotext, short_hash, split_legacy_sampler
from danqing.outputs.store import next_output_path, read_infotext, save_png

# Built by hand from the format in docs/a1111.md: prompt, "Negative prompt: ...", one "Key: value, ..." line.
A1111_EXAMPLE = (
    "a cat\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"
)
PARAMS = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1, "Size": "512x512",
          "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "VAE": None, "Clip skip": ""}

# What A1111 1.6 writes for a hires-fix image with a LoRA and an embedding (pre-1.9: schedule in the sampler).
A1111_REAL = (
    "masterpiece, best quality, 1girl, (red hair:1.2), <lora:add_detail:0.8>\n"
    "Negative prompt: (worst quality, low quality:1.4), easynegative\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    "Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "name: abc123, other: def456", TI hashes: "easynegative: c74b4e810b03", Version: v1.6.0'
)

SAMPLERS = ["DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DPM2 a", "Euler a", "Euler"]
SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform"]


# --- format ---------------------------------------------------------------------------------------

def test_format_matches_a1111_example():
    assert format_infotext("a cat", "blurry", PARAMS) == A1111_EXAMPLE


def test_format_drops_empty_values_and_writes_floats_like_a1111():
    text = format_infotext("a cat", "", {"Steps": 5, "CFG scale": 6.5, "Denoising strength": 0.75, "Seed": 2,
                                         "Variation seed strength": 1.0, "VAE": None, "VAE hash": ""})
    assert text == "a cat\nSteps: 5, CFG scale: 6.5, Denoising strength: 0.75, Seed: 2, Variation seed strength: 1"


def test_format_without_negative_prompt_has_no_negative_line():
    text = format_infotext("a cat", "", {"Steps": 20, "Seed": 1, "Size": "512x512"})
    assert text == "a cat\nSteps: 20, Seed: 1, Size: 512x512"
    assert "Negative prompt" not in text
    assert parse_infotext(text) == ("a cat", "", {"Steps": "20", "Seed": "1", "Size": "512x512"})


def test_format_without_parameters_has_no_trailing_line():
    assert format_infotext("a cat", "blurry", {"VAE": None}) == "a cat\nNegative prompt: blurry"


# --- quoting ---------------------------------------------------------------------------------------

def test_values_with_commas_colons_quotes_and_newlines_are_quoted():
    text = format_infotext("p", "", {
        "Steps": 1,
        "Lora hashes": "a: 123, b: 456",
        "Note": 'say "hi"',
        "Colon": "12:30",
        "Comma": "x, y",
        "Lines": "one\ntwo",
        "Chinese": "猫，狗",
        "Seed": 3,
    })
    last = text.split("\n")[-1]
    assert text.count("\n") == 1  # a quoted newline stays on the parameter line
    assert 'Lora hashes: "a: 123, b: 456"' in last
    assert r'Note: "say \"hi\""' in last
    assert 'Colon: "12:30"' in last and 'Comma: "x, y"' in last
    assert r'Lines: "one\ntwo"' in last
    assert "Chinese: 猫，狗" in last  # the full-width comma needs no quoting; no \u escapes
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative) == ("p", "")
    assert params == {"Steps": "1", "Lora hashes": "a: 123, b: 456", "Note": 'say "hi"', "Colon": "12:30",
                      "Comma": "x, y", "Lines": "one\ntwo", "Chinese": "猫，狗", "Seed": "3"}


# --- parse -----------------------------------------------------------------------------------------

def test_parse_a1111_example():
    prompt, negative, params = parse_infotext(A1111_EXAMPLE)
    assert (prompt, negative) == ("a cat", "blurry")
    assert params == {"Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "1",
                      "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly"}
    assert list(params) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model"]


def test_multiline_prompts_round_trip():
    text = format_infotext("line one\nline two\n  indented three", "bad\nworse", PARAMS)
    assert text.startswith("line one\nline two\n  indented three\nNegative prompt: bad\nworse\nSteps: 20, ")
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative) == ("line one\nline two\n  indented three", "bad\nworse")
    assert params["Model"] == "v1-5-pruned-emaonly" and params["CFG scale"] == "7"


def test_multiline_prompt_without_negative_round_trip():
    text = format_infotext("first\nsecond", "", {"Steps": 4, "Seed": 9, "Size": "64x64"})
    assert parse_infotext(text) == ("first\nsecond", "", {"Steps": "4", "Seed": "9", "Size": "64x64"})


def test_last_line_needs_three_pairs():
    prompt, negative, params = parse_infotext("a cat\nstyle: anime, mood: calm")
    assert (prompt, negative, params) == ("a cat\nstyle: anime, mood: calm", "", {})
    prompt, negative, params = parse_infotext("a cat\nNegative prompt: dog\nstyle: anime, mood: calm")
    assert (prompt, negative, params) == ("a cat", "dog\nstyle: anime, mood: calm", {})


def test_prompt_only_and_empty_text():
    assert parse_infotext("just a prompt") == ("just a prompt", "", {})
    assert parse_infotext("") == ("", "", {})


def test_negative_prompt_marker_only_counts_at_line_start():
    text = "a sign saying Negative prompt: none\nSteps: 1, Seed: 2, Size: 8x8"
    assert parse_infotext(text) == ("a sign saying Negative prompt: none", "", {"Steps": "1", "Seed": "2", "Size": "8x8"})


def test_windows_line_endings_and_trailing_newline():
    text = "a cat\r\nNegative prompt: blurry\r\nSteps: 20, Seed: 1, Size: 512x512\r\n"
    assert parse_infotext(text) == ("a cat", "blurry", {"Steps": "20", "Seed": "1", "Size": "512x512"})


def test_parse_real_a1111_infotext_with_lora_hashes():
    prompt, negative, params = parse_infotext(A1111_REAL)
    assert prompt == "masterpiece, best quality, 1girl, (red hair:1.2), <lora:add_detail:0.8>"
    assert negative == "(worst quality, low quality:1.4), easynegative"
    assert params["Lora hashes"] == "name: abc123, other: def456"
    assert params["TI hashes"] == "easynegative: c74b4e810b03"
    assert params["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert params["Sampler"] == "DPM++ 2M Karras"
    assert params["Denoising strength"] == "0.45" and params["Clip skip"] == "2" and params["Version"] == "v1.6.0"
    assert params["Seed"] == "1234567890" and params["Size"] == "512x768"
    assert len(params) == 15


def test_parse_then_format_reproduces_a1111_text():
    prompt, negative, params = parse_infotext(A1111_REAL)
    assert format_infotext(prompt, negative, params) == A1111_REAL


# --- legacy sampler names, short hash ---------------------------------------------------------------

def test_legacy_sampler_split():
    assert split_legacy_sampler("DPM++ 2M Karras", SAMPLERS, SCHEDULES) == ("DPM++ 2M", "Karras")
    assert split_legacy_sampler("DPM++ 2M SDE Karras", SAMPLERS, SCHEDULES) == ("DPM++ 2M SDE", "Karras")
    assert split_legacy_sampler("DPM++ 2M SDE Exponential", SAMPLERS, SCHEDULES) == ("DPM++ 2M SDE", "Exponential")
    assert split_legacy_sampler("DPM2 a Karras", SAMPLERS, SCHEDULES) == ("DPM2 a", "Karras")
    assert split_legacy_sampler("Euler SGM Uniform", SAMPLERS, SCHEDULES) == ("Euler", "SGM Uniform")
    assert split_legacy_sampler("dpm++ 2m karras", SAMPLERS, SCHEDULES) == ("DPM++ 2M", "Karras")


def test_legacy_sampler_known_or_unknown_names_unchanged():
    assert split_legacy_sampler("Euler a", SAMPLERS, SCHEDULES) == ("Euler a", None)
    assert split_legacy_sampler("DPM++ 2M SDE", SAMPLERS, SCHEDULES) == ("DPM++ 2M SDE", None)
    assert split_legacy_sampler("Mystery Karras", SAMPLERS, SCHEDULES) == ("Mystery Karras", None)
    assert split_legacy_sampler("Euler Wavy", SAMPLERS, SCHEDULES) == ("Euler Wavy", None)
    # generators work too (each consumed once)
    assert split_legacy_sampler("Euler a Karras", iter(SAMPLERS), iter(SCHEDULES)) == ("Euler a", "Karras")


def test_short_hash():
    sha = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
    assert short_hash(sha) == "6ce0161689"
    assert short_hash(sha.upper()) == "6ce0161689"


# --- save_png / read_infotext ---------------------------------------------------------------------

CHINESE = "一只红色的猫，坐在窗台上\nNegative prompt: 模糊，低质量\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"


def test_save_png_round_trip_with_chinese_text(tmp_path):
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "sub" / "deeper" / "a.png", CHINESE)
    assert path == tmp_path / "sub" / "deeper" / "a.png"
    assert read_infotext(path) == CHINESE
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (8, 8) and img.getpixel((0, 0)) == (255, 0, 0)
        img.load()
        assert img.info["parameters"] == CHINESE
    prompt, negative, params = parse_infotext(read_infotext(path))
    assert (prompt, negative, params["Sampler"]) == ("一只红色的猫，坐在窗台上", "模糊，低质量", "Euler")


def test_save_png_latin1_text_chunk(tmp_path):
    path = save_png(Image.new("L", (4, 4), 128), tmp_path / "a.png", A1111_EXAMPLE)
    assert b"tEXtparameters\x00a cat" in path.read_bytes()
    assert read_infotext(path) == A1111_EXAMPLE


def test_save_png_refuses_to_overwrite(tmp_path):
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "a.png", CHINESE)
    before = path.read_bytes()
    with pytest.raises(FileExistsError) as info:
        save_png(Image.new("RGB", (8, 8), "blue"), path, "other")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before
    assert read_infotext(path) == CHINESE
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp files left


def test_save_png_overwrite_when_asked(tmp_path):
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "a.png", "first")
    save_png(Image.new("RGB", (8, 8), "blue"), path, "second, Steps: 1, Seed: 2", overwrite=True)
    assert read_infotext(path) == "second, Steps: 1, Seed: 2"
    with Image.open(path) as img:
        assert img.getpixel((0, 0)) == (0, 0, 255)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_save_png_leaves_no_temp_file_on_error(tmp_path):
    with pytest.raises(OSError):
        save_png(Image.new("CMYK", (4, 4)), tmp_path / "a.png", "text")  # PNG cannot hold CMYK
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_saved_png_is_not_private(tmp_path):
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png", "text")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("ifd", ["ifd0", "exif"])
def test_jpeg_exif_user_comment(tmp_path, ifd):
    text = "一只猫\nSteps: 20, Sampler: Euler, Seed: 1"
    exif = Image.Exif()
    target = exif if ifd == "ifd0" else exif.get_ifd(0x8769)
    target[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", exif=exif)
    assert read_infotext(tmp_path / "a.jpg") == text


def test_jpeg_exif_user_comment_ascii_and_little_endian(tmp_path):
    text = "a cat\nSteps: 20, Sampler: Euler, Seed: 1"
    for name, raw in [("ascii.jpg", b"ASCII\x00\x00\x00" + text.encode("ascii")),
                      ("bare.jpg", text.encode("ascii")),
                      ("le.jpg", b"UNICODE\x00" + text.encode("utf-16-le"))]:
        exif = Image.Exif()
        exif[0x9286] = raw
        Image.new("RGB", (8, 8)).save(tmp_path / name, exif=exif)
        assert read_infotext(tmp_path / name) == text, name


def test_webp_exif_user_comment(tmp_path):
    need(features.check("webp"), "Pillow with WebP support", "PyPI's Pillow wheels have it")
    text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler, Seed: 1"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.webp", exif=exif)
    assert read_infotext(tmp_path / "a.webp") == text


def test_unreadable_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match=r"cannot read image .*bad\.png: "):
        read_infotext(tmp_path / "bad.png")
    with pytest.raises(ImageError, match="cannot read image"):
        read_infotext(tmp_path / "missing.png")
    whole = save_png(Image.effect_noise((64, 64), 50).convert("RGB"), tmp_path / "whole.png", CHINESE).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError, match="cannot read image") as info:
        read_infotext(tmp_path / "cut.png")
    assert "\n" not in str(info.value)


def test_images_without_metadata(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.jpg")
    for name in ("plain.png", "plain.jpg"):
        with pytest.raises(ImageError, match="no generation parameters") as info:
            read_infotext(tmp_path / name)
        assert str(info.value) == (f"{tmp_path / name} carries no generation parameters "
                                   "(no PNG 'parameters' text or EXIF UserComment)")


# --- next_output_path -----------------------------------------------------------------------------

def test_next_output_path_counters(tmp_path):
    assert next_output_path(tmp_path / "missing", 5) == tmp_path / "missing" / "00000-5.png"
    assert next_output_path(tmp_path, 5).name == "00000-5.png"  # empty folder
    (tmp_path / "00007-1.png").write_bytes(b"")
    (tmp_path / "00003-99.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    (tmp_path / "grid-0042.png").write_bytes(b"")
    (tmp_path / "123-4.png").write_bytes(b"")  # not a 5-digit counter
    assert next_output_path(tmp_path, 42).name == "00008-42.png"
    assert next_output_path(tmp_path, 42, ext="jpg").name == "00008-42.jpg"


def test_next_output_path_with_saving(tmp_path):
    names = []
    for seed in (10, 11, 12):
        names.append(save_png(Image.new("RGB", (4, 4)), next_output_path(tmp_path, seed), "t").name)
    assert names == ["00000-10.png", "00001-11.png", "00002-12.png"]


def test_next_output_path_past_99999(tmp_path):
    (tmp_path / "99999-1.png").write_bytes(b"")
    assert next_output_path(tmp_path, 2).name == "100000-2.png"
    (tmp_path / "100000-2.png").write_bytes(b"")
    assert next_output_path(tmp_path, 3).name == "100001-3.png"
