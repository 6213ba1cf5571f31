"""The portrait studio's job API (``/api/v1/portrait``, danqing/server/portrait.py): a person
added from base64 photos answers each photo's verdict (a picture without a face rejected with its
reason), a portrait job in a style of the home's own makes ranked pictures served as files of the
job; bad names, photos, styles and counts are one 4xx line, nothing written or queued."""

from __future__ import annotations

import base64
import io

import pytest
from conftest import need_module
from PIL import Image, ImageEnhance, ImageOps
from server_helpers import make_app

TINY_STYLE = '''title = "Tiny"
prompt = "a portrait of {trigger}"
width = 64
height = 64
steps = 3
sampler = "Euler"
'''


def b64(img: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt, quality=92)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def photos():
    data = need_module("skimage.data", "pip install -e '.[test]'")
    need_module("dlib", "pip install -e '.[faces]'")
    astronaut = Image.fromarray(data.astronaut())
    flipped = ImageEnhance.Brightness(ImageOps.mirror(astronaut)).enhance(1.2)
    return [b64(astronaut), b64(flipped, "PNG"), b64(Image.new("RGB", (400, 400), (128, 140, 150)))]


@pytest.fixture(scope="module")
def client(tmp_path_factory, studio):
    from fastapi.testclient import TestClient

    home = tmp_path_factory.mktemp("portrait-api")
    (home / "styles" / "portrait").mkdir(parents=True)
    (home / "styles" / "portrait" / "tiny.toml").write_text(TINY_STYLE, encoding="utf-8")
    with TestClient(make_app(home, studio=studio)) as c:
        yield c


def test_a_person_from_photos_and_portraits_ranked_in_a_style(client, photos):
    r = client.post("/api/v1/portrait/people", json={
        "name": "anna", "photos": photos, "photo_names": ["a.jpg", "../../etc/b.png", "c.jpg"], "size": 64,
        "min_photos": 2})
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["accepted"] == 2
    assert [v["photo"] for v in added["verdicts"]] == ["01-a.jpg", "02-b.png", "03-c.jpg"]   # base names only
    assert [v["accepted"] for v in added["verdicts"]] == [True, True, False]
    assert added["verdicts"][2]["reason"].startswith("no face found")
    assert client.get("/api/v1/portrait/people").json() == ["anna"]
    person = client.get("/api/v1/portrait/people/anna").json()
    assert person["trigger"] == "dq_anna" and person["training_pictures"] == 4 and person["rejected"][0]["code"] == "no-face"
    sheet = client.get(added["contact_sheet"])
    assert sheet.status_code == 200 and sheet.content[:4] == b"\x89PNG"
    assert "tiny" in [s["name"] for s in client.get("/api/v1/portrait/styles").json()]

    r = client.post("/api/v1/portrait/jobs", json={"person": "anna", "style": "tiny", "n": 2, "keep": 2, "seed": 5,
                                                   "model": "tiny-sd1", "steps": 2})
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "portrait"
    done = client.get(f"/api/v1/jobs/{r.json()['id']}/wait", params={"timeout": 300}).json()
    assert done["status"] == "done", done.get("error")
    files = done["result"]["files"]
    assert [f["rank"] for f in files] == [1, 2] and sorted(f["seed"] for f in files) == [5, 6]
    png = client.get(files[0]["url"])
    assert png.status_code == 200
    text = Image.open(io.BytesIO(png.content)).info["parameters"]
    assert text.startswith("a portrait of dq_anna") and "Portrait style: tiny, Portrait person: anna, Portrait rank: 1/2" in text


@pytest.mark.parametrize("route, body, field", [
    ("people", {"name": "../x", "photos": ["AAAA"]}, "name"),
    ("people", {"name": "bob", "photos": ["not base64!"]}, "photos.0"),
    ("people", {"name": "bob", "photos": []}, "photos"),
    ("jobs", {"person": "nobody"}, "person"),
    ("jobs", {"person": "anna", "style": "nope"}, "style"),
    ("jobs", {"person": "anna", "style": "tiny", "n": 2, "keep": 3}, "keep"),
    ("jobs", {"person": "anna", "style": "tiny", "lora": "no-such-lora"}, "lora"),
    ("jobs", {"person": "anna", "style": "tiny", "fuse": 2.0}, "fuse"),
])
def test_bad_portrait_requests_are_one_4xx_line(client, photos, route, body, field):
    before = client.get("/api/v1/jobs").json()
    r = client.post(f"/api/v1/portrait/{route}", json=body)
    assert r.status_code in (400, 404, 422), r.text
    assert field in r.text and "Traceback" not in r.text
    assert client.get("/api/v1/jobs").json() == before


def test_too_few_usable_photos_write_nothing(client, photos):
    r = client.post("/api/v1/portrait/people", json={"name": "carl", "photos": [photos[0], photos[2]], "min_photos": 2})
    assert r.status_code == 422 and "photos" in r.text and "no face found" in r.text
    assert "carl" not in client.get("/api/v1/portrait/people").json()
