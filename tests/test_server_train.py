"""Training jobs over HTTP (``/api/v1/train/jobs``, danqing/server/train.py): a short LoRA run on
the tiny random SD1 reports the loss of every step and its sample grid, the LoRA lands in
models/lora/; a portrait-studio person's LoRA takes the recipe's settings; a stopped job resumes
from its checkpoint; a dataset outside HOME/datasets/ or a bad name is one 4xx line."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from server_helpers import make_app


@pytest.fixture(scope="module")
def client(studio, tmp_path_factory):
    from fastapi.testclient import TestClient

    home = tmp_path_factory.mktemp("train-home")
    data = home / "datasets" / "squares"
    data.mkdir(parents=True)
    for i, colour in enumerate(((220, 30, 30), (30, 30, 220), (30, 200, 30))):
        img = Image.new("RGB", (64, 64), (240, 240, 240))
        img.paste(colour, (16, 16, 48, 48))
        img.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a square, colour {i}")
    (home / "outside").mkdir()
    from danqing.apps.portrait_world import write_world_person
    from danqing.synthetic.portraits import person

    write_world_person(home, "ada", person("Ada"), 3, seed=1)  # people/ada/ as `portrait add` writes it
    with TestClient(make_app(home, studio=studio)) as c:
        yield c


def test_lora_job_reports_step_loss_and_samples_and_installs_the_lora(client, studio):
    assert client.get("/api/v1/train/datasets").json()["datasets"] == ["squares"]
    r = client.post("/api/v1/train/jobs", json={"dataset": "squares", "name": "sq-test", "base": "tiny-sd1", "steps": 2,
                                                "rank": 2, "batch_size": 2, "sample_every": 1000, "sample_steps": 2})
    assert r.status_code == 202, r.text
    job = client.get(f"/api/v1/train/jobs/{r.json()['id']}/wait", params={"timeout": 120}).json()
    assert job["status"] == "done", job["error"]
    assert [p["step"] for p in job["losses"]] == [1, 2] and job["step"] == job["total"] == 2
    assert all(math.isfinite(p["loss"]) and p["loss"] > 0 for p in job["losses"])
    assert [s["step"] for s in job["samples"]] == [2]
    png = client.get(job["samples"][0]["url"])
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert "sq-test" in [e.name for e in studio.registry.scan("lora")] or \
        (studio.settings.models_dir / "lora" / "sq-test.safetensors").is_file()


def test_a_persons_lora_takes_the_recipe_and_resumes_from_its_checkpoint(client, studio, monkeypatch):
    import danqing.training.runs as runs

    queue = client.app.state.danqing.train
    body = {"person": "ada", "name": "ada-lora", "base": "tiny-sd1", "recipe": "cpu", "steps": 8, "sample_steps": 2}
    real = runs.prune_checkpoints

    def stop_after_a_checkpoint(run_dir, keep=1):  # the first run is stopped once step 4's checkpoint exists
        real(run_dir, keep)
        if runs.latest_checkpoint(run_dir) is not None:
            for j in queue.jobs.values():
                j.cancel = True

    monkeypatch.setattr(runs, "prune_checkpoints", stop_after_a_checkpoint)
    r = client.post("/api/v1/train/jobs", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = client.get(f"/api/v1/train/jobs/{job_id}/wait", params={"timeout": 120}).json()
    assert job["status"] == "cancelled" and job["step"] == 3, job   # stopped at the step after the checkpoint
    cfg = job["config"]   # the cpu recipe, the person's crops and size
    assert cfg["network"] == {"rank": 32, "alpha": 32.0, "train_text_encoder": True, "train_unet": True,
                              "train_words": []}
    assert cfg["train"]["lr"] == 2e-4 and cfg["train"]["lr_scheduler"] == "cosine" and cfg["train"]["batch_size"] == 1
    assert cfg["data"]["resolution"] == 64 and cfg["data"]["source"].endswith("people/ada/train")
    monkeypatch.setattr(runs, "prune_checkpoints", real)
    assert client.post(f"/api/v1/train/jobs/{job_id}/resume").status_code == 200
    job = client.get(f"/api/v1/train/jobs/{job_id}/wait", params={"timeout": 120}).json()
    assert job["status"] == "done", job["error"]
    assert [p["step"] for p in job["losses"]] == list(range(1, 9))   # step 3's loss is the second run's
    run_dir = queue.get(job_id).run_dir
    logged = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8], logged   # the second run went on from step 2's checkpoint: no step 2 again
    assert (studio.settings.models_dir / "lora" / "ada-lora.safetensors").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-8"], ckpts   # the newest kept
    r = client.post(f"/api/v1/train/jobs/{job_id}/resume")
    assert r.status_code == 409 and "done" in r.text


@pytest.mark.parametrize("body, field", [
    ({"dataset": "../outside", "name": "x"}, "dataset"),
    ({"dataset": "/etc", "name": "x"}, "dataset"),
    ({"dataset": "nope", "name": "x"}, "dataset"),
    ({"dataset": "squares", "name": "../evil"}, "name"),
    ({"dataset": "squares", "name": "x", "base": "no-such-model"}, "base"),
    ({"dataset": "squares", "name": "x", "steps": 0}, "steps"),
    ({"person": "../ada", "name": "x"}, "person"),
    ({"person": "bob", "name": "x"}, "person"),
    ({"person": "ada", "dataset": "squares", "name": "x"}, "dataset"),
    ({"person": "ada", "kind": "dreambooth", "name": "x"}, "person"),
    ({"person": "ada", "name": "x", "recipe": "gpu"}, "recipe"),
    ({"dataset": "squares", "name": "x", "recipe": "cpu"}, "recipe"),
    ({"name": "x"}, "dataset"),
])
def test_bad_train_requests_are_one_4xx_line(client, body, field):
    r = client.post("/api/v1/train/jobs", json=body)
    assert r.status_code in (400, 404, 422), r.text
    text = r.text
    assert field in text and "Traceback" not in text
    assert client.get("/api/v1/train/jobs/" + "0" * 32).status_code == 404


def test_train_tab_shows_the_jobs_loss_curve(client):
    from danqing.server.ui import build_ui
    from danqing.server.ui_train import loss_frame, status_line

    state = client.app.state.danqing
    done = [j for j in state.train.jobs.values() if j.status == "done"]
    view = done[0].view() if done else {"status": "running", "name": "x", "step": 2, "total": 3, "loss": 0.5,
                                       "losses": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5}]}
    frame = loss_frame(view)
    assert list(frame["step"]) == [p["step"] for p in view["losses"]] and list(frame["loss"]) == [p["loss"] for p in view["losses"]]
    assert f"step {view['step']}/{view['total']}" in status_line(view)
    ids = {c.get("props", {}).get("elem_id") for c in build_ui(state).config["components"]}
    assert {"train_dataset", "train_start", "train_loss", "train_samples"} <= ids
