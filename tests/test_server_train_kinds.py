"""The three kinds of training job (``/api/v1/train/jobs``, danqing/server/train.py): a textual
inversion lands in models/embeddings/ and a DreamBooth checkpoint in models/checkpoints/, each
usable at once (the registry lists it and it loads as trained), with the loss
of every step; a field of another kind, an unknown kind or a caption without the word is one 4xx
line naming the field."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from server_helpers import make_app


@pytest.fixture(scope="module")
def client(studio, tmp_path_factory):
    from fastapi.testclient import TestClient

    home = tmp_path_factory.mktemp("train-kinds-home")
    for folder, word in (("squares", "dq-sq"), ("plain", "square")):
        data = home / "datasets" / folder
        data.mkdir(parents=True)
        for i, colour in enumerate(((220, 30, 30), (30, 30, 220), (30, 200, 30))):
            img = Image.new("RGB", (64, 64), (240, 240, 240))
            img.paste(colour, (16, 16, 48, 48))
            img.save(data / f"{i}.png")
            (data / f"{i}.txt").write_text(f"a {word}, colour {i}")
    with TestClient(make_app(home, studio=studio)) as c:
        yield c


def run_job(client, body: dict) -> dict:
    r = client.post("/api/v1/train/jobs", json={"base": "tiny-sd1", "steps": 2, "batch_size": 2, "sample_every": 1000,
                                                "sample_steps": 1, **body})
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == body["kind"]
    job = client.get(f"/api/v1/train/jobs/{r.json()['id']}/wait", params={"timeout": 120}).json()
    assert job["status"] == "done", job["error"]
    assert [p["step"] for p in job["losses"]] == [1, 2] and all(math.isfinite(p["loss"]) for p in job["losses"])
    return job


def test_textual_inversion_job_installs_the_embedding(client, studio):
    from danqing.customise.embeddings import load_embedding

    job = run_job(client, {"kind": "textual-inversion", "dataset": "squares", "name": "dq-sq", "init_word": "square",
                           "vectors": 3})
    path = studio.settings.models_dir / "embeddings" / "dq-sq.safetensors"
    assert job["files"][-1] == str(path) and path.is_file()
    assert "dq-sq" in [e.name for e in studio.registry.scan("embedding")]
    emb = load_embedding(path)
    assert emb.name == "dq-sq" and emb.vectors["emb_params"].shape[0] == 3  # the request's vectors per word
    assert job["config"]["embedding"] == {"name": "dq-sq", "init_word": "square", "n_vectors": 3}


def test_dreambooth_job_installs_the_trained_checkpoint(client, studio):
    from danqing.models.loader import load_components, load_diffusers_folder

    job = run_job(client, {"kind": "dreambooth", "dataset": "plain", "name": "db-sq", "class_prompt": "a green circle",
                           "class_images": 2, "instance_prompt": "a dq-db square"})
    path = studio.settings.models_dir / "checkpoints" / "db-sq.safetensors"
    assert job["files"][-1] == str(path) and path.is_file()
    home = client.app.state.danqing.settings.home
    captions = sorted((home / "runs" / "dreambooth-db-sq" / "class_images").glob("*.txt"))
    assert [c.read_text() for c in captions] == ["a green circle"] * 2  # the class prompt, two class images
    assert job["config"]["output"]["sample_prompts"] == ["a dq-db square"]  # samples of the instance prompt
    # the model list finds it, and it loads as the trained UNet, which differs from its base
    installed = load_components(studio.registry.find("checkpoint", "db-sq"))
    trained = load_diffusers_folder(home / "runs" / "dreambooth-db-sq" / "db-sq")
    base = load_diffusers_folder(studio.settings.models_dir / "checkpoints" / "tiny-sd1")
    pairs = list(zip(installed.unet.state_dict().values(), trained.unet.state_dict().values()))
    assert len(pairs) > 10 and all(torch.equal(a, b) for a, b in pairs)
    assert any(not torch.equal(p, q) for p, q in zip(trained.unet.parameters(), base.unet.parameters()))


@pytest.mark.parametrize("body, field", [
    ({"kind": "gan", "dataset": "squares", "name": "x"}, "kind"),
    ({"kind": "textual-inversion", "dataset": "squares", "name": "x2", "rank": 4}, "rank"),
    ({"kind": "lora", "dataset": "squares", "name": "x3", "class_images": 4}, "class_images"),
    ({"kind": "textual-inversion", "dataset": "plain", "name": "dq-other"}, "name"),  # captions lack the word
    ({"kind": "textual-inversion", "dataset": "squares", "name": "dq-sq", "vectors": 0}, "vectors"),
    ({"kind": "dreambooth", "dataset": "squares", "name": "tiny-sd1"}, "name"),  # an installed checkpoint's name
])
def test_bad_kind_requests_are_one_4xx_line(client, body, field):
    r = client.post("/api/v1/train/jobs", json=body)
    assert r.status_code in (400, 422), r.text
    assert field in r.text and "Traceback" not in r.text
    if field == "kind":
        assert all(k in r.text for k in ("lora", "textual-inversion", "dreambooth"))  # what is allowed


def test_the_train_tab_builds_each_kinds_job():
    from danqing.server.ui_train import submit_body, status_line

    common = {"dataset": "d", "name": "n", "steps": 3, "lr": 0.01, "batch_size": 1, "resolution": 64,
              "sample_every": 5}
    own = {"train_text_encoder": True, "rank": 4, "init_word": "star", "vectors": 3, "instance_prompt": "a n",
           "class_prompt": None, "prior_preservation": False, "class_images": 2}
    ti = submit_body("textual-inversion", common, own)
    assert (ti.kind, ti.init_word, ti.vectors, ti.model_fields_set & {"rank", "train_text_encoder"}) == \
        ("textual-inversion", "star", 3, set())
    db = submit_body("dreambooth", common, own)
    assert (db.train_text_encoder, db.instance_prompt, db.prior_preservation, db.class_images) == (True, "a n", False, 2)
    lora = submit_body("lora", common, own)
    assert lora.rank == 4 and "init_word" not in lora.model_fields_set
    view = {"kind": "textual-inversion", "status": "done", "name": "dq-x", "step": 3, "total": 3, "loss": 0.1}
    assert "`dq-x`" in status_line(view) and "<lora:" not in status_line(view)
