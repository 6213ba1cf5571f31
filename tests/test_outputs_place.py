"""Pictures saved under an fsspec URL (``DANQING_OUTPUTS=s3://...``; here ``memory://``, the
stand-in for an object store) wherever a folder works: ``Studio.generate``, ``danqing generate``,
the server's job API, A1111 routes and web UI history, and the recovery of an interrupted job
(danqing.outputs.place)."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from danqing import Settings, Studio
from danqing.errors import InvalidRequest
from danqing.outputs import place
from danqing.outputs.infotext import parse_infotext
from danqing.outputs.remote import list_pictures, read_infotext_url
from danqing.request import GenerationRequest
from server_helpers import shared_studio

REQ = dict(prompt="a red circle", model="tiny-sd1", steps=2, width=64, height=64, seed=7, sampler="Euler")


@pytest.fixture
def bucket():
    """A fresh ``memory://`` bucket, removed afterwards."""
    import fsspec

    name = f"danqing-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


def test_a_url_in_the_outputs_setting_is_where_pictures_go(tmp_path, bucket, monkeypatch):
    s = Settings(home=tmp_path, outputs_dir=f"{bucket}/out")
    assert s.outputs_url == f"{bucket}/out" and s.outputs_dir == tmp_path / "outputs"  # working files stay local
    monkeypatch.setenv("DANQING_OUTPUTS", f"{bucket}/env")
    assert Settings.from_env(home=tmp_path).outputs_url == f"{bucket}/env"
    assert str(place.dated_folder(s, "txt2img-images")).startswith(f"{bucket}/out/txt2img-images/")
    assert place.dated_folder(Settings(home=tmp_path), "x").parent == tmp_path / "outputs" / "x"


def test_studio_saves_under_the_url_with_infotext_and_the_a1111_counter(models_dir, tmp_path, bucket):
    studio = Studio(Settings(home=tmp_path, models_dir=models_dir, outputs_dir=f"{bucket}/out", device="cpu",
                             dtype="fp32"))
    first = studio.generate(GenerationRequest.create(**REQ, batch_size=2), save=True)
    again = studio.generate(GenerationRequest.create(**REQ), save=True)
    paths = [*first.paths, *again.paths]
    assert all(str(p).startswith(f"{bucket}/out/txt2img-images/") for p in paths)
    assert [place.name_of(p) for p in paths] == ["00000-7.png", "00001-8.png", "00002-7.png"]
    listed = list_pictures(str(place.dated_folder(studio.settings, "txt2img-images")))
    assert [place.name_of(p) for p in listed] == [place.name_of(p) for p in paths]
    assert not (tmp_path / "outputs" / "txt2img-images").exists()  # nothing local
    for p, img, text in zip(first.paths, first.images, first.infotexts):
        assert read_infotext_url(str(p)) == text and parse_infotext(text)[2]["Seed"] in ("7", "8")
        saved = np.asarray(place.open_picture(p).convert("RGB"))
        assert np.array_equal(saved, np.asarray(img))  # the very pixels generated


def test_danqing_generate_writes_to_a_url_folder(models_dir, tmp_path, bucket, capsys):
    from danqing.cli import main

    folder = f"{bucket}/renders/"
    with pytest.raises(SystemExit) as exc:
        main(["--home", str(tmp_path), "--models-dir", str(models_dir), "--device", "cpu", "generate", "a red circle",
              "--model", "tiny-sd1", "--steps", "2", "--width", "64", "--height", "64", "--seed", "3",
              "--out", folder, "--quiet"])
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err
    assert [place.name_of(p) for p in list_pictures(folder.rstrip("/"))] == ["00000-3.png"]
    assert f"{bucket}/renders/00000-3.png  seed=3" in out.out


def test_a_url_out_is_refused_where_it_cannot_work():
    from danqing.cli.common import out_target

    with pytest.raises(InvalidRequest, match="end it with /"):
        out_target("memory://b/x.png", place.Path("unused"), url_ok=True)
    with pytest.raises(InvalidRequest, match="writes local files"):
        out_target("memory://b/x/", place.Path("unused"))


def test_the_server_saves_jobs_under_the_url_and_serves_them_back(tmp_path, bucket):
    from danqing.server.app import create_app
    from danqing.settings import ServerSettings

    studio = shared_studio()
    settings = Settings(home=tmp_path, models_dir=studio.settings.models_dir, outputs_dir=f"{bucket}/srv",
                        device="cpu", dtype="fp32")
    app = create_app(settings, ServerSettings(ui=False, allowed_hosts=("testserver",)), studio=studio,
                     preview_interval=0.0)
    req = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 11}
    with TestClient(app) as client:
        job = client.post("/api/v1/jobs", json={"request": req}).json()
        done = client.get(f"/api/v1/jobs/{job['id']}/wait", params={"timeout": 120}).json()
        assert done["status"] == "done", done
        path = done["result"]["images"][0]["path"]
        assert path.startswith(f"{bucket}/srv/txt2img-images/") and path.endswith("-11.png")
        served = client.get(f"/api/v1/jobs/{job['id']}/images/0")
        assert served.status_code == 200 and served.content == place.read_bytes(path)
        a1111 = client.post("/sdapi/v1/txt2img", json={**req, "seed": 12, "save_images": True}).json()
        import base64

        png = base64.b64decode(a1111["images"][0])
        saved = list_pictures(str(place.dated_folder(settings, "txt2img-images")))
        assert len(saved) == 2 and place.read_bytes(saved[-1]) == png  # the answer is the saved file
        # the web UI's history shows a local copy with the same bytes (its infotext included)
        from danqing.server.ui_common import shown_file

        copy = shown_file(app.state.danqing, path)
        assert open(copy, "rb").read() == place.read_bytes(path)
        assert str(tmp_path / "outputs") in copy
        place.remove(path)
        gone = client.get(f"/api/v1/jobs/{job['id']}/images/0")
        assert gone.status_code == 404 and "no longer at" in gone.json()["detail"]


def test_recovery_removes_what_an_interrupted_job_published(tmp_path, bucket):
    from danqing.server.store import JobStore

    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.add(GenerationRequest.create(**REQ), source="api", save=True)
    store.claim_next()
    planned = place.planned(f"{bucket}/out", [7])
    store.set_planned(job.id, planned)
    img = Image.new("RGB", (8, 8), "red")
    place.save_picture(img, planned[0], "Steps: 2")  # written whole, then the server died
    out = JobStore(tmp_path / "jobs.sqlite3").recover()
    assert out["requeued"] == [job.id] and out["removed"] == [planned[0]]
    assert not place.exists(planned[0])


def test_local_locations_work_as_before(tmp_path):
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    names = place.planned(tmp_path / "f", [1, 2])
    assert [p.name for p in names] == ["00000-1.png", "00001-2.png"]
    saved = place.save_picture(img, names[0], "Steps: 1")
    assert place.local_copy(saved, tmp_path / "cache") == saved
    with pytest.raises(FileExistsError):
        place.save_picture(img, names[0], "Steps: 1")
    assert Image.open(io.BytesIO(place.read_bytes(saved))).info["parameters"] == "Steps: 1"
