"""The web UI's Video tab, driven through its Gradio handler (no browser), on danqing-tiny with
a tiny motion module: a text-to-video job streams its steps, then the player gets an MP4 of the
asked frame count."""

from __future__ import annotations

import pytest
from server_helpers import make_app
from test_video import tiny_adapter

from danqing.outputs.video import probe_video


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastapi.testclient import TestClient

    import danqing.server.ui as ui
    from danqing import Settings, Studio

    home = tmp_path_factory.mktemp("ui-video")
    models = home / "models"
    tiny_adapter().save_pretrained(models / "motion" / "tiny-mm")
    studio = Studio(Settings(home=home / "studio", models_dir=models, device="cpu", dtype="fp32"))
    captured = {}
    real = ui.build_ui
    mp = pytest.MonkeyPatch()
    mp.setattr(ui, "build_ui", lambda state: captured.setdefault("demo", real(state)))
    app = make_app(home / "server", studio=studio, ui=True)
    mp.undo()
    with TestClient(app):
        yield captured["demo"]


def test_the_video_tab_plays_the_clip(demo):
    fns = [f for f in demo.fns.values() if any(type(i).__name__ == "Checkbox" for i in f.inputs)
           and any(type(o).__name__ == "Video" for o in f.outputs)]
    assert len(fns) == 1
    # prompt, negative, motion module, clip, cross-frame, shared noise, flow blend, width, height, frames, fps, steps,
    # strength, seed
    items = list(fns[0].fn("a red circle moving to the right", "", "tiny-mm", None, False, False, 0.0, 64, 64, 4, 8, 2,
                           0.5, 5))
    assert any(str(i[1]).startswith("step ") for i in items[:-1])
    _, status, mp4 = items[-1]
    assert status == "done: 1 clip(s)" and mp4.endswith(".mp4")
    info = probe_video(mp4)
    assert info.frames == 4 and info.fps == 8
