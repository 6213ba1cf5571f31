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
from danqing.preprocess.models import coco_to_openpose, normal_from_depth, render_pose_json

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


def test_openpose_detection_without_a_model_names_the_folder_and_files(photos, tmp_path):
    with pytest.raises(ModelNotFound, match=rf"ViTPose model folder in {tmp_path}/preprocessors/openpose/ "
                                            r"\(config.json, model.safetensors and preprocessor_config.json"):
        run_preprocessor("openpose", photos["astronaut"], models_dir=tmp_path)
    (tmp_path / "preprocessors" / "openpose").mkdir(parents=True)
    (tmp_path / "preprocessors" / "openpose" / "config.json").write_text("{}")  # weights missing
    with pytest.raises(ModelNotFound, match="needs config.json, model.safetensors and preprocessor_config.json"):
        run_preprocessor("openpose", photos["astronaut"], models_dir=tmp_path)


def test_coco_to_openpose_order_neck_and_dropped_points():
    """COCO-17 (nose, l/r eye, l/r ear, l/r shoulder, elbow, wrist, hip, knee, ankle) -> OpenPose-18
    (nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, ..., r-eye, l-eye, r-ear, l-ear)."""
    kp = np.array([[10.0 * i, 10.0 * i + 1] for i in range(17)])
    sc = np.full(17, 0.9)
    sc[10] = 0.1  # right wrist, unsure
    flat = coco_to_openpose(kp, sc, threshold=0.3)
    assert len(flat) == 54
    pts = np.array(flat).reshape(18, 3)
    coco_of = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]  # OpenPose k <- COCO i
    for k, i in enumerate(coco_of):
        if k == 1:
            assert pts[1].tolist() == [55.0, 56.0, 0.9]  # neck: midpoint of the shoulders (5, 6)
        elif i == 10:
            assert pts[k].tolist() == [0.0, 0.0, 0.0]  # dropped
        else:
            assert pts[k].tolist() == [kp[i][0], kp[i][1], 0.9], k
    sc[5] = 0.2  # one shoulder unsure: no neck, no left shoulder
    pts = np.array(coco_to_openpose(kp, sc, threshold=0.3)).reshape(18, 3)
    assert pts[1].tolist() == [0.0, 0.0, 0.0] and pts[5].tolist() == [0.0, 0.0, 0.0]
    assert pts[2].tolist() == [60.0, 61.0, 0.9]


def test_openpose_detection_from_a_local_vitpose(photos, tmp_path, tiny_vitpose):
    """A ViTPose folder in models/preprocessors/openpose/ (a tiny random one built from a config):
    with no person detector the whole picture is one person box; the map is the renderer's
    drawing of the JSON, which has 18 OpenPose keypoints per person, decoded by the image
    processor's own ``post_process_pose_estimation`` (random weights: positions not checked)."""
    import torch
    from transformers import VitPoseForPoseEstimation, VitPoseImageProcessorPil

    from danqing.preprocess.classical import fit_short_side
    from danqing.preprocess.models import render_pose

    folder = tmp_path / "preprocessors" / "openpose"
    tiny_vitpose(folder)
    photo = photos["astronaut"]
    out = run_preprocessor("openpose", photo, resolution=RES, a=0.0, models_dir=tmp_path)
    a = np.asarray(out)
    assert out.mode == "RGB" and a.dtype == np.uint8 and a.shape == (RES, RES, 3)
    assert a.max() > a.min()  # every keypoint kept (threshold 0): a skeleton is drawn
    pose = json.loads(out.info["openpose"])
    assert (pose["canvas_width"], pose["canvas_height"]) == (RES, RES)
    assert len(pose["people"]) == 1 and len(pose["people"][0]["pose_keypoints_2d"]) == 18 * 3
    assert np.array_equal(a, np.asarray(render_pose(pose["people"], RES, RES)))
    # the same numbers from the model and its processor, called by hand on the whole-picture box
    model = VitPoseForPoseEstimation.from_pretrained(folder, local_files_only=True).eval()
    proc = VitPoseImageProcessorPil.from_pretrained(folder, local_files_only=True)
    pic = fit_short_side(photo, RES)
    box = [[0.0, 0.0, float(RES), float(RES)]]
    with torch.no_grad():
        heat = model(**proc(pic, boxes=[box], return_tensors="pt"))
    ref = proc.post_process_pose_estimation(heat, boxes=[box])[0][0]
    expect = coco_to_openpose(ref["keypoints"].numpy(), ref["scores"].numpy(), threshold=0.0)
    assert np.allclose(pose["people"][0]["pose_keypoints_2d"], expect, atol=1e-4)
    # a keypoint threshold above every score drops them all: nothing is drawn
    empty = run_preprocessor("openpose", photo, resolution=RES, a=1.01, models_dir=tmp_path)
    assert np.asarray(empty).max() == 0


