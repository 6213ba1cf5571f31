"""The job API for the talking portrait: a photo (scikit-image's astronaut) and a line of text
queued as a job, the MP4 served with its sound stream; bad input a 4xx JSON with nothing kept."""

from __future__ import annotations

import base64
import io

import av
import pytest
from PIL import Image
from server_helpers import make_app
from test_talk import need_espeak, need_landmarks


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    with TestClient(make_app(tmp_path_factory.mktemp("talk-api"))) as c:
        yield c


def astronaut_b64() -> str:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((256, 256)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_talk_job_serves_an_mp4_with_sound(client):
    need_espeak()
    need_landmarks()
    r = client.post("/api/v1/talk/jobs", json={"picture": astronaut_b64(), "text": "Hello.", "fps": 10})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "talk" and job["prompt"] == "Hello."
    r = client.get(f"/api/v1/jobs/{job['id']}/wait", params={"timeout": 120})
    done = r.json()
    assert done["status"] == "done", done
    mp4 = next(f for f in done["result"]["files"] if f["kind"] == "mp4")
    r = client.get(mp4["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(r.content)) as box:
        assert box.streams.video and box.streams.audio
        frames = sum(1 for _ in box.decode(video=0))
    assert frames == done["result"]["frames"] > 0


@pytest.mark.parametrize("change, field", [
    ({"text": None}, "text"),
    ({"voice": "xx"}, "voice"),
    ({"fps": 0}, "fps"),
    ({"picture": "not base64!"}, "picture"),
    ({"fps": "10"}, "fps"),
])
def test_bad_talk_jobs_are_refused(client, change, field, tmp_path):
    before = client.get("/api/v1/jobs").json()
    r = client.post("/api/v1/talk/jobs", json={"picture": astronaut_b64(), "text": "Hello.", **change})
    assert 400 <= r.status_code < 500 and field in r.text, r.text
    assert client.get("/api/v1/jobs").json() == before
