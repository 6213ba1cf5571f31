"""Control preprocessors on real photographs (scikit-image's ``skimage.data``): size, type and
range of every map, canny equal to OpenCV's own, measured properties of the classical ones."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from danqing.errors import InvalidRequest, ModelNotFound
from danqing.preprocess import preprocessor_names, run_preprocessor
from danqing.preprocess.models import normal_from_depth, render_pose_json

PHOTOS = ("astronaut", "coffee", "chelsea")
RES = 256


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()) for name in PHOTOS}


def _short(img):
    return min(img.size)


@pytest.mark.parametrize("name", [n for n in preprocessor_names() if n not in ("depth", "normal", "openpose")])
def test_every_classical_preprocessor_on_photos(photos, name):
    for photo in photos.values():
        out = run_preprocessor(name, photo, resolution=RES)
        assert out.mode == "RGB"
        a = np.asarray(out)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
        if name in ("none", "inpaint", "segmentation"):
            assert out.size == photo.size
        else:
            assert _short(out) == RES
            k = RES / _short(photo)
            assert abs(out.width - photo.width * k) <= 1 and abs(out.height - photo.height * k) <= 1
        assert a.max() > a.min()  # not blank


def test_canny_is_opencvs(photos):
    for photo in photos.values():
        out = np.asarray(run_preprocessor("canny", photo, resolution=_short(photo), a=80, b=160))[..., 0]
        ref = cv2.Canny(np.asarray(photo.convert("RGB")), 80, 160)
        assert np.array_equal(out, ref)
        assert set(np.unique(out)) <= {0, 255}


def test_line_maps_are_sparse_and_follow_edges(photos):
    """Line art, scribble and MLSD are mostly black with white structure, and their white pixels
    sit near strong image gradients (measured against the Sobel magnitude)."""
    for photo in photos.values():
        grey = cv2.cvtColor(np.asarray(photo.resize((RES * photo.width // _short(photo), RES * photo.height // _short(photo)))), cv2.COLOR_RGB2GRAY)
        grad = np.hypot(cv2.Sobel(grey.astype(np.float32), cv2.CV_32F, 1, 0), cv2.Sobel(grey.astype(np.float32), cv2.CV_32F, 0, 1))
        for name in ("lineart", "lineart_anime", "scribble", "mlsd"):
            a = np.asarray(run_preprocessor(name, photo, resolution=RES))[..., 0]
            a = cv2.resize(a, grey.shape[::-1])
            on = a > 127
            assert 0.002 < on.mean() < 0.35, (name, on.mean())
            near = cv2.dilate(on.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            assert grad[near].mean() > 1.5 * grad.mean(), name


def test_invert_and_tile_and_shuffle(photos):
    photo = photos["coffee"]
    inv = run_preprocessor("invert", photo, resolution=_short(photo))
    assert np.array_equal(np.asarray(inv), 255 - np.asarray(photo))
    tile = np.asarray(run_preprocessor("tile", photo, resolution=RES), np.float32)
    base = np.asarray(run_preprocessor("none", photo).resize((tile.shape[1], tile.shape[0]), Image.LANCZOS), np.float32)
    assert np.abs(tile - base).mean() < 20  # same picture, blurred
    assert np.abs(np.diff(tile, axis=1)).mean() < np.abs(np.diff(base, axis=1)).mean()  # smoother
    s0 = np.asarray(run_preprocessor("shuffle", photo, resolution=RES, a=0))
    assert np.array_equal(s0, np.asarray(run_preprocessor("shuffle", photo, resolution=RES, a=0)))
    assert not np.array_equal(s0, np.asarray(run_preprocessor("shuffle", photo, resolution=RES, a=1)))


def test_segmentation_keeps_its_colours(photos):
    seg = np.zeros((64, 96, 3), np.uint8)
    seg[:, :40] = (120, 120, 70)
    seg[:, 40:] = (6, 230, 230)
    out = np.asarray(run_preprocessor("segmentation", Image.fromarray(seg)))
    assert np.array_equal(out, seg)
    q = np.asarray(run_preprocessor("segmentation", photos["astronaut"], a=6))
    assert len(np.unique(q.reshape(-1, 3), axis=0)) <= 6


def test_depth_normal_need_a_model_or_a_map(photos, tmp_path):
    with pytest.raises(ModelNotFound, match=r"depth preprocessor needs .* in .*preprocessors/depth/"):
        run_preprocessor("depth", photos["chelsea"], models_dir=tmp_path)
    ramp = np.tile(np.linspace(0, 255, 128, dtype=np.float32), (64, 1)).astype(np.uint8)
    depth = run_preprocessor("depth", Image.fromarray(ramp).convert("RGB"), resolution=64, models_dir=tmp_path)
    assert depth.size == (128, 64)
    n = normal_from_depth(np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1)), 0.0)
    assert n.dtype == np.uint8 and n.shape == (64, 64, 3)
    # a surface rising to the right tilts its normal along x: R differs from the flat 128, G stays
    assert abs(int(n[32, 32, 0]) - 128) > 3 and abs(int(n[32, 32, 1]) - 128) <= 1 and n[32, 32, 2] > 128


def test_openpose_renders_json_and_refuses_pictures(photos, tmp_path):
    kp = [0.0] * 54
    for i, (x, y) in enumerate([(50, 20), (50, 40), (35, 40), (30, 60), (28, 80), (65, 40), (70, 60), (72, 80),
                                (40, 80), (40, 110), (40, 140), (60, 80), (60, 110), (60, 140), (45, 15), (55, 15),
                                (40, 18), (60, 18)]):
        kp[3 * i:3 * i + 3] = [x, y, 1.0]
    f = tmp_path / "pose.json"
    f.write_text(json.dumps({"canvas_width": 100, "canvas_height": 160, "people": [{"pose_keypoints_2d": kp}]}))
    img = render_pose_json(f)
    a = np.asarray(img)
    assert img.size == (100, 160)
    assert tuple(a[20, 50]) == (255, 0, 0)  # the nose in OpenPose's first colour
    assert (a.sum(axis=2) > 0).mean() > 0.02  # limbs drawn
    assert a[0:5, 0:5].max() == 0
    with pytest.raises(ModelNotFound, match="OpenPose JSON file"):
        run_preprocessor("openpose", photos["astronaut"])


def test_unknown_preprocessor_lists_them():
    with pytest.raises(InvalidRequest, match=r"unknown preprocessor 'hed'; available: none, invert, canny, lineart"):
        run_preprocessor("hed", Image.new("RGB", (8, 8)))


def test_depth_and_normal_from_a_local_depth_model(photos, tmp_path):
    """A transformers depth-estimation folder in models/preprocessors/depth/ (here a tiny random
    DPT built from a config) is run through the pipeline, local files only."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = tmp_path / "preprocessors" / "depth"
    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=64,
                    patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                    fusion_hidden_size=16, head_in_index=-1)
    DPTForDepthEstimation(cfg).save_pretrained(folder)
    DPTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    photo = photos["coffee"]
    d = run_preprocessor("depth", photo, resolution=128, models_dir=tmp_path)
    a = np.asarray(d)
    assert d.size == (192, 128) and a.dtype == np.uint8 and a.min() == 0 and a.max() == 255
    assert np.array_equal(a[..., 0], a[..., 1])  # grey
    n = np.asarray(run_preprocessor("normal", photo, resolution=128, models_dir=tmp_path))
    assert n.shape == (128, 192, 3) and n[..., 2].min() >= 127  # normals face the viewer
