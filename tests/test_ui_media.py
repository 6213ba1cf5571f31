"""The web UI's 3D tab, driven through its Gradio handler (no browser): a tiny job on
danqing-tiny streams step and loss lines, then hands the Model3D viewer a GLB that trimesh loads
and the turntable an MP4; the Inpaint tab refuses a picture with nothing painted."""

from __future__ import annotations

import pytest
from server_helpers import make_app


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastapi.testclient import TestClient

    import danqing.server.ui as ui

    captured = {}
    real = ui.build_ui
    mp = pytest.MonkeyPatch()
    mp.setattr(ui, "build_ui", lambda state: captured.setdefault("demo", real(state)))
    app = make_app(tmp_path_factory.mktemp("ui-media"), ui=True)
    mp.undo()
    with TestClient(app):
        yield captured["demo"]


def handler(demo, component: str):
    """The click handler of the one event whose outputs hold a ``component`` (class name)."""
    fns = [f for f in demo.fns.values() if any(type(o).__name__ == component for o in f.outputs)]
    assert len(fns) == 1, [f.name for f in fns]
    return fns[0].fn


def test_the_3d_tab_streams_progress_then_shows_the_mesh_and_turntable(demo):
    import trimesh

    # enough steps that the 0.25 s poll sees the job running (3 steps can end before the first poll)
    items = list(handler(demo, "Model3D")("a red ball", "", 40, 32, 1))
    lines = [i[1] for i in items]
    assert any(line.startswith("step ") and ", loss " in line for line in lines), lines
    _, status, glb, mp4, files = items[-1]
    assert status == "done: 40 steps"
    assert glb.endswith(".glb") and mp4.endswith(".mp4") and len(files) == 4
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 0


def test_the_3d_tab_says_what_is_wrong(demo):
    import gradio as gr

    with pytest.raises(gr.Error, match="size: must be a multiple of 8"):
        list(handler(demo, "Model3D")("a red ball", "", 3, 36, 1))


def test_the_talk_tab_plays_the_talking_portrait(demo, tmp_path):
    from skimage import data
    from PIL import Image
    from test_talk import need_espeak, need_landmarks

    need_espeak()
    need_landmarks()
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((256, 256)).save(photo)
    fns = [f for f in demo.fns.values() if any(type(i).__name__ == "Audio" for i in f.inputs)]
    assert len(fns) == 1
    items = list(fns[0].fn(str(photo), "Hello.", "en", None, 10, 1.0))
    status, mp4 = items[-1]
    assert status.startswith("done: ") and mp4.endswith(".mp4")
    import av

    with av.open(mp4) as box:
        assert box.streams.audio and box.streams.video


def test_inpaint_with_nothing_painted_says_so(demo):
    """The Inpaint tab with a picture but no brush stroke refuses, rather than redrawing it all."""
    import gradio as gr
    from PIL import Image

    fn = next(f.fn for f in demo.fns.values() if f.api_name == "img2img")
    picture = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    editor = {"background": picture, "layers": [Image.new("RGBA", (64, 64))], "composite": picture}
    with pytest.raises(gr.Error, match="mask: nothing is painted"):
        list(fn(None, "inpaint", None, editor))
