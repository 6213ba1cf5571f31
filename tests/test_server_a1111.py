"""The A1111-compatible API, driven by the real A1111 client (``webuiapi`` from PyPI) against a
live server on the bundled tiny model; and the A1111 <-> GenerationRequest mapping tables."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import need_module
from PIL import Image
from server_helpers import TINY, LiveServer, make_app, shared_studio

webuiapi = need_module("webuiapi", "pip install -e '.[test]'")

from danqing.errors import InvalidRequest  # noqa: E402
from danqing.request import GenerationRequest  # noqa: E402
from danqing.server.a1111 import NEUTRAL, SHELL, TO_REQUEST, Img2ImgBody, Txt2ImgBody, request_fields  # noqa: E402


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with LiveServer(make_app(tmp_path_factory.mktemp("a1111-home"))) as server:
        yield server


@pytest.fixture(scope="module")
def api(live):
    return webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=4)


# -- the mapping, as data ------------------------------------------------------------------------
def test_every_a1111_field_has_exactly_one_rule():
    tables = {"TO_REQUEST": set(TO_REQUEST), "SHELL": SHELL, "NEUTRAL": set(NEUTRAL)}
    for body in (Txt2ImgBody, Img2ImgBody):
        for name in body.model_fields:
            owners = [t for t, names in tables.items() if name in names]
            assert len(owners) == 1, f"{body.__name__}.{name} is in {owners or 'no table'}"
    assert set(TO_REQUEST.values()) <= set(GenerationRequest.model_fields)


def test_a1111_defaults_map_onto_request():
    f = request_fields(Txt2ImgBody(prompt="p", sampler_name="DPM++ 2M", scheduler="karras", n_iter=3), img2img=False)
    assert (f["sampler"], f["schedule"], f["batch_count"]) == ("DPM++ 2M", "Karras", 3)
    assert "denoising_strength" not in f and "hr_scale" not in f  # hires fields only with enable_hr
    f = request_fields(Txt2ImgBody(sampler_index="Euler a", scheduler="sgm_uniform"), img2img=False)
    assert (f["sampler"], f["schedule"]) == ("Euler a", "SGM Uniform")  # legacy sampler_index is honoured
    f = request_fields(Img2ImgBody(inpainting_fill=1, resize_mode=2, inpaint_full_res=0, mask_blur=7), img2img=True)
    assert (f["inpainting_fill"], f["resize_mode"], f["inpaint_full_res"], f["mask_blur"]) == (
        "original", "resize and fill", False, 7)
    GenerationRequest.create(**f)  # a valid request
    f = request_fields(Txt2ImgBody(refiner_checkpoint="sd_xl_refiner_1.0 [7440042bbd]", refiner_switch_at=0.7),
                       img2img=False)
    assert (f["refiner_checkpoint"], f["refiner_switch_at"]) == ("sd_xl_refiner_1.0", 0.7)
    f = request_fields(Img2ImgBody(image_cfg_scale=1.2), img2img=True)
    assert f["image_cfg_scale"] == 1.2
    assert "refiner_checkpoint" not in request_fields(Txt2ImgBody(refiner_checkpoint="None"), img2img=False)
    assert request_fields(Txt2ImgBody(restore_faces=True), img2img=False)["restore_faces"] is True
    assert "restore_faces" not in request_fields(Txt2ImgBody(), img2img=False)


@pytest.mark.parametrize("body, field", [
    (Txt2ImgBody(tiling=True), "tiling"),
    (Txt2ImgBody(s_churn=0.5), "s_churn"),
    (Txt2ImgBody(script_name="loopback"), "script_name"),
    (Txt2ImgBody(alwayson_scripts={"ADetailer": {"args": [{"ad_model": "face_yolov8n.pt"}]}}), "alwayson_scripts"),
    (Txt2ImgBody(alwayson_scripts={"ControlNet": {"args": [{"enabled": True}]}}), "alwayson_scripts.controlnet.args.0.image"),
    (Txt2ImgBody(eta=0.3, sampler_name="Euler a"), "eta"),
    (Img2ImgBody(resize_mode=7), "resize_mode"),
    (Img2ImgBody(mask_blur_x=2, mask_blur_y=9), "mask_blur_x"),
])
def test_unsupported_fields_are_refused_by_name(body, field):
    with pytest.raises(InvalidRequest) as exc:
        request_fields(body, img2img=isinstance(body, Img2ImgBody))
    assert exc.value.field == field


# -- the real client ------------------------------------------------------------------------------
def test_webuiapi_txt2img_matches_the_library(api):
    r = api.txt2img(prompt="a red circle left of a blue square", seed=42, steps=4, batch_size=2, **TINY)
    assert len(r.images) == 2 and all(im.size == (64, 64) for im in r.images)
    assert r.info["all_seeds"] == [42, 43] and r.info["sd_model_name"] == "danqing-tiny"
    assert "Seed: 42" in r.info["infotexts"][0] and "Sampler: Euler a" in r.info["infotexts"][0]
    assert r.parameters["prompt"] == "a red circle left of a blue square"
    # The very images the library makes for the same request.
    direct = shared_studio().generate(GenerationRequest.create(
        prompt="a red circle left of a blue square", seed=42, steps=4, batch_size=2, sampler="Euler a",
        model="danqing-tiny", **TINY))
    for got, want in zip(r.images, direct.images):
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    assert r.info["infotexts"] == direct.infotexts


def test_webuiapi_img2img_inpaint_keeps_outside(api):
    from PIL import Image, ImageDraw

    init = api.txt2img(prompt="a green triangle", seed=5, steps=4, **TINY).image.convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([16, 16, 47, 47], fill=255)
    r = api.img2img(images=[init], mask_image=mask, prompt="a yellow circle", denoising_strength=0.9, seed=9,
                    steps=4, mask_blur=0, inpaint_full_res=0, inpainting_fill=1, **TINY)
    out = np.asarray(r.image.convert("RGB")).astype(int)
    before = np.asarray(init).astype(int)
    m = np.asarray(mask) > 0
    assert np.array_equal(out[~m], before[~m])  # outside the mask: untouched
    assert np.abs(out[m] - before[m]).mean() > 5  # inside: repainted
    assert "Denoising strength: 0.9" in r.info["infotexts"][0] and r.info["all_seeds"] == [9]
    plain = api.img2img(images=[init], prompt="a green triangle", denoising_strength=0.3, seed=1, steps=4, **TINY)
    assert plain.image.size == (64, 64)


def test_webuiapi_png_info_round_trip(api):
    r = api.txt2img(prompt="two blue squares", seed=7, steps=4, cfg_scale=5, **TINY)
    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0]
    assert info.json["parameters"]["Seed"] == "7" and info.json["parameters"]["Prompt"] == "two blue squares"


def test_webuiapi_lists_and_options(api):
    names = [s["name"] for s in api.get_samplers()]
    assert {"DPM++ 2M", "Euler a", "DDIM"} <= set(names)
    assert "karras" in api.util_get_scheduler_names()
    models = {m["model_name"]: m for m in api.get_sd_models()}
    assert "danqing-tiny" in models and models["danqing-tiny"]["title"].startswith("danqing-tiny [")
    assert api.util_get_current_model() == models["danqing-tiny"]["title"]
    assert [u["name"] for u in api.get_upscalers()] == ["Lanczos", "Nearest"]
    # an empty models folder: the LoRAs danqing bundles (danqing/data/models/lora/*.safetensors)
    assert sorted((x["name"], x["alias"], Path(x["path"]).parent.name) for x in api.get_loras()) == \
        [("danqing-tiny-motion", "danqing-tiny-motion", "lora"), ("danqing-tiny-pcd", "danqing-tiny-pcd", "lora"),
         ("heart", "heart", "lora"), ("heart-character", "heart-character", "lora")]
    assert [v["model_name"] for v in api.get_sd_vae()] == ["danqing-tiny-vae-ft"]  # and the VAE danqing bundles
    api.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        r = api.txt2img(prompt="a circle", seed=1, steps=2, **TINY)
        assert "Clip skip: 2" in r.info["infotexts"][0]
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    r = api.txt2img(prompt="a circle", seed=1, steps=2, override_settings={"CLIP_stop_at_last_layers": 3}, **TINY)
    assert "Clip skip: 3" in r.info["infotexts"][0]
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1  # override_settings are per request


def test_webuiapi_interrupt_returns_what_was_reached(api):
    out = {}

    def run():
        t = time.perf_counter()
        out["r"] = api.txt2img(prompt="a red square", seed=3, steps=150, n_iter=4, **TINY)
        out["t"] = time.perf_counter() - t

    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 60
    seen = None
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 3 and p["current_image"]:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress with a preview was reported"
    assert 0 < seen["progress"] < 1 and seen["state"]["job"] and seen["state"]["sampling_steps"] == 150
    Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).verify()  # the preview is a picture
    assert api.interrupt()["interrupted"]
    th.join(60)
    r = out["r"]
    assert r.info["interrupted"] is True and len(r.images) == 1  # the first of four batches, stopped
    p = api.get_progress()
    assert p["state"]["job"] == "" and p["state"]["job_count"] == 0  # nothing running any more


def test_webuiapi_skip_ends_one_batch_and_goes_on(api):
    """A1111 skip: the running batch ends where it is, the next batches run in full."""
    out = {}
    th = threading.Thread(target=lambda: out.update(r=api.txt2img(prompt="a red square", seed=5, steps=60, n_iter=3,
                                                                     **TINY)))
    th.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 3 and p["state"]["job"]:
            break
        time.sleep(0.05)
    api.skip()
    th.join(120)
    r = out["r"]
    assert r.info["interrupted"] is False and len(r.images) == 3  # all three batches came back
    full = shared_studio().generate(GenerationRequest.create(
        prompt="a red square", seed=5, steps=60, batch_count=3, sampler="Euler a", model="danqing-tiny", **TINY))
    same = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(r.images, full.images)]
    assert same == [False, True, True], same  # the first was cut short, the others are whole
