"""The rest of the A1111 API, driven by the real A1111 client (``webuiapi`` from PyPI) against a
live server on the bundled tiny model: Extras (single and batch: the pixels are the upscaler's,
the sizes A1111's), a model switch through the options,
LoRA and embedding listings, the small routes; and the Extras field tables (one rule per field)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from conftest import need_module
from PIL import Image
from safetensors.torch import save_file
from server_helpers import TINY, FakeStudio, LiveServer, make_app

webuiapi = need_module("webuiapi", "pip install -e '.[test]'")

from danqing.server.a1111_extras import (EXTRAS_FACES, EXTRAS_NO_EFFECT, EXTRAS_SHELL, EXTRAS_UPSCALE,  # noqa: E402
                                         ExtrasBatchBody, ExtrasSingleBody)

BASE = "/sdapi/v1"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A Studio with its own models folder: one LoRA file and one embedding besides the bundled models."""
    from danqing import Settings, Studio

    home = tmp_path_factory.mktemp("a1111-rest")
    models = home / "models"
    (models / "lora").mkdir(parents=True)
    (models / "embeddings").mkdir()
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
              str(models / "lora" / "heart.safetensors"))
    save_file({"emb_params": torch.zeros(3, 32)}, str(models / "embeddings" / "dq-star.safetensors"))
    return Studio(Settings(home=home, models_dir=models, device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def live(studio, tmp_path_factory):
    """The routes over that Studio; its generations are instant stand-ins (server_helpers.FakeStudio):
    what is tested here is the server's part (options into requests, listings, Extras' pixels)."""
    app = make_app(tmp_path_factory.mktemp("a1111-rest-home"), studio=FakeStudio(studio), max_pixels=256 * 256,
                   max_batch_images=4)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def api(live):
    return webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=4)


def picture(w: int = 24, h: int = 16) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def b64(img: Image.Image, parameters: str = "") -> str:
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    if parameters:
        meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


# -- the tables -----------------------------------------------------------------------------------
def test_every_extras_field_has_exactly_one_rule():
    tables = {"EXTRAS_UPSCALE": EXTRAS_UPSCALE, "EXTRAS_FACES": EXTRAS_FACES, "EXTRAS_SHELL": EXTRAS_SHELL,
              "EXTRAS_NO_EFFECT": set(EXTRAS_NO_EFFECT)}
    for body in (ExtrasSingleBody, ExtrasBatchBody):
        for name in body.model_fields:
            owners = [t for t, names in tables.items() if name in names]
            assert len(owners) == 1, f"{body.__name__}.{name} is in {owners or 'no table'}"


# -- Extras ---------------------------------------------------------------------------------------
def test_extras_single_is_the_upscaler_at_a1111_sizes(api):
    src = picture(24, 16)
    r = api.extra_single_image(src, upscaler_1="Lanczos", upscaling_resize=2)
    assert r.image.size == (48, 32)
    assert np.array_equal(pixels(r.image), pixels(src.resize((48, 32), Image.LANCZOS)))
    assert "Postprocess upscaler: Lanczos" in r.image.info["postprocessing"]
    # A1111 rounds the size down to a multiple of 8: 24 x 1.5 = 36 -> 32, 16 x 1.5 = 24
    assert api.extra_single_image(src, upscaler_1="Nearest", upscaling_resize=1.5).image.size == (32, 24)
    # upscaler 2 blended in at its visibility
    r = api.extra_single_image(src, upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=0.5,
                               upscaling_resize=2)
    want = Image.blend(src.resize((48, 32), Image.LANCZOS), src.resize((48, 32), Image.NEAREST), 0.5)
    assert np.array_equal(pixels(r.image), pixels(want))
    # scale to 40x40 with crop: covered (factor 2.5 -> 56x40), then centred on the 40x40 canvas
    r = api.extra_single_image(src, upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=40, upscaling_resize_h=40)
    big = src.resize((56, 40), Image.LANCZOS)
    assert r.image.size == (40, 40) and np.array_equal(pixels(r.image), pixels(big.crop((8, 0, 48, 40))))
    # A1111's "None" upscaler leaves the picture as it is
    assert np.array_equal(pixels(api.extra_single_image(src).image), pixels(src))


def test_extras_batch_and_the_generation_parameters_kept(api):
    made = Image.open(io.BytesIO(base64.b64decode(b64(picture(64, 64), "a red circle\nSteps: 2, Seed: 2"))))
    r = api.extra_batch_images([made, picture(16, 16)], upscaler_1="Nearest", upscaling_resize=2)
    assert [i.size for i in r.images] == [(128, 128), (32, 32)]
    assert np.array_equal(pixels(r.images[0]), pixels(made.resize((128, 128), Image.NEAREST)))
    assert r.images[0].info["parameters"] == made.info["parameters"]  # the source's infotext travels on


@pytest.mark.parametrize("body, status, field, words", [
    ({"upscaler_1": "RealESRGAN_x4plus"}, 422, "upscaler_1", "Lanczos"),
    ({"upscaler_1": "../../etc/passwd"}, 422, "upscaler_1", "upscaler"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 8, "resize_mode": 0, "image_size": 64}, 422, "upscaling_resize",
     "max_pixels"),
    ({"gfpgan_visibility": 0.5}, 422, "gfpgan_visibility", "face_restore"),
    ({"codeformer_visibility": 0.5}, 422, "codeformer_visibility", "CodeFormer"),
    ({"resize_mode": 2}, 422, "resize_mode", ""),
    ({"image": "AAAA"}, 422, "image", ""),
])
def test_extras_refusals_name_the_field(live, body, status, field, words):
    size = body.pop("image_size", 16)
    body = {"image": b64(picture(size, size)), **body}
    r = httpx.post(live.url + BASE + "/extra-single-image", json=body, timeout=60)
    assert r.status_code == status, r.text
    if field:
        assert r.json()["field"] == field
    assert words in r.json()["detail"]


