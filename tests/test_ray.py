"""Scale-out over Ray (danqing/scale/, docs/scale.md), on one local Ray started once for the
module (2 CPUs, no dashboard, no usage stats):

- Ray Serve with 2 replicas of the bundled tiny model: the same A1111 request and seed give the
  very pixels and infotext the single-process server gives; the same bad requests are refused
  with the same 4xx answer; requests for two models go to the replicas that have them loaded.
- The job API on the same ingress: jobs finish with the single server's picture files, history,
  events and 4xx answers; a job whose replica dies is sent again; an ingress killed with jobs
  running and queued is replaced and runs them all.
- Ray Data batch generation over 2 actors: the pictures equal ``danqing generate``'s for the
  same seeds, and a rerun over the folder runs only the requests not finished.

The Ray start and the replicas' start are printed (``-s``) with each test's time."""

from __future__ import annotations

import base64
import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from conftest import need_module
from server_helpers import TINY, free_port, make_app

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # never phones home
ray = need_module("ray", "pip install -e '.[ray]'")
need_module("ray.serve", "pip install -e '.[ray]'")

from danqing.settings import ServerSettings, Settings  # noqa: E402

BODY = {"prompt": "a red circle left of a blue square", "steps": 4, **TINY, "sampler_name": "Euler a"}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def local_ray():
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"\nray.init: {time.perf_counter() - t:.1f}s")
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


class Served(str):
    """The ingress's URL, with the home folder of its settings (job database, outputs)."""

    def __new__(cls, url: str, home):
        out = super().__new__(cls, url)
        out.home = home
        return out


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory):
    """danqing on Ray Serve: 2 replicas (half a CPU each, one torch thread); its URL."""
    from ray import serve

    from danqing.scale.serving import RayServeOptions, start

    home = tmp_path_factory.mktemp("ray-serve")
    settings = Settings(home=home, device="cpu", dtype="fp32")
    port = free_port()
    t = time.perf_counter()
    start(settings, ServerSettings(port=port, ui=False), RayServeOptions(replicas=2, threads=1, replica_cpus=0.5))
    print(f"\nRay Serve, 2 replicas ready: {time.perf_counter() - t:.1f}s")
    yield Served(f"http://127.0.0.1:{port}", home)
    serve.shutdown()


@pytest.fixture
def one_thread():
    import torch

    torch.set_num_threads(1)  # as the replicas: the same float summation order (conftest restores it)


def test_ray_serve_answers_as_the_server(served, tmp_path, one_thread):
    import httpx
    from fastapi.testclient import TestClient

    bodies = [{**BODY, "seed": 11}, {**BODY, "seed": 12, "negative_prompt": "blurry", "cfg_scale": 5.0}]
    bad = [{**BODY, "width": 65}, {**BODY, "sampler_name": "nope"}, {**BODY, "model": "../etc/passwd"},
           {**BODY, "steps": 1.5}, {**BODY, "tiling": True}, {**BODY, "script_args": [1]}]
    with TestClient(make_app(tmp_path)) as plain, httpx.Client(base_url=served, timeout=300) as ray_http:
        for body in bodies:
            a, b = plain.post("/sdapi/v1/txt2img", json=body), ray_http.post("/sdapi/v1/txt2img", json=body)
            assert a.status_code == b.status_code == 200, b.text
            png_a, png_b = (base64.b64decode(r.json()["images"][0]) for r in (a, b))
            assert np.array_equal(pixels(png_a), pixels(png_b))  # bit-identical pixels
            assert Image.open(io.BytesIO(png_b)).info["parameters"] == Image.open(io.BytesIO(png_a)).info["parameters"]
            info_a, info_b = json.loads(a.json()["info"]), json.loads(b.json()["info"])
            assert info_b["all_seeds"] == info_a["all_seeds"] == [body["seed"]]
            assert info_b["infotexts"] == info_a["infotexts"]
        for body in bad:
            a, b = plain.post("/sdapi/v1/txt2img", json=body), ray_http.post("/sdapi/v1/txt2img", json=body)
            assert 400 <= a.status_code < 500 and b.status_code == a.status_code, (body, a.text, b.text)
            assert b.json() == a.json()
        assert ray_http.post("/sdapi/v1/txt2img", json={**BODY, "script_name": "x/y/z plot"}).status_code == 422


