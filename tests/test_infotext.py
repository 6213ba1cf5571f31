"""A1111 infotext format and atomic PNG saving."""

from __future__ import annotations

import pytest
from PIL import Image

from danqing.errors import ImageError
from danqing.outputs.infotext import format_infotext, parse_infotext, split_legacy_sampler
from danqing.outputs.store import next_output_path, read_infotext, save_png

A1111_EXAMPLE = (
    "a cat\nNegative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"
)
PARAMS = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1, "Size": "512x512",
          "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "VAE": None, "Clip skip": ""}


def test_format_matches_a1111():
    assert format_infotext("a cat", "blurry", PARAMS) == A1111_EXAMPLE
    assert format_infotext("a cat", "", {"Steps": 5, "CFG scale": 6.5, "Seed": 2}) == "a cat\nSteps: 5, CFG scale: 6.5, Seed: 2"


def test_quoting_round_trip():
    text = format_infotext("p", "", {"Steps": 1, "Lora hashes": "a: 123, b: 456", "Note": 'say "hi"', "Seed": 3})
    assert 'Lora hashes: "a: 123, b: 456"' in text
    _, _, params = parse_infotext(text)
    assert params["Lora hashes"] == "a: 123, b: 456" and params["Note"] == 'say "hi"' and params["Seed"] == "3"


def test_multiline_prompts_round_trip():
    text = format_infotext("line one\nline two", "bad\nworse", PARAMS)
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative) == ("line one\nline two", "bad\nworse")
    assert params["Model"] == "v1-5-pruned-emaonly" and params["CFG scale"] == "7"


def test_last_line_needs_three_pairs():
    prompt, negative, params = parse_infotext("a cat\nstyle: anime, mood: calm")
    assert prompt == "a cat\nstyle: anime, mood: calm" and params == {}


def test_legacy_sampler_split():
    samplers, schedules = ["DPM++ 2M", "Euler a"], ["Automatic", "Karras", "Exponential"]
    assert split_legacy_sampler("DPM++ 2M Karras", samplers, schedules) == ("DPM++ 2M", "Karras")
    assert split_legacy_sampler("Euler a", samplers, schedules) == ("Euler a", None)


def test_save_png_round_trip_and_atomic(tmp_path):
    text = "一只红色的猫\nNegative prompt: 模糊\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "sub" / "a.png", text)
    assert read_infotext(path) == text
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (8, 8), "blue"), path, "other")
    assert read_infotext(path) == text and Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]  # no temp files left


def test_jpeg_exif_user_comment(tmp_path):
    text = "a cat\nSteps: 20, Sampler: Euler, Seed: 1"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", exif=exif)
    assert read_infotext(tmp_path / "a.jpg") == text


def test_unreadable_and_missing_metadata(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot read image"):
        read_infotext(tmp_path / "bad.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ImageError, match="no generation parameters"):
        read_infotext(tmp_path / "plain.png")


def test_next_output_path(tmp_path):
    assert next_output_path(tmp_path / "missing", 5).name == "00000-5.png"
    (tmp_path / "00007-1.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    assert next_output_path(tmp_path, 42).name == "00008-42.png"
