"""The job API for text-to-3D on the bundled danqing-tiny: a tiny job end to end (progress with
step, loss and a front-view preview, the GLB served and loaded back by trimesh), and bad input
as a 4xx JSON with nothing queued."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import fields

import pytest
from PIL import Image
from server_helpers import make_app

from danqing.server.threed import ThreeDJobSubmit
from danqing.threed.run import ThreeDRequest

TINY3D = {"prompt": "a red ball", "model": "danqing-tiny", "steps": 4, "size": 32, "grid": 16, "samples": 16,
          "frames": 4, "checkpoint_every": 0, "seed": 3}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    with TestClient(make_app(tmp_path_factory.mktemp("threed-api"))) as c:
        yield c


def test_the_job_body_has_the_fields_of_the_library_request():
    assert set(ThreeDJobSubmit.model_fields) == {f.name for f in fields(ThreeDRequest)}


def test_3d_job_progress_preview_and_glb(client, monkeypatch):
    import trimesh

    monkeypatch.setattr("danqing.server.media.PREVIEW_EVERY", 2)
    r = client.post("/api/v1/3d/jobs", json=TINY3D)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "3d" and job["request"]["steps"] == 4
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    steps = [d for n, d in events if n == "progress"]
    assert [d["step"] for d in steps] == [1, 2, 3, 4] and all(d["total"] == 4 for d in steps)
    losses = [d["loss"] for d in steps if "loss" in d]
    assert losses and all(isinstance(x, float) and x == x for x in losses)
    previews = [Image.open(io.BytesIO(base64.b64decode(d["preview"]))) for d in steps if "preview" in d]
    assert previews and previews[0].size == (32, 32)
    done = events[-1][1]
    assert events[-1][0] == "done" and done["status"] == "done", done
    files = {f["kind"]: f for f in done["result"]["files"]}
    assert {"glb", "obj", "ply", "gif", "mp4", "json"} <= set(files)
    assert len(done["result"]["losses"]) == 4
    r = client.get(files["glb"]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "model/gltf-binary"
    mesh = trimesh.load(io.BytesIO(r.content), file_type="glb", force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.vertex_colors.shape[0] == len(mesh.vertices)
    r = client.get(files["mp4"]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and len(r.content) > 100
    assert client.get(f"/api/v1/jobs/{job['id']}/files/99").status_code == 404


@pytest.mark.parametrize("change, field, words", [
    ({"steps": 6000}, "steps", "limit of 5000"),
    ({"size": 36}, "size", "multiple of 8"),
    ({"model": "../danqing-tiny"}, "model", ""),
    ({"model": "no-such-model"}, "model", ""),
    ({"background": "plaid"}, "background", "known: learned"),
    ({"prompt": " "}, "prompt", "give a prompt"),
    ({"steps": "4"}, "steps", ""),
    ({"unknown": 1}, "unknown", ""),
])
def test_bad_3d_jobs_are_refused_with_one_message(client, change, field, words):
    before = client.get("/api/v1/jobs").json()
    r = client.post("/api/v1/3d/jobs", json={**TINY3D, **change})
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert field in json.dumps(body) and words in json.dumps(body), body
    assert client.get("/api/v1/jobs").json() == before  # nothing queued


def test_a_3d_job_never_joins_a_batch():
    from danqing.server.batching import compat_key

    assert compat_key(ThreeDRequest(**{k: v for k, v in TINY3D.items()})) is None
