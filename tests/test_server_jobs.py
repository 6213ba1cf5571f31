"""The async job API on a live server: submit, server-sent events with previews, results,
cancel, history search, a failing job that leaves the server serving, and load (8 clients x 10
requests, in order per client)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from server_helpers import TINY, LiveServer, make_app

from danqing.server.jobs import planned_paths
from danqing.server.store import JobStore


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs-home")


@pytest.fixture(scope="module")
def live(home):
    with LiveServer(make_app(home)) as server:
        yield server


@pytest.fixture()
def client(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


def submit(client, **request) -> dict:
    r = client.post("/api/v1/jobs", json={"request": {**TINY, "steps": 4, **request}})
    assert r.status_code == 202, r.text
    return r.json()


def wait(client, job_id: str) -> dict:
    r = client.get(f"/api/v1/jobs/{job_id}/wait", params={"timeout": 120})
    assert r.status_code == 200, r.text
    return r.json()


def read_events(client, job_id: str) -> list[tuple[str, dict]]:
    events, kind = [], None
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


def test_submit_events_result_round_trip(client, home):
    job = submit(client, prompt="a red circle", seed=11, steps=30, batch_count=2)
    assert job["status"] in ("queued", "running") and job["request"]["seed"] == 11
    events = read_events(client, job["id"])
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    progress = [d for k, d in events if k == "progress"]
    # Per-step progress, monotone, covering both batches; previews are PNGs.
    order = [(d["batch_index"], d["step"]) for d in progress]
    assert order == [(b, s) for b in range(2) for s in range(1, 31)]  # every step, once, in order
    previews = [d["preview"] for d in progress if "preview" in d]
    assert previews and 0 < Image.open(io.BytesIO(base64.b64decode(previews[-1]))).width <= 64  # latent-sized
    done = events[-1][1]
    assert done["status"] == "done" and [i["seed"] for i in done["result"]["images"]] == [11, 12]
    result = client.get(f"/api/v1/jobs/{job['id']}/result").json()
    for i, img in enumerate(result["images"]):
        png = client.get(img["url"])
        assert png.headers["content-type"] == "image/png"
        pic = Image.open(io.BytesIO(png.content))
        assert pic.size == (64, 64) and pic.info["parameters"] == img["infotext"]
        assert img["path"].startswith(str(home / "outputs" / "txt2img-images"))
        assert f"Seed: {11 + i}" in img["infotext"]


def test_img2img_job_with_upload(client):
    src = Image.new("RGB", (64, 64), (200, 30, 30))
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    r = client.post("/api/v1/jobs", json={"request": {**TINY, "steps": 4, "prompt": "a red square", "seed": 2,
                                                      "denoising_strength": 0.0}, "init_image": b64})
    assert r.status_code == 202, r.text
    job = wait(client, r.json()["id"])
    assert job["kind"] == "img2img" and job["status"] == "done"
    out = Image.open(io.BytesIO(client.get(job["result"]["images"][0]["url"]).content)).convert("RGB")
    assert np.abs(np.asarray(out).astype(int) - np.asarray(src).astype(int)).max() <= 2  # strength 0 = the init
    # The stored request names the uploaded file inside the server's init-images folder; resubmitting
    # that request verbatim is allowed, any other path is not.
    path = job["request"]["init_image"]
    assert "/outputs/init-images/" in path
    again = client.post("/api/v1/jobs", json={"request": job["request"]})
    assert again.status_code == 202
    assert wait(client, again.json()["id"])["status"] == "done"


def test_cancel_queued_and_running(client):
    long = submit(client, prompt="a slow one", steps=150, batch_count=20)
    queued = submit(client, prompt="never runs")
    r = client.post(f"/api/v1/jobs/{queued['id']}/cancel")
    assert r.json()["status"] == "cancelled"
    deadline = time.monotonic() + 60
    while client.get(f"/api/v1/jobs/{long['id']}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    t = time.perf_counter()
    r = client.post(f"/api/v1/jobs/{long['id']}/cancel")
    assert r.json()["status"] == "cancelled" and time.perf_counter() - t < 10
    assert r.json()["result"] is None  # nothing kept of a cancelled run
    assert client.post(f"/api/v1/jobs/{long['id']}/cancel").status_code == 409
    assert client.get(f"/api/v1/jobs/{long['id']}/result").status_code == 409


def test_history_search(client):
    ids = [submit(client, prompt=p, seed=1)["id"] for p in ("a purple hexagon", "an orange star", "a purple star")]
    for i in ids:
        wait(client, i)
    found = client.get("/api/v1/history", params={"q": "purple"}).json()["jobs"]
    assert [j["id"] for j in found] == [ids[2], ids[0]]  # newest first, only matches
    assert client.get("/api/v1/history", params={"q": "100%_"}).json()["jobs"] == []  # LIKE wildcards are literal
    done = client.get("/api/v1/history", params={"status": "done", "limit": 2}).json()["jobs"]
    assert len(done) == 2 and all(j["status"] == "done" for j in done)


def test_failing_job_is_recorded_and_server_keeps_serving(client, live):
    from danqing.server.app import create_app  # noqa: F401 -- the app under test is the live one

    # A corrupt checkpoint passes the name check (it is in the folder) and fails in the worker.
    models = live.server.config.app.state.danqing.registry.models_dir
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    (models / "checkpoints" / "broken.safetensors").write_bytes(b"not a safetensors file")
    try:
        job = submit(client, prompt="x", model="broken")
        job = wait(client, job["id"])
        assert job["status"] == "failed" and "broken" in job["error"]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "override_settings": {
            "sd_model_checkpoint": "broken"}, **TINY})
        assert r.status_code == 422 and "broken" in r.json()["detail"]
    finally:
        (models / "checkpoints" / "broken.safetensors").unlink()
    ok = wait(client, submit(client, prompt="still serving", seed=3)["id"])
    assert ok["status"] == "done"


def test_load_8_clients_x_10_requests_in_order(live):
    """Half the clients use the A1111 sync route, half the async job API (all 10 submitted at
    once, then collected). Requests i and i+5 of a client are identical: the same pixels."""
    errors: list[str] = []
    results: dict[int, list] = {}

    def a1111_client(c: int):
        with httpx.Client(base_url=live.url, timeout=300) as http:
            out = []
            for i in range(10):
                seed = 1000 * c + i % 5
                r = http.post("/sdapi/v1/txt2img", json={"prompt": f"client {c} circle", "seed": seed, "steps": 2,
                                                         "sampler_name": "Euler", **TINY})
                if r.status_code != 200:
                    errors.append(f"a1111 {c}/{i}: {r.status_code} {r.text[:200]}")
                    continue
                info = json.loads(r.json()["info"])
                assert info["all_seeds"] == [seed] and info["prompt"] == f"client {c} circle"
                out.append((info["job_id"], np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))))
            results[c] = out

    def job_client(c: int):
        with httpx.Client(base_url=live.url, timeout=300) as http:
            ids = []
            for i in range(10):
                r = http.post("/api/v1/jobs", json={"request": {"prompt": f"client {c} square", "seed": 1000 * c + i % 5,
                                                                "steps": 2, "sampler": "Euler", **TINY}})
                if r.status_code != 202:
                    errors.append(f"jobs {c}/{i}: {r.status_code} {r.text[:200]}")
                    return
                ids.append(r.json()["id"])
            out = []
            for i, job_id in enumerate(ids):
                job = http.get(f"/api/v1/jobs/{job_id}/wait", params={"timeout": 300}).json()
                if job["status"] != "done":
                    errors.append(f"jobs {c}/{i}: {job['status']} {job.get('error')}")
                    return
                img = job["result"]["images"][0]
                assert img["seed"] == 1000 * c + i % 5 and f"client {c} square" in img["infotext"]
                out.append((job_id, np.asarray(Image.open(io.BytesIO(http.get(img["url"]).content)))))
            results[c] = out

    threads = [threading.Thread(target=a1111_client if c % 2 == 0 else job_client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert sorted(results) == list(range(8))
    store: JobStore = live.server.config.app.state.danqing.store
    for c, out in results.items():
        assert len(out) == 10
        jobs = [store.get(job_id) for job_id, _ in out]
        assert [j.seq for j in jobs] == sorted(j.seq for j in jobs), f"client {c}: not in submission order"
        assert all(a.finished <= b.started for a, b in zip(jobs, jobs[1:])), f"client {c}: overlapping runs"
        for i in range(5):
            assert np.array_equal(out[i][1], out[i + 5][1]), f"client {c}: request {i} and {i + 5} differ"
        assert not np.array_equal(out[0][1], out[1][1])  # different seeds, different pictures


def test_planned_paths_follow_a1111_numbering(tmp_path):
    (tmp_path / "00007-5.png").write_bytes(b"")
    assert [p.name for p in planned_paths(tmp_path, [3, 4])] == ["00008-3.png", "00009-4.png"]
    assert [p.name for p in planned_paths(tmp_path / "new", [1])] == ["00000-1.png"]


def test_recover_cleans_up_and_requeues(tmp_path):
    """What a killed server leaves behind: a running job with its planned image half-written (and
    save_png's temp file), a queued job, and an A1111 job whose client is gone."""
    from danqing.request import GenerationRequest

    store = JobStore(tmp_path / "jobs.sqlite3")
    req = GenerationRequest.create(prompt="a circle", seed=1, model="danqing-tiny", **TINY)
    running, queued = store.add(req, source="api", save=True), store.add(req, source="ui", save=True)
    ephemeral = store.add(req, source="a1111", save=False)
    assert store.claim_next().id == running.id
    planned = planned_paths(tmp_path / "out", [1])
    store.set_planned(running.id, planned)
    planned[0].parent.mkdir()
    planned[0].write_bytes(b"\x89PNG half")
    (planned[0].parent / f".{planned[0].name}.abc123.tmp").write_bytes(b"partial")
    store.close()

    store = JobStore(tmp_path / "jobs.sqlite3")  # the next start
    out = store.recover()
    assert out["requeued"] == [running.id] and out["failed"] == [ephemeral.id] and len(out["removed"]) == 2
    assert not any((tmp_path / "out").iterdir())
    assert [store.get(j.id).status for j in (running, queued, ephemeral)] == ["queued", "queued", "failed"]
    assert store.claim_next().id == running.id  # keeps its place at the head of the queue
    assert store.recover()["requeued"] == [running.id]  # and again after a second crash