def test_ray_serve_routes_each_model_to_a_replica_that_has_it(served):
    """Requests carry their checkpoint as Ray Serve's multiplexed model id: after each replica
    has loaded one model, requests for two models alternate and no replica loads again."""
    import httpx

    models = ("danqing-tiny", "danqing-tiny-random")
    seen: dict[str, set] = {m: set() for m in models}
    loads = {}
    with httpx.Client(base_url=served, timeout=300) as http:
        for round_ in range(4):
            for m in models:
                r = http.post("/sdapi/v1/txt2img", json={**BODY, "seed": round_, "override_settings": {"sd_model_checkpoint": m}})
                assert r.status_code == 200, r.text
                worker = r.headers["x-danqing-worker"]
                loads[worker] = int(r.headers["x-danqing-model-loads"])
                if round_ >= 1:  # after the first round the router knows which replica has which
                    seen[m].add(worker)
            time.sleep(0.5 if round_ == 0 else 0)
    assert all(len(w) == 1 for w in seen.values()), seen
    assert seen[models[0]] != seen[models[1]]  # each model on its own replica
    assert sum(loads.values()) <= 3, loads  # each replica loaded its model once (the very first pick may miss)


def test_ray_serve_retries_a_request_whose_replica_died(served):
    """Two long requests run, one on each replica; one replica's process is killed: both
    requests still answer, the killed one's sent once more (to the other replica), with the
    picture the same request gives on a live replica."""
    import threading

    import httpx

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "StudioReplica" in a["name"]]
    assert len(replicas) == 2, replicas
    models = {21: "danqing-tiny", 22: "danqing-tiny-random"}  # each on the replica that has it loaded
    answers = {}

    def body(seed: int, steps: int) -> dict:
        return {**BODY, "steps": steps, "seed": seed, "override_settings": {"sd_model_checkpoint": models[seed]}}

    with httpx.Client(base_url=served, timeout=300) as http:  # how long 20 steps take now, on this machine
        t = time.perf_counter()
        for seed in models:
            assert http.post("/sdapi/v1/txt2img", json=body(seed, 20)).status_code == 200
        step20 = (time.perf_counter() - t) / 2

    def post(seed: int):
        with httpx.Client(base_url=served, timeout=300) as http:
            answers[seed] = http.post("/sdapi/v1/txt2img", json=body(seed, 100))

    threads = [threading.Thread(target=post, args=(s,)) for s in models]
    for th in threads:
        th.start()
    time.sleep(max(0.5, 2.0 * step20))  # about 40% into the 100 steps: both requests running
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=False)
    for th in threads:
        th.join()
    assert all(r.status_code == 200 for r in answers.values()), {s: r.text[:200] for s, r in answers.items()}
    attempts = sorted(int(r.headers["x-danqing-attempts"]) for r in answers.values())
    assert attempts == [1, 2], attempts  # the request on the killed replica was sent again
    retried = next(s for s, r in answers.items() if r.headers["x-danqing-attempts"] == "2")
    with httpx.Client(base_url=served, timeout=300) as http:
        again = http.post("/sdapi/v1/txt2img", json=body(retried, 100))
    assert np.array_equal(pixels(base64.b64decode(again.json()["images"][0])),
                          pixels(base64.b64decode(answers[retried].json()["images"][0])))


JOB = {"prompt": "a red circle left of a blue square", "steps": 4, **TINY, "sampler": "Euler a"}