def test_pose_heatmaps_decode_into_their_box(tmp_path):
    """Boxes are in picture pixels: a heatmap peak in the middle of the heatmap of a box covering
    the right half of a 128x128 picture lands at that box's centre (96, 64); peaks over the
    heatmap's middle half land inside the right half; the left-half box mirrors them."""
    import torch
    from transformers import VitPoseImageProcessorPil

    from danqing.preprocess.models import decode_heatmaps

    proc = VitPoseImageProcessorPil(size={"height": 64, "width": 48})
    h, w = 16, 12
    yy, xx = np.mgrid[0:h, 0:w]

    def peaks(points):  # one Gaussian blob per keypoint at (col, row)
        maps = np.zeros((1, 17, h, w), np.float32)
        for k, (c, r) in enumerate(points):
            maps[0, k] = np.exp(-((xx - c) ** 2 + (yy - r) ** 2) / (2 * 1.5 ** 2))
        return torch.from_numpy(maps)

    centre = [((w - 1) / 2, (h - 1) / 2)] * 17
    (kp, sc), = decode_heatmaps(proc, peaks(centre), [[64.0, 0.0, 64.0, 128.0]])
    assert np.allclose(kp, [[96.0, 64.0]] * 17, atol=0.5) and np.all(sc > 0.8)  # the peak value between grid points
    spread = [(3 + (k % 6), 4 + (k % 9)) for k in range(17)]
    (right, _), = decode_heatmaps(proc, peaks(spread), [[64.0, 0.0, 64.0, 128.0]])
    (left, _), = decode_heatmaps(proc, peaks(spread), [[0.0, 0.0, 64.0, 128.0]])
    assert right[:, 0].min() >= 64 and right[:, 0].max() <= 128
    assert left[:, 0].min() >= 0 and left[:, 0].max() <= 64
    assert np.allclose(right[:, 0] - left[:, 0], 64.0, atol=1e-3) and np.allclose(right[:, 1], left[:, 1], atol=1e-3)


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


def test_wholebody_keypoints_give_face_and_hands():
    """COCO-WholeBody's 133 points: 17 body, 6 feet, 68 face (OpenPose's first 68 face points),
    21 left hand, 21 right hand, in that order."""
    from danqing.preprocess.models import _wholebody_parts

    kp = np.array([[float(i), float(i) + 0.5] for i in range(133)])
    sc = np.full(133, 0.9)
    sc[91] = 0.1  # the left hand's wrist point, unsure
    parts = _wholebody_parts(kp, sc, 0.3)
    face, left, right = (np.array(parts[k]).reshape(-1, 3) for k in
                         ("face_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d"))
    assert face.shape == (68, 3) and left.shape == (21, 3) and right.shape == (21, 3)
    assert face[0].tolist() == [23.0, 23.5, 0.9] and right[20].tolist() == [132.0, 132.5, 0.9]
    assert left[0].tolist() == [0.0, 0.0, 0.0] and left[1].tolist() == [92.0, 92.5, 0.9]


def _tiny_person_detector(folder, box_cxcywh, labels=("N/A", "person", "bicycle")):
    """A tiny DETR whose one query always finds class 1 at ``box_cxcywh`` (fractions of the
    picture): the heads' weights zeroed and their biases set."""
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage4"])
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=1,
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = DetrForObjectDetection(cfg)
    with torch.no_grad():
        head = model.class_labels_classifier
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 10.0, 0.0, 0.0]))
        last = model.bbox_predictor.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor(box_cxcywh)))
    model.save_pretrained(folder)
    DetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(folder)


def test_openpose_detection_with_a_person_detector(photos, tmp_path, tiny_vitpose):
    """With an object detector in models/preprocessors/person_detector/, ViTPose runs on the
    detected person boxes (here one box, the right half of the picture, in picture pixels)."""
    import torch
    from transformers import VitPoseForPoseEstimation, VitPoseImageProcessorPil

    from danqing.preprocess.classical import fit_short_side
    from danqing.preprocess.models import detect_people

    tiny_vitpose(tmp_path / "preprocessors" / "openpose")
    _tiny_person_detector(tmp_path / "preprocessors" / "person_detector", [0.75, 0.5, 0.5, 0.99])
    photo = photos["astronaut"]
    pic = fit_short_side(photo, RES)
    boxes = detect_people(pic, tmp_path / "preprocessors" / "person_detector", 0.5)
    assert np.allclose(boxes, [[RES / 2, RES * 0.005, RES / 2, RES * 0.99]], atol=0.5)
    out = run_preprocessor("openpose", photo, resolution=RES, a=0.0, models_dir=tmp_path)
    pose = json.loads(out.info["openpose"])
    assert len(pose["people"]) == 1
    folder = tmp_path / "preprocessors" / "openpose"
    model = VitPoseForPoseEstimation.from_pretrained(folder, local_files_only=True).eval()
    proc = VitPoseImageProcessorPil.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        heat = model(**proc(pic, boxes=[boxes], return_tensors="pt"))
    ref = proc.post_process_pose_estimation(heat, boxes=[boxes])[0][0]
    assert np.allclose(pose["people"][0]["pose_keypoints_2d"],
                       coco_to_openpose(ref["keypoints"].numpy(), ref["scores"].numpy(), 0.0), atol=1e-4)
    # a person threshold above the detector's score: no people, an empty map
    none = run_preprocessor("openpose", photo, resolution=RES, a=0.0, b=1.0, models_dir=tmp_path)
    assert json.loads(none.info["openpose"])["people"] == [] and np.asarray(none).max() == 0
    # a detector without a 'person' class is refused, naming its classes
    _tiny_person_detector(tmp_path / "cars" / "preprocessors" / "person_detector", [0.5, 0.5, 0.5, 0.5],
                          labels=("N/A", "car", "bicycle"))
    tiny_vitpose(tmp_path / "cars" / "preprocessors" / "openpose")
    with pytest.raises(InvalidRequest, match="no 'person' class .*car"):
        run_preprocessor("openpose", photo, resolution=RES, models_dir=tmp_path / "cars")
