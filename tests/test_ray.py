"""Scale-out over Ray (danqing/scale/, docs/scale.md), on one local Ray started once for the
module (2 CPUs, no dashboard, no usage stats):

- Ray Serve with 2 replicas of the bundled tiny model: the same A1111 request and seed give the
  very pixels and infotext the single-process server gives; the same bad requests are refused
  with the same 4xx answer; requests for two models go to the replicas that have them loaded.
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
    yield f"http://127.0.0.1:{port}"
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