def ray_job(http, job_id: str, timeout: float = 240.0) -> dict:
    """The job's view once it has finished, through the ingress (retried while an ingress restarts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = http.get(f"/api/v1/jobs/{job_id}/wait", params={"timeout": 10})
            if r.status_code == 200 and r.json()["status"] in ("done", "failed", "cancelled"):
                return r.json()
        except Exception:  # noqa: BLE001 -- the proxy may drop a call while the ingress is replaced
            pass
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(0.2)


def sse_steps(text: str) -> list[tuple]:
    """(event, batch_index, step, total) of each server-sent event."""
    out = []
    for block in text.strip().split("\n\n"):
        event, data = (line.split(": ", 1)[1] for line in block.splitlines())
        d = json.loads(data)
        out.append((event, d.get("batch_index"), d.get("step"), d.get("total")) if event == "progress" else (event, None, None, None))
    return out


def test_ray_job_api_answers_as_the_server(served, tmp_path, one_thread):
    """6 jobs through the ingress's job API (2 replicas) all finish with the PNG files the
    single-process server writes for the same requests; the history lists them, with the same
    fields and paging; bad bodies and wrong ids get the server's 4xx answers word for word."""
    import httpx
    from fastapi.testclient import TestClient

    bodies = [{"request": {**JOB, "prompt": f"{JOB['prompt']} {i}", "seed": 40 + i, "subseed": 1, "cfg_scale": 5.0 + i}}
              for i in range(6)]
    bad = [{"request": {**JOB, "width": 65}}, {"request": {**JOB, "sampler": "nope"}},
           {"request": {**JOB, "model": "../etc/passwd"}}, {"request": {**JOB, "steps": 1.5}},
           {"request": JOB, "bogus": 1}, {}, {"request": JOB, "init_image": "not base64"},
           {"request": {**JOB, "save": 1}}]
    with TestClient(make_app(tmp_path)) as plain, httpx.Client(base_url=served, timeout=300) as http:
        ray_ids = []
        for body in bodies:
            r = http.post("/api/v1/jobs", json=body)
            assert r.status_code == 202 and r.json()["status"] == "queued", r.text
            ray_ids.append(r.json()["id"])
        plain_ids = [plain.post("/api/v1/jobs", json=body).json()["id"] for body in bodies]
        for ray_id, plain_id in zip(ray_ids, plain_ids):
            a = plain.get(f"/api/v1/jobs/{plain_id}/wait", params={"timeout": 120}).json()
            b = ray_job(http, ray_id)
            assert a["status"] == b["status"] == "done", b
            assert b.keys() == a.keys() and b["result"].keys() == a["result"].keys()
            assert b["request"] == a["request"] and b["result"]["request"] == a["result"]["request"]
            assert b["created"] <= b["started"] <= b["finished"]
            png_a = plain.get(a["result"]["images"][0]["url"])
            png_b = http.get(b["result"]["images"][0]["url"])
            assert png_b.status_code == 200 and png_b.headers["content-type"] == "image/png"
            assert png_b.content == png_a.content  # the same file, byte for byte
        events = [sse_steps(c.get(f"/api/v1/jobs/{i}/events").text) for c, i in ((plain, plain_ids[5]), (http, ray_ids[5]))]
        assert events[1] == events[0] == [("progress", 0, s, 4) for s in range(1, 5)] + [("done", None, None, None)]
        history = http.get("/api/v1/history", params={"limit": 6}).json()
        assert [j["id"] for j in history["jobs"]] == ray_ids[::-1]  # newest first
        assert all(j["status"] == "done" for j in history["jobs"])
        page = http.get("/api/v1/history", params={"limit": 2, "offset": 2}).json()
        plain_page = plain.get("/api/v1/history", params={"limit": 2, "offset": 2}).json()
        assert [j["id"] for j in page["jobs"]] == ray_ids[3:1:-1] and page.keys() == plain_page.keys()
        assert [j.keys() for j in page["jobs"]] == [j.keys() for j in plain_page["jobs"]]
        searched = http.get("/api/v1/history", params={"q": "square 3", "limit": 50}).json()["jobs"]
        assert [j["id"] for j in searched] == [ray_ids[3]]
        missing = "0" * 32
        for method, path, body in [*(("post", "/api/v1/jobs", b) for b in bad),
                                   ("get", f"/api/v1/jobs/{missing}", None), ("get", "/api/v1/jobs/nothex", None),
                                   ("get", "/api/v1/history?status=nope", None),
                                   ("get", f"/api/v1/jobs/{missing}/images/0", None)]:
            a = getattr(plain, method)(path, **({"json": body} if body is not None else {}))
            b = getattr(http, method)(path, **({"json": body} if body is not None else {}))
            assert 400 <= a.status_code < 500 and b.status_code == a.status_code, (path, body, a.text, b.text)
            assert b.json() == a.json()
        cancel_a = plain.post(f"/api/v1/jobs/{plain_ids[0]}/cancel")
        cancel_b = http.post(f"/api/v1/jobs/{ray_ids[0]}/cancel")
        assert cancel_a.status_code == cancel_b.status_code == 409
        assert cancel_b.json()["detail"] == cancel_a.json()["detail"].replace(plain_ids[0], ray_ids[0])


