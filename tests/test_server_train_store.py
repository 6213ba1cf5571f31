"""Training jobs in the job store (danqing/server/train.py, store migration 3): a finished job is
listed by a new server on the same HOME with its kind, name, steps, loss curve, sample grid and
files; one that was running when its server stopped reads "interrupted"; a long curve is thinned."""

from __future__ import annotations

import pytest
from PIL import Image
from server_helpers import make_app


@pytest.fixture()
def home(tmp_path):
    data = tmp_path / "datasets" / "squares"
    data.mkdir(parents=True)
    for i, colour in enumerate(((220, 30, 30), (30, 30, 220))):
        img = Image.new("RGB", (64, 64), (240, 240, 240))
        img.paste(colour, (16, 16, 48, 48))
        img.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a square, colour {i}")
    return tmp_path


def test_a_new_server_lists_the_jobs_of_the_last_one(studio, home):
    from fastapi.testclient import TestClient

    from danqing.server.store import SCHEMA_VERSION

    with TestClient(make_app(home, studio=studio)) as c:
        r = c.post("/api/v1/train/jobs", json={"dataset": "squares", "name": "sq-kept", "base": "tiny-sd1", "steps": 2,
                                               "rank": 2, "sample_every": 1000, "sample_steps": 2})
        assert r.status_code == 202, r.text
        done = c.get(f"/api/v1/train/jobs/{r.json()['id']}/wait", params={"timeout": 120}).json()
        assert done["status"] == "done", done["error"]
        queue = c.app.state.danqing.train
        # a job the server was running when it stopped (its row as the store last had it)
        running = queue.get(done["id"]).record()
        running.update(id="f" * 32, name="sq-cut", status="running", step=1, created=running["created"] + 1)
        queue.store.put_train_job(running)
        assert queue.store.schema_version() == SCHEMA_VERSION
    with TestClient(make_app(home, studio=studio)) as c:  # a restart: a new app on the same HOME
        jobs = c.get("/api/v1/train/jobs").json()
        assert [(j["id"], j["status"]) for j in jobs] == [("f" * 32, "interrupted"), (done["id"], "done")]
        kept = jobs[1]
        for key in ("kind", "name", "step", "total", "losses", "loss", "files", "config"):
            assert kept[key] == done[key], key
        assert kept["files"][-1].endswith("lora/sq-kept.safetensors")
        png = c.get(kept["samples"][0]["url"])
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        cut = c.get("/api/v1/train/jobs/" + "f" * 32).json()
        assert cut["step"] == 1 and "stopped at step 1 of 2" in cut["error"]
        assert c.post("/api/v1/train/jobs/" + "f" * 32 + "/cancel").status_code == 409
    with TestClient(make_app(home, studio=studio)) as c:  # an interrupted job stays interrupted
        assert [j["status"] for j in c.get("/api/v1/train/jobs").json()] == ["interrupted", "done"]


def test_the_stored_curve_is_thinned_with_its_summary():
    from danqing.server.train import CURVE_POINTS, TrainJob

    job = TrainJob(id="a" * 32, kind="lora", config={}, name="x", losses=[(s, 1.0 / s) for s in range(1, 1001)])
    row = job.record()
    curve = row["data"]["losses"]
    assert len(curve) <= CURVE_POINTS + 1 and curve[0] == [1, 1.0] and curve[-1] == [1000, 0.001]
    assert row["data"]["loss_summary"] == {"count": 1000, "first": 1.0, "last": 0.001, "min": 0.001}
    back = TrainJob.from_record({**row, "data": row["data"]})
    assert back.losses[-1] == (1000, 0.001) and back.view()["loss"] == 0.001
