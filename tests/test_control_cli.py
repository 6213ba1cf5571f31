"""The control commands: `danqing preprocess`, `--control TYPE:IMAGE:WEIGHT`, `--from` of a
controlled image, and bad input -> one line, exit 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from danqing.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_preprocess_control_generate_and_from(capsys, tmp_path):
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import eval_scenes

    photo = tmp_path / "scene.png"
    render(eval_scenes(1)[0]).save(photo)
    home = ["--home", str(tmp_path), "--device", "cpu"]
    code, out, err = run(capsys, *home, "preprocess", "canny", str(photo), "--res", "64")
    assert code in (0, None), err
    edges = tmp_path / "scene-canny.png"
    assert np.asarray(Image.open(edges)).shape == (64, 64, 3)
    code, _, err = run(capsys, *home, "preprocess", "canny", str(photo))
    assert code == 2 and "already exists" in err  # never overwrites

    gen = ["generate", "a red circle", "--steps", "4", "--width", "64", "--height", "64", "--seed", "5", "--quiet"]
    code, out, err = run(capsys, *home, *gen, "--control", f"canny:{edges}:0.9", "--out", str(tmp_path / "c.png"))
    assert code in (0, None), err
    text = Image.open(tmp_path / "c.png").info["parameters"]
    assert "ControlNet 0:" in text and "Model: danqing-tiny-canny" in text and "Weight: 0.9" in text
    code, out, err = run(capsys, *home, "generate", "--from", str(tmp_path / "c.png"), "--quiet",
                         "--out", str(tmp_path / "again.png"))
    assert code in (0, None), err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(Image.open(tmp_path / "again.png")))
    # the photo itself, canny-preprocessed on the fly, makes the same picture
    code, out, err = run(capsys, *home, *gen, "--control", f"canny:{photo}:0.9", "--control-preprocess",
                         "--out", str(tmp_path / "p.png"))
    assert code in (0, None), err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(Image.open(tmp_path / "p.png")))


@pytest.mark.parametrize("args, message", [
    (["preprocess", "hed", "x.png"], "unknown preprocessor 'hed'; available:"),
    (["generate", "p", "--control", "canny"], "expected TYPE:IMAGE or TYPE:IMAGE:WEIGHT"),
    (["generate", "p", "--control", "canny:missing.png", "--quiet"], "controlnet.image"),
    (["generate", "p", "--control", "nosuchnet:{img}", "--quiet"], "controlnet 'nosuchnet' not found"),
    (["generate", "p", "--control", "canny:{img}:5", "--quiet"], "weight: must be between 0 and 2"),
])
def test_bad_control_input_is_one_line(capsys, tmp_path, args, message):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(img)
    args = [a.replace("{img}", str(img)) for a in args]
    code, out, err = run(capsys, "--home", str(tmp_path), "--device", "cpu", *args, "--width", "64", "--height", "64")\
        if args[0] == "generate" else run(capsys, "--home", str(tmp_path), "--device", "cpu", *args)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_preprocess_openpose_with_a_model_writes_map_and_json(capsys, tmp_path, tiny_vitpose):
    """`danqing preprocess openpose PHOTO` with a ViTPose folder in models/preprocessors/openpose/
    writes the map and the detected pose (OpenPose JSON), which renders back to the same map."""
    import json

    from skimage import data

    home = ["--home", str(tmp_path), "--device", "cpu"]
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    code, out, err = run(capsys, *home, "preprocess", "openpose", str(photo), "--res", "64")
    assert code == 2 and "preprocessors/openpose/" in err and len(err.strip().splitlines()) == 1, err
    tiny_vitpose(tmp_path / "models" / "preprocessors" / "openpose")
    code, out, err = run(capsys, *home, "preprocess", "openpose", str(photo), "--res", "64", "--a", "0")
    assert code in (0, None), err
    pose = json.loads((tmp_path / "astronaut-openpose.json").read_text())
    assert len(pose["people"]) == 1 and len(pose["people"][0]["pose_keypoints_2d"]) == 54
    code, out, err = run(capsys, *home, "preprocess", "openpose", str(tmp_path / "astronaut-openpose.json"),
                         "--out", str(tmp_path / "again.png"))
    assert code in (0, None), err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "astronaut-openpose.png")),
                          np.asarray(Image.open(tmp_path / "again.png")))
