"""The job API for video on the bundled danqing-tiny with a tiny motion module: a text-to-video
job end to end (progress per step, the MP4 served from the outputs folder), a video-to-video job
with an uploaded clip (its frame count and rate kept), and every bad input a 4xx JSON with
nothing queued and nothing kept."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from server_helpers import TINY, make_app
from test_video import tiny_adapter

from danqing.outputs.video import probe_video, read_frames, read_video_parameters

PROMPT = "a red circle moving to the right"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("video-api")


@pytest.fixture(scope="module")
def studio(home):
    from danqing import Settings, Studio

    models = home / "models"
    tiny_adapter().save_pretrained(models / "motion" / "tiny-mm")
    return Studio(Settings(home=home / "studio", models_dir=models, device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def client(home, studio):
    from fastapi.testclient import TestClient

    with TestClient(make_app(home / "server", studio=studio)) as c:
        yield c


def gif_clip(frames: int = 5, fps: int = 10) -> str:
    pictures = [Image.fromarray(np.full((64, 64, 3), (40 * i, 100, 200), np.uint8)) for i in range(frames)]
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:], duration=1000 // fps, loop=0)
    return base64.b64encode(buf.getvalue()).decode()


def run_job(client, body: dict) -> dict:
    r = client.post("/api/v1/video/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running")
    r = client.get(f"/api/v1/jobs/{job['id']}/wait", params={"timeout": 120})
    assert r.status_code == 200 and r.json()["status"] == "done", r.text
    return r.json()


def test_txt2video_job_progress_and_mp4(client, home, tmp_path):
    req = {**TINY, "prompt": PROMPT, "frames": 4, "fps": 8, "steps": 2, "cfg_scale": 1.0, "seed": 5,
           "model": "danqing-tiny"}
    job = run_job(client, {"request": req})
    assert job["kind"] == "txt2video" and job["request"]["motion_module"] is None  # the only one, run as named:
    assert job["result"]["request"]["motion_module"] == "tiny-mm"
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job['id']}/events") as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    steps = [(e["step"], e["total"]) for e in events if e.get("status") == "running"]
    assert steps == [(1, 2), (2, 2)]
    video = job["result"]["videos"][0]
    path = home / "server" / "outputs" / "txt2video"
    assert video["path"].startswith(str(path)) and video["path"].endswith("-5.mp4") and video["seed"] == 5
    r = client.get(video["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    (tmp_path / "got.mp4").write_bytes(r.content)
    info = probe_video(tmp_path / "got.mp4")
    assert (info.frames, info.width, info.height, info.fps) == (4, 64, 64, 8.0)
    assert json.loads(read_video_parameters(tmp_path / "got.mp4"))["request"]["seed"] == 5
    assert client.get(f"/api/v1/jobs/{job['id']}/videos/1").status_code == 404


def test_video2video_job_keeps_frames_and_rate(client):
    req = {"prompt": "a blue square", "steps": 2, "cfg_scale": 1.0, "seed": 1, "denoising_strength": 0.5,
           "motion": False, "cross_frame_attention": True, "flow_blend": 0.5, "model": "danqing-tiny"}
    job = run_job(client, {"request": req, "init_video": gif_clip(5, 10)})
    assert job["kind"] == "video2video"
    ran = job["result"]["request"]
    assert (ran["frames"], ran["fps"], ran["width"], ran["height"]) == (5, 10, 64, 64)
    assert ran["init_video"].endswith("-video.gif") and "init-images" in ran["init_video"]
    frames = read_frames(job["result"]["videos"][0]["path"])
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)


def test_a_control_clip_gives_each_frame_its_map(client, studio, home, tmp_path):
    """``control_videos[0]``: a GIF of four maps (a circle moving right) conditions the frames one
    by one, kept under the server's inputs; the clip is the library's with that file, and its
    frame i is the frame i of a run with map i alone."""
    from danqing.request_video import VideoRequest
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import Obj, Scene
    from danqing.video.studio import VideoStudio

    maps = [render(Scene((Obj("circle", "red", "large", 0.25 + 0.15 * i, 0.5),), "white", "light grey", "plain"))
            for i in range(4)]
    buf = io.BytesIO()
    maps[0].save(buf, format="GIF", save_all=True, append_images=maps[1:], duration=125, loop=0)
    req = {**TINY, "prompt": "a red circle", "frames": 4, "fps": 8, "steps": 4, "cfg_scale": 7.0, "seed": 3,
           "model": "danqing-tiny", "motion": False, "controlnet": [{"model": "danqing-tiny-canny", "module": "canny"}]}
    job = run_job(client, {"request": req, "control_videos": [base64.b64encode(buf.getvalue()).decode()]})
    ran = job["result"]["request"]
    kept = ran["controlnet"][0]["image"]
    assert kept.endswith("-control.gif") and kept.startswith(str(home / "server" / "outputs" / "init-images"))
    (tmp_path / "maps.gif").write_bytes(buf.getvalue())
    got = read_frames(job["result"]["videos"][0]["path"])
    assert len(got) == 4
    local = VideoStudio(studio).generate(VideoRequest.create(**{**ran, "controlnet": [
        {**ran["controlnet"][0], "image": str(tmp_path / "maps.gif")}]}), out=tmp_path / "local.mp4")
    assert all(np.array_equal(a, b) for a, b in zip(got, read_frames(local.paths[0])))
    # frame i is drawn with map i: as the frame of a run whose one picture (every frame's map) is map i
    for i in (0, 3):
        maps[i].save(tmp_path / f"map{i}.png")
        one = VideoStudio(studio).generate(VideoRequest.create(**{**ran, "controlnet": [
            {**ran["controlnet"][0], "image": str(tmp_path / f"map{i}.png")}]})).clips[0]
        assert np.abs(np.asarray(one[i], int) - np.asarray(local.clips[0][i])).max() <= 1
        assert np.abs(np.asarray(one[3 - i], int) - np.asarray(local.clips[0][3 - i])).mean() > 2  # another map


@pytest.mark.parametrize("body,field,detail", [
    ({"request": {**TINY, "prompt": "x", "frames": 65}}, "request.frames", "65 frames is more than the limit of 64 (max_frames)"),
    ({"request": {**TINY, "prompt": "x", "frames": 0}}, "request.frames", "must be between 1 and 128"),
    ({"request": {**TINY, "prompt": "x", "fps": 61}}, "request.fps", "must be between 1 and 60"),
    ({"request": {**TINY, "prompt": "x", "steps": 151}}, "request.steps", "must be between 1 and 150"),
    ({"request": {**TINY, "prompt": "x", "motion_module": "../motion/tiny-mm"}}, "request.motion_module",
     "unknown motion module '../motion/tiny-mm'"),
    ({"request": {**TINY, "prompt": "x", "model": "/etc/passwd"}}, "request.model", "unknown checkpoint"),
    ({"request": {**TINY, "prompt": "x <lora:../../x:1>"}}, "request.prompt", "unknown LoRA"),
    ({"request": {**TINY, "prompt": "x", "flow_blend": 0.5}}, "request.flow_blend", "give init_video"),
    ({"request": {**TINY, "prompt": "x", "init_video": "/etc/passwd"}}, None, "paths are not accepted over HTTP"),
    ({"request": {**TINY, "sampler": "Euler", "init_image": "/etc/passwd"}}, None,
     "request.init_image: paths are not accepted over HTTP; send the picture itself as init_image (base64)"),
    ({"request": {**TINY, "sampler": "Euler"}, "init_image": "not base64!"}, "init_image", "not valid base64"),
    ({"request": {**TINY, "prompt": "x"}, "init_video": gif_clip(5), "init_image": "aGVsbG8="}, None,
     "init_image: image-to-video starts from a picture, video-to-video from a clip"),
    ({"request": {**TINY, "prompt": "x", "controlnet": [{"model": "danqing-tiny-canny", "image": "/etc/passwd"}]}},
     "request.controlnet.0.image", "paths are not accepted over HTTP"),
    ({"request": {**TINY, "prompt": "x", "controlnet": [{"model": "../canny", "image": "/etc/passwd"}]}},
     "request.controlnet.0.model", "unknown controlnet '../canny'"),
    ({"request": {**TINY, "prompt": "x"}, "init_video": "not base64!"}, "init_video", "not valid base64"),
    ({"request": {**TINY, "prompt": "x"}, "init_video": base64.b64encode(b"\0" * 64).decode()}, "init_video",
     "cannot be decoded"),
    ({"request": {**TINY, "prompt": "x", "frames": 9}, "init_video": gif_clip(5)}, "request.frames",
     "has 5 frames; ask for at most that many, got 9"),
    ({"request": {**TINY, "prompt": "x", "frames": 6, "controlnet": [{"model": "danqing-tiny-canny"}]},
      "control_videos": [gif_clip(5)]}, "control_videos.0", "the control clip has 5 frames; the video asks for 6"),
    ({"request": {**TINY, "prompt": "x", "controlnet": [{"model": "danqing-tiny-canny"}]},
      "control_videos": [base64.b64encode(b"\0" * 64).decode()]}, "control_videos.0", "cannot be decoded"),
    ({"request": {**TINY, "prompt": "x", "controlnet": [{"model": "danqing-tiny-canny"}]},
      "control_videos": ["not base64!"]}, "control_videos.0", "not valid base64"),
    ({"request": {**TINY, "prompt": "x"}, "control_videos": [gif_clip(5)]}, None,
     "control_videos: 1 clips for 0 ControlNet units"),
    ({"request": {**TINY, "prompt": "x", "controlnet": [{"model": "danqing-tiny-canny", "image": "/etc/passwd"}]},
      "control_videos": [gif_clip(5)]}, None, "control_videos.0: request.controlnet.0 has an image too"),
    ({"request": {**TINY, "prompt": "x", "controlnet": [{"model": "../canny"}]}, "control_videos": [gif_clip(5)]},
     "request.controlnet.0.model", "unknown controlnet '../canny'"),
    ({"request": {**TINY, "prompt": "x", "enable_hr": True}}, "request.enable_hr", "not available for video"),
    ({"request": {**TINY, "prompt": "x", "frames": 4.0}}, None, "frames"),
    ({"request": {**TINY, "prompt": "x"}, "extra": 1}, None, "extra"),
])
def test_bad_video_jobs_are_one_422_and_keep_nothing(client, home, body, field, detail):
    before = client.get("/api/v1/history").json()["jobs"]
    inputs = home / "server" / "outputs" / "init-images"
    kept = sorted(inputs.rglob("*"))
    r = client.post("/api/v1/video/jobs", json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert detail in err["detail"] and "\n" not in err["detail"], err
    if field is not None:
        assert err["field"] == field, err
    assert client.get("/api/v1/history").json()["jobs"] == before
    assert sorted(inputs.rglob("*")) == kept  # no upload kept by a refusal