def test_extras_batch_is_bounded(live):
    body = {"imageList": [{"data": b64(picture(8, 8)), "name": f"p{i}"} for i in range(5)], "upscaler_1": "Lanczos"}
    r = httpx.post(live.url + BASE + "/extra-batch-images", json=body, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "imageList" and "max_batch_images" in r.json()["detail"]


# -- options, listings ----------------------------------------------------------------------------
def test_model_switch_through_the_options(live, api):
    titles = {m["model_name"]: m["title"] for m in api.get_sd_models()}
    assert {"danqing-tiny", "danqing-tiny-random"} <= set(titles)
    api.util_set_model(titles["danqing-tiny-random"], find_closest=False)
    try:
        assert api.util_get_current_model() == titles["danqing-tiny-random"]
        r = api.txt2img(prompt="a circle", seed=1, steps=2, **TINY)
        assert "Model: danqing-tiny-random" in r.info["infotexts"][0]  # the request the options made
    finally:
        api.set_options({"sd_model_checkpoint": titles["danqing-tiny"]})
    assert api.util_get_current_model() == titles["danqing-tiny"]
    r = api.txt2img(prompt="a circle", seed=1, steps=2, **TINY)
    assert "Model: danqing-tiny" in r.info["infotexts"][0] and "random" not in r.info["infotexts"][0]
    bad = httpx.post(live.url + BASE + "/options", json={"sd_model_checkpoint": "nope"})
    assert bad.status_code == 422 and bad.json()["field"] == "sd_model_checkpoint"


def test_loras_and_embeddings_are_listed(api):
    from danqing.models.registry import bundled_lora_entries

    bundled = sorted((e.name, e.name) for e in bundled_lora_entries())  # the folder's heart shadows the bundled one
    assert sorted((x["name"], x["alias"]) for x in api.get_loras()) == bundled
    emb = api.get_embeddings()
    assert emb["loaded"]["dq-star"]["vectors"] == 3 and emb["loaded"]["dq-star"]["shape"] == 32
    assert emb["skipped"] == {}


def test_the_small_routes(live, api, studio):
    assert api.get_hypernetworks() == [] and api.get_face_restorers() == [] and api.get_realesrgan_models() == []
    info = httpx.get(live.url + BASE + "/script-info").json()
    names = {(s["name"], s["is_img2img"]) for s in info}
    assert names == {("x/y/z plot", False), ("x/y/z plot", True), ("prompts from file or textbox", False),
                     ("prompts from file or textbox", True)}
    xyz = next(s for s in info if s["name"] == "x/y/z plot")
    assert xyz["args"][0] == {"label": "x_type", "value": 1, "minimum": None, "maximum": None, "step": None,
                              "choices": None}
    for path in ("/refresh-loras", "/refresh-checkpoints"):
        r = httpx.post(live.url + BASE + path, timeout=120)
        assert r.status_code == 200 and r.json() is None, (path, r.text)
    manager = studio.models
    assert httpx.post(live.url + BASE + "/reload-checkpoint", timeout=120).json() == {}
    assert [key[0] for key in manager._cache.keys()] == ["danqing-tiny"]  # the options' model, loaded
    assert httpx.post(live.url + BASE + "/unload-checkpoint", timeout=120).json() == {}
    assert len(manager._cache) == 0
    assert api.get_cmd_flags()["port"] == 7860  # the settings' port (the test server runs elsewhere)
    assert "ram" in api.get_memory()
