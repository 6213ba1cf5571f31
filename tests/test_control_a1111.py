"""sd-webui-controlnet's API units (``alwayson_scripts.controlnet.args``) -> ControlUnit fields,
built with the real A1111 client's ``ControlNetUnit``."""

from __future__ import annotations

import pytest
from conftest import need_module
from PIL import Image

webuiapi = need_module("webuiapi", "pip install -e '.[test]'")

from danqing.request import ControlUnit  # noqa: E402
from danqing.errors import InvalidRequest  # noqa: E402
from danqing.server.a1111 import controlnet_units  # noqa: E402


def _args(*units):
    return {"ControlNet": {"args": [u.to_dict() for u in units]}}


def test_client_units_map_onto_control_units():
    pic = Image.new("RGB", (64, 64), "white")
    u = webuiapi.ControlNetUnit(image=pic, module="lineart_realistic", model="danqing-tiny-lineart [0123abcd]",
                                weight=0.6, resize_mode="Resize and Fill", guidance_start=0.1, guidance_end=0.9,
                                control_mode=1, pixel_perfect=True, threshold_a=-1, threshold_b=-1)
    off = webuiapi.ControlNetUnit(image=pic, model="x", enabled=False)
    (fields, image), = controlnet_units(_args(u, off))
    assert image  # the base64 picture, decoded by the route
    unit = ControlUnit(**fields, image="x.png")
    assert (unit.model, unit.module, unit.weight, unit.resize_mode, unit.control_mode) == (
        "danqing-tiny-lineart", "lineart", 0.6, "Resize and Fill", "My prompt is more important")
    assert (unit.guidance_start, unit.guidance_end, unit.pixel_perfect, unit.threshold_a) == (0.1, 0.9, True, None)
    assert controlnet_units({}) == []


@pytest.mark.parametrize("alwayson, field", [
    ({"ADetailer": {"args": []}}, "alwayson_scripts"),
    ({"controlnet": {"args": [{"model": "m", "image": "abc", "low_vram": True}]}}, "args.0.low_vram"),
    ({"controlnet": {"args": [{"model": "m", "image": "abc", "frobnicate": 1}]}}, "args.0.frobnicate"),
    ({"controlnet": {"args": [{"model": "m"}]}}, "args.0.image"),
    ({"controlnet": {"args": [{"model": "m", "image": "abc", "module": "hed_magic"}]}}, "args.0.module"),
    ({"controlnet": {"args": [{"model": "m", "image": "abc", "control_mode": 7}]}}, "args.0.control_mode"),
])
def test_what_cannot_be_honoured_is_refused(alwayson, field):
    with pytest.raises(InvalidRequest, match=field.replace(".", r"\.")):
        controlnet_units(alwayson)


@pytest.fixture(scope="module")
def live_app(tmp_path_factory):
    from server_helpers import LiveServer, make_app

    app = make_app(tmp_path_factory.mktemp("cn-home"))
    with LiveServer(app) as server:
        yield server, app


def test_live_txt2img_with_a_controlnet_unit(live_app):
    """The real A1111 client's ``controlnet_units`` through a live server: the unit is applied
    (the picture differs from the same request without it) and written into the infotext."""
    import numpy as np
    from server_helpers import TINY

    from danqing.preprocess import run_preprocessor
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import eval_scenes

    server, _ = live_app
    edges = run_preprocessor("canny", render(eval_scenes(1)[0]), resolution=64)
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=4)
    unit = webuiapi.ControlNetUnit(image=edges, module="none", model="danqing-tiny-canny", weight=1.0)
    # fresh alwayson_scripts each call: webuiapi's default dict is shared between calls
    with_cn = api.txt2img(prompt="a red circle", seed=3, controlnet_units=[unit], alwayson_scripts={}, **TINY)
    without = api.txt2img(prompt="a red circle", seed=3, alwayson_scripts={}, **TINY)
    a, b = (np.asarray(r.image.convert("RGB"), np.float32) for r in (with_cn, without))
    assert np.abs(a - b).mean() > 2
    assert 'ControlNet 0: "Module: none, Model: danqing-tiny-canny' in with_cn.info["infotexts"][0]


def test_apps_run_through_the_job_queue(live_app):
    """The UI's project tabs run the apps on ``QueuedStudio``: every picture goes through the
    worker (the only owner of the models)."""
    from danqing.apps import QueuedStudio
    from danqing.apps.control_projects import qr_art

    _, app = live_app
    r = qr_art(QueuedStudio(app.state.danqing), "dq", "a red circle", steps=4, size=128, max_attempts=1)
    assert r.image is not None and r.image.size == (128, 128) and len(r.attempts) == 1
