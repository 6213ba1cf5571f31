"""`--out` means the same in every command: NAME.png is a file (NAME-1.png, ... for the pictures
after the first), a name ending with / or an existing folder (or a name without an extension) is
a folder; anything else, or a planned file that exists, is one line and exit 2 before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from danqing.cli import OutTarget, main, out_target
from danqing.errors import InvalidRequest

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--quiet"]


def run(capsys, tmp_path, *args):
    with pytest.raises(SystemExit) as exc:
        main(["--home", str(tmp_path / "home"), "--device", "cpu", *args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def ok(capsys, tmp_path, *args):
    code, out, err = run(capsys, tmp_path, *args)
    assert code in (0, None), err
    return out


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


# ---------------------------------------------------------------------------------------------
# The rule, without running anything
# ---------------------------------------------------------------------------------------------
def test_rule_file_folder_and_default(tmp_path):
    default = tmp_path / "outputs"
    assert out_target(None, default) == OutTarget(folder=default)
    assert out_target(None, tmp_path / "a.png") == OutTarget(file=tmp_path / "a.png")
    assert out_target(str(tmp_path / "x.png"), default) == OutTarget(file=tmp_path / "x.png")
    assert out_target(str(tmp_path / "X.PNG"), default) == OutTarget(file=tmp_path / "X.PNG")
    assert out_target(str(tmp_path / "new") + "/", default) == OutTarget(folder=tmp_path / "new")
    assert out_target(str(tmp_path / "run.v2") + "/", default) == OutTarget(folder=tmp_path / "run.v2")
    assert out_target(str(tmp_path / "plain"), default) == OutTarget(folder=tmp_path / "plain")
    (tmp_path / "made.png").mkdir()  # an existing folder stays a folder, whatever its name
    assert out_target(str(tmp_path / "made.png"), default) == OutTarget(folder=tmp_path / "made.png")


def test_rule_refuses_other_extensions(tmp_path):
    for name in ("x.jpg", "x.webp", "run.v2"):
        with pytest.raises(InvalidRequest, match=r"^out: .*give NAME\.png for a file, or a folder \(end the name with /\)"):
            out_target(str(tmp_path / name), tmp_path)


def test_several_pictures_into_one_name(tmp_path):
    t = out_target(str(tmp_path / "x.png"), tmp_path)
    assert t.files(3) == [tmp_path / "x.png", tmp_path / "x-1.png", tmp_path / "x-2.png"]
    assert t.files(2, start=2) == [tmp_path / "x-2.png", tmp_path / "x-3.png"]
    assert t.path("ignored.png") == tmp_path / "x.png" and t.beside() == tmp_path
    folder = out_target(str(tmp_path / "f") + "/", tmp_path)
    assert folder.path("a.png") == tmp_path / "f" / "a.png" and folder.beside() == tmp_path / "f"
    (tmp_path / "x-1.png").write_bytes(b"keep")
    t.check_free(1)
    with pytest.raises(InvalidRequest, match="x-1.png already exists; danqing never overwrites"):
        t.check_free(2)
    with pytest.raises(InvalidRequest, match="x-source.png already exists"):
        (tmp_path / "x-source.png").write_bytes(b"keep")
        t.check_free(1, variants=("", "-source"))


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
def test_outpaint_to_a_file_name(capsys, tmp_path):
    """The reported defect: `outpaint ... --out x.png` made a folder x.png and then refused."""
    Image.new("RGB", (64, 64), "white").save(tmp_path / "in.png")
    out = ok(capsys, tmp_path, "outpaint", str(tmp_path / "in.png"), "a red circle", "--right", "16", *FAST[:2], "--seed",
             "3", "--quiet", "--out", str(tmp_path / "x.png"))
    assert (tmp_path / "x.png").is_file() and Image.open(tmp_path / "x.png").size == (80, 64)
    assert str(tmp_path / "x.png") in out
    # the prepared canvas and mask lie beside the picture, and --from re-creates it
    assert (tmp_path / "outpaint-in-0-16-0-0-canvas.png").is_file() and (tmp_path / "outpaint-in-0-16-0-0-mask.png").is_file()
    ok(capsys, tmp_path, "generate", "--from", str(tmp_path / "x.png"), "--quiet", "--out", str(tmp_path / "again.png"))
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "x.png").tobytes()


def test_generate_batch_into_one_name_and_into_a_new_folder(capsys, tmp_path):
    out = ok(capsys, tmp_path, "generate", "a red circle", *FAST, "--batch-size", "2", "--out", str(tmp_path / "x.png"))
    assert pngs(tmp_path) == ["x-1.png", "x.png"]
    assert "Seed: 3," in Image.open(tmp_path / "x.png").info["parameters"]
    assert "Seed: 4," in Image.open(tmp_path / "x-1.png").info["parameters"]
    assert out.splitlines() == [f"{tmp_path / 'x.png'}  seed=3", f"{tmp_path / 'x-1.png'}  seed=4"]
    ok(capsys, tmp_path, "generate", "a red circle", *FAST, "--out", str(tmp_path / "new.png") + "/")
    assert pngs(tmp_path / "new.png") == ["00000-3.png"]


def test_existing_names_and_other_extensions_are_refused_before_any_work(capsys, tmp_path):
    (tmp_path / "x-1.png").write_bytes(b"precious")
    code, _, err = run(capsys, tmp_path, "generate", "a red circle", *FAST, "--batch-size", "2", "--out", str(tmp_path / "x.png"))
    assert code == 2 and err == f"error: out: {tmp_path / 'x-1.png'} already exists; danqing never overwrites, pick another name\n"
    assert pngs(tmp_path) == ["x-1.png"] and (tmp_path / "x-1.png").read_bytes() == b"precious"
    code, _, err = run(capsys, tmp_path, "generate", "a red circle", *FAST, "--out", str(tmp_path / "x.jpg"))
    assert code == 2 and err.startswith("error: out: ") and "NAME.png" in err and err.count("\n") == 1
    assert not (tmp_path / "x.jpg").exists()


def test_img2img_of_a_folder_numbers_the_pictures(capsys, tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64), "gray").save(tmp_path / "in" / name)
    ok(capsys, tmp_path, "img2img", str(tmp_path / "in"), "a red circle", "--steps", "2", "--seed", "3", "--quiet",
       "--out", str(tmp_path / "x.png"))
    assert pngs(tmp_path) == ["x-1.png", "x.png"]
    assert "a.png" in Image.open(tmp_path / "x.png").info["parameters"]
    assert "b.png" in Image.open(tmp_path / "x-1.png").info["parameters"]


def test_single_picture_commands_take_a_folder(capsys, tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "pic.png")
    (tmp_path / "up").mkdir()
    ok(capsys, tmp_path, "upscale", str(tmp_path / "pic.png"), "--out", str(tmp_path / "up"))
    assert Image.open(tmp_path / "up" / "00000-pic-x2.png").size == (64, 64)
    ok(capsys, tmp_path, "upscale", str(tmp_path / "pic.png"), "--out", str(tmp_path / "big.png"))
    assert Image.open(tmp_path / "big.png").size == (64, 64)
    ok(capsys, tmp_path, "preprocess", "canny", str(tmp_path / "pic.png"), "--res", "32", "--out", str(tmp_path / "maps") + "/")
    assert pngs(tmp_path / "maps") == ["pic-canny.png"]
    ok(capsys, tmp_path, "upscale", str(tmp_path / "pic.png"), "--out", str(tmp_path / "up") + "/")  # numbered, as generate
    assert pngs(tmp_path / "up") == ["00000-pic-x2.png", "00001-pic-x2.png"]
