"""The web UI's Video tab, driven through its Gradio handler (no browser), on danqing-tiny: a
text-to-video job with a tiny motion module streams its steps, then the player gets an MP4 of
the asked frame count; a ControlNet unit reaches every frame as the library takes it; a picture with
a Stable Video Diffusion checkpoint makes an image-to-video clip, the library's own."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from server_helpers import make_app
from test_video import tiny_adapter
from test_video_svd import SVD_FIELDS, tiny_svd

from danqing.outputs.video import probe_video, read_frames


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from diffusers import StableVideoDiffusionPipeline
    from fastapi.testclient import TestClient

    import danqing.server.ui as ui
    from danqing import Settings, Studio

    home = tmp_path_factory.mktemp("ui-video")
    models = home / "models"
    tiny_adapter().save_pretrained(models / "motion" / "tiny-mm")
    still = tiny_adapter()
    for name, module in still.named_modules():  # output projections at zero: every frame drawn on its own
        if name.endswith("proj_out"):
            module.weight.data.zero_()
            module.bias.data.zero_()
    still.save_pretrained(models / "motion" / "still-mm")
    parts = tiny_svd()
    StableVideoDiffusionPipeline(vae=parts.vae, image_encoder=parts.image_encoder, unet=parts.unet,
                                 scheduler=parts.scheduler, feature_extractor=parts.feature_extractor,
                                 ).save_pretrained(models / "checkpoints" / "svd-tiny")
    studio = Studio(Settings(home=home / "studio", models_dir=models, device="cpu", dtype="fp32"))
    captured = {}
    real = ui.build_ui
    mp = pytest.MonkeyPatch()
    mp.setattr(ui, "build_ui", lambda state: captured.setdefault("demo", real(state)))
    app = make_app(home / "server", studio=studio, ui=True)
    mp.undo()
    with TestClient(app):
        yield captured["demo"], studio, home


def video_fn(demo):
    fns = [f for f in demo.fns.values() if any(type(i).__name__ == "Checkbox" for i in f.inputs)
           and any(type(o).__name__ == "Video" for o in f.outputs)]
    assert len(fns) == 1
    return fns[0].fn


def make(demo, prompt="", *, model="danqing-tiny", motion=None, picture=None, bucket=127, size=64, frames=4,
         fps=8, steps=2, cfg=7.0, seed=5, control=(None, None, "none", 1.0, "Balanced")):
    # checkpoint, prompt, negative, motion module, clip, cross-frame, shared noise, flow blend, picture, motion
    # bucket, width, height, frames, fps, steps, cfg, strength, seed, then the ControlNet unit (image, model,
    # preprocessor, weight, mode)
    return list(video_fn(demo)(model, prompt, "", motion, None, False, False, 0.0, picture, bucket, size, size, frames,
                               fps, steps, cfg, 0.5, seed, *control))


def test_the_video_tab_plays_the_clip(demo):
    items = make(demo[0], "a red circle moving to the right", motion="tiny-mm")
    assert any(str(i[1]).startswith("step ") for i in items[:-1])
    _, status, mp4 = items[-1]
    assert status == "done: 1 clip(s)" and mp4.endswith(".mp4")
    info = probe_video(mp4)
    assert info.frames == 4 and info.fps == 8


def test_a_controlnet_unit_reaches_every_frame_as_the_library_takes_it(demo, tmp_path):
    """The bundled canny ControlNet with a picture (canny preprocessor): the map is kept under the
    server's inputs, the clip is the library's clip with that unit (frame for frame), and it is
    not the clip the same request makes without the unit."""
    import json

    from danqing.outputs.video import read_video_parameters
    from danqing.request_video import VideoRequest
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import Obj, Scene
    from danqing.video.studio import VideoStudio

    ui_demo, studio, _ = demo
    target = render(Scene((Obj("circle", "red", "large", 0.75, 0.5),), "white", "light grey", "plain"))
    unit = (target, "danqing-tiny-canny", "canny", 0.8, "Balanced")
    kw = dict(motion="still-mm", steps=6, frames=3, seed=5)
    *_, (_, status, mp4) = make(ui_demo, "a red circle", control=unit, **kw)
    assert status == "done: 1 clip(s)"
    ran = json.loads(read_video_parameters(mp4))["request"]
    got = ran["controlnet"][0]
    assert (got["model"], got["module"], got["weight"]) == ("danqing-tiny-canny", "canny", 0.8)
    assert got["image"].endswith("-control.png") and "init-images" in got["image"]
    target.save(tmp_path / "map.png")
    local = VideoStudio(studio).generate(VideoRequest.create(**{**ran, "controlnet": [{**got, "image": str(tmp_path / "map.png")}]}),
                                         out=tmp_path / "local.mp4")
    frames = read_frames(mp4)
    assert all(np.array_equal(a, b) for a, b in zip(frames, read_frames(local.paths[0])))
    *_, (_, _, plain) = make(ui_demo, "a red circle", **kw)
    assert any(np.abs(a.astype(int) - b).mean() > 2 for a, b in zip(frames, read_frames(plain)))


def test_a_picture_and_an_svd_checkpoint_make_the_librarys_image_to_video_clip(demo, tmp_path):
    from danqing.request_video import VideoRequest
    from danqing.video.studio import VideoStudio

    ui_demo, studio, home = demo
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    picture.save(tmp_path / "start.png")
    f = SVD_FIELDS
    *_, (_, status, mp4) = make(ui_demo, model="svd-tiny", picture=picture, frames=f["frames"], fps=f["fps"],
                                steps=f["steps"], cfg=f["cfg_scale"], seed=f["seed"])
    assert status == "done: 1 clip(s)" and "/img2video/" in mp4
    local = VideoStudio(studio).generate(VideoRequest.create(init_image=str(tmp_path / "start.png"), **SVD_FIELDS),
                                         out=tmp_path / "local.mp4")
    got, want = read_frames(mp4), read_frames(local.paths[0])
    assert len(got) == f["frames"] and all(np.array_equal(a, b) for a, b in zip(got, want))
    # a prompt with the picture is one clear error: SVD reads the picture alone
    with pytest.raises(Exception, match="picture alone"):
        make(ui_demo, "a red circle", model="svd-tiny", picture=picture, frames=3, steps=2)


def test_a_control_clip_gives_each_frame_its_map_as_the_library_does(demo, tmp_path):
    """The unit's clip (a GIF of three maps, a circle moving right): kept under the server's
    inputs as it came, the clip is the library's with that file; a picture and a clip together
    are one clear error."""
    import json

    import gradio as gr

    from danqing.outputs.video import read_video_parameters
    from danqing.request_video import VideoRequest
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import Obj, Scene
    from danqing.video.studio import VideoStudio

    ui_demo, studio, _ = demo
    maps = [render(Scene((Obj("circle", "red", "large", 0.25 + 0.25 * i, 0.5),), "white", "light grey", "plain"))
            for i in range(3)]
    maps[0].save(tmp_path / "maps.gif", save_all=True, append_images=maps[1:], duration=125, loop=0)
    unit = (None, "danqing-tiny-canny", "canny", 1.0, "Balanced", str(tmp_path / "maps.gif"))
    *_, (_, status, mp4) = make(ui_demo, "a red circle", motion="still-mm", steps=4, frames=3, seed=2, control=unit)
    assert status == "done: 1 clip(s)"
    ran = json.loads(read_video_parameters(mp4))["request"]
    got = ran["controlnet"][0]
    assert got["image"].endswith("-control.gif") and "init-images" in got["image"]
    local = VideoStudio(studio).generate(VideoRequest.create(**{**ran, "controlnet": [
        {**got, "image": str(tmp_path / "maps.gif")}]}), out=tmp_path / "local.mp4")
    assert all(np.array_equal(a, b) for a, b in zip(read_frames(mp4), read_frames(local.paths[0])))
    with pytest.raises(gr.Error, match="the control image or the control clip, not both"):
        make(ui_demo, "a red circle", motion="still-mm", control=(maps[0], *unit[1:]))