def test_ray_jobs_survive_an_ingress_restart(served):
    """Three long jobs on 2 replicas: two run (one per replica), the third waits in the queue;
    a fourth is cancelled while queued, and a running one cannot be. The ingress's process is
    killed: Ray starts a new ingress, which puts the two interrupted jobs back in the queue and
    runs all three to the end."""
    import httpx

    from danqing.server.store import JobStore

    # long enough (about 4 s a job at one thread) that the store is seen with two running and
    # one queued between polls of a loaded machine, and the ingress is killed with two in flight
    bodies = [{"request": {**JOB, "steps": 60, "width": 128, "height": 128, "batch_count": 2,
                           "prompt": f"restart {i}", "seed": 70 + i}} for i in range(4)]
    with httpx.Client(base_url=served, timeout=300) as http:
        ids = [http.post("/api/v1/jobs", json=body).json()["id"] for body in bodies]
        assert http.post(f"/api/v1/jobs/{ids[3]}/cancel").json()["status"] == "cancelled"
        deadline = time.monotonic() + 60
        while [http.get(f"/api/v1/jobs/{i}").json()["status"] for i in ids[:3]] != ["running", "running", "queued"]:
            assert time.monotonic() < deadline, "two jobs never ran together"
            time.sleep(0.05)
        # steps streamed by the replica (its first report, as the job starts, may be step 0)
        while ((view := http.get(f"/api/v1/jobs/{ids[0]}").json()).get("progress") or {}).get("step", 0) < 1:
            assert view["status"] == "running" and time.monotonic() < deadline, view
            time.sleep(0.05)
        assert view["progress"]["total"] == 60 and 1 <= view["progress"]["step"] <= 60, view["progress"]
        busy = http.post(f"/api/v1/jobs/{ids[0]}/cancel")
        assert busy.status_code == 409 and "running on a replica" in busy.json()["detail"]
        before = {i: http.get(f"/api/v1/jobs/{i}").json() for i in ids[:3]}
        ingress = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "Ingress" in a["name"])
        killed = time.time()
        ray.kill(ray.get_actor(ingress["name"], namespace=ingress["namespace"]), no_restart=False)
        store = JobStore(Settings(home=served.home).db_path)
        assert store.get(ids[2]).status == "queued"
        done = {i: ray_job(http, i) for i in ids[:3]}
        print(f"\ningress restart and 3 jobs: {time.time() - killed:.1f}s")
    assert all(j["status"] == "done" for j in done.values()), done
    for i in ids[:2]:  # re-queued by the new ingress and run again from the start
        assert before[i]["status"] == "running" and store.get(i).started > killed
    assert store.get(ids[3]).status == "cancelled"


def test_ray_job_whose_replica_died_is_sent_again(served):
    """Two long jobs run, one on each replica; one replica's process is killed: both jobs end
    'done' (the killed one's request sent once more, to the other replica; without that it
    would end 'failed' with the replica's death as its error)."""
    import httpx

    bodies = [{"request": {**JOB, "steps": 60, "width": 128, "height": 128, "batch_count": 2,
                           "prompt": f"replica died {i}", "seed": 90 + i, "subseed": 1}} for i in range(2)]
    with httpx.Client(base_url=served, timeout=300) as http:
        ids = [http.post("/api/v1/jobs", json=body).json()["id"] for body in bodies]
        deadline = time.monotonic() + 60
        while not all("progress" in http.get(f"/api/v1/jobs/{i}").json() for i in ids):  # both on a replica
            assert time.monotonic() < deadline, "two jobs never ran together"
            time.sleep(0.05)
        replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "StudioReplica" in a["name"])
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=False)
        done = [ray_job(http, i) for i in ids]
        assert [j["status"] for j in done] == ["done", "done"], [j.get("error") for j in done]
        assert all(http.get(j["result"]["images"][0]["url"]).status_code == 200 for j in done)


def test_ray_data_batch_equals_generate_and_resumes(local_ray, tmp_path, one_thread):
    from ray import serve

    from danqing.cli import main
    from danqing.request import GenerationRequest
    from danqing.scale.batch import read_requests, run_local, run_ray

    serve.shutdown()  # the replicas' CPUs go to the batch actors
    home = tmp_path / "home"
    settings = Settings(home=home, device="cpu", dtype="fp32")
    prompts = ["a red circle", "a blue square", "a green triangle", "two yellow stars"]
    lines = [json.dumps({"prompt": p, "seed": 100 + i}) for i, p in enumerate(prompts)]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    base = GenerationRequest.create(prompt="", steps=4, sampler="Euler a", **TINY)
    items = read_requests(tmp_path / "requests.jsonl", base, settings.default_model)
    out = tmp_path / "out"
    assert run_local(settings, items[:2], out, threads=1) == 2  # a run stopped halfway (same files, same rule)
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run_ray(settings, items, out, workers=2, worker_cpus=1) == 2  # the rerun, on 2 actors: only the rest
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in first} == first  # not redone
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.{e}" for i in range(4) for e in ("json", "png")]
    workers = {json.loads((out / f"{i:05d}.json").read_text())["worker"] for i in (2, 3)}
    print(f"\nbatch workers: {sorted(workers)}")
    for i, p in list(enumerate(prompts))[2:]:  # the Ray actors' pictures against the plain CLI's
        with pytest.raises(SystemExit) as exc:
            main(["--home", str(home), "--device", "cpu", "--dtype", "fp32", "generate", p, "--seed", str(100 + i),
                  "--steps", "4", "--sampler", "Euler a", "--width", "64", "--height", "64", "--no-dynamic", "-q",
                  "--out", str(tmp_path / f"cli-{i}.png")])
        assert exc.value.code in (0, None)
        assert np.array_equal(pixels((out / f"{i:05d}.png").read_bytes()), pixels((tmp_path / f"cli-{i}.png").read_bytes()))
        meta = json.loads((out / f"{i:05d}.json").read_text())
        assert meta["seeds"] == [100 + i] and meta["request"]["prompt"] == p
