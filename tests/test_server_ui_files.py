"""The web UI's files (docs/security.md): Gradio mounted in FastAPI skips its own path
checks, so danqing refuses every file object of the UI's API that is not an upload Gradio stored
or one of danqing's outputs -- the same answer whether or not the file exists -- and Gradio serves
(``/gradio_api/file=``) nothing outside those two places. No browser needed: the requests are
the ones Gradio's client sends."""

from __future__ import annotations

import builtins
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from server_helpers import make_app

from danqing import Settings, Studio

FILE = {"_type": "gradio.FileData"}


def png_bytes(text: str | None = None) -> bytes:
    buf = io.BytesIO()
    info = PngInfo()
    if text:
        info.add_text("parameters", text)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-files")
    models, secret = root / "models", root / "elsewhere" / "secret.png"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "notes.png").write_bytes(png_bytes("in the models folder"))
    secret.parent.mkdir()
    secret.write_bytes(png_bytes("a secret of the server"))
    studio = Studio(Settings(home=root / "studio", models_dir=models, device="cpu", dtype="fp32"))
    app = make_app(root / "home", studio=studio, ui=True)
    with TestClient(app, base_url="http://localhost") as client:
        yield root, client, secret


def call(client, api: str, data: list):
    """Gradio's two-step call: POST the inputs, then read the event stream of the result."""
    r = client.post(f"/gradio_api/call/{api}", json={"data": data})
    if r.status_code != 200:
        return r.status_code, r.json()
    stream = client.get(f"/gradio_api/call/{api}/{r.json()['event_id']}").text
    return 200, stream


def file_obj(path) -> dict:
    return {"path": str(path), "meta": FILE, "orig_name": "x.png"}


def inputs_left(root) -> list:
    folder = root / "home" / "outputs" / "init-images"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def test_a_crafted_file_object_never_reaches_img2img(world, monkeypatch):
    root, client, secret = world
    seen = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (seen.append(str(f)), real_open(f, *a, **k))[1])
    answers = set()
    for path in (secret, secret.with_name("missing.png"), "../../etc/hostname", "/etc/hostname",
                 "http://127.0.0.1:9/x.png"):
        status, body = call(client, "img2img", [file_obj(path), None])
        assert status == 422, body
        answers.add(json.dumps(body))
    assert len(answers) == 1, answers  # one answer, whether the file exists or not
    assert "uploads" in answers.pop()
    assert inputs_left(root) == []
    assert not [p for p in seen if p.startswith(str(secret.parent))]


def test_png_info_reads_uploads_and_tells_nothing_about_other_paths(world):
    root, client, secret = world
    up = client.post("/gradio_api/upload", files={"files": ("mine.png", png_bytes("Steps: 4, Seed: 9"), "image/png")})
    assert up.status_code == 200, up.text
    status, stream = call(client, "png_info", [file_obj(up.json()[0])])
    assert status == 200 and "Seed: 9" in stream, stream
    refused = {json.dumps(call(client, "png_info", [file_obj(p)])) for p in (secret, secret.with_name("no.png"))}
    assert len(refused) == 1 and "422" in refused.pop()


def test_gradio_serves_outputs_and_uploads_only(world):
    root, client, secret = world
    out = root / "home" / "outputs" / "txt2img-images" / "2026-01-01" / "00001-1.png"
    out.parent.mkdir(parents=True)
    out.write_bytes(png_bytes("made by danqing"))
    up = client.post("/gradio_api/upload", files={"files": ("u.png", png_bytes(), "image/png")}).json()[0]
    assert client.get(f"/gradio_api/file={out}").status_code == 200
    assert client.get(f"/gradio_api/file={up}").status_code == 200
    for path in (secret, root / "models" / "checkpoints" / "notes.png", root / "home" / "danqing.sqlite3",
                 "/etc/hostname", root / "home" / "outputs" / ".." / ".." / "elsewhere" / "secret.png"):
        assert client.get(f"/gradio_api/file={path}").status_code == 403, path


def test_the_font_field_takes_names_not_paths():
    from danqing.errors import InvalidRequest
    from danqing.server.ui import font_name

    assert font_name("DejaVuSans-Bold.ttf") == "DejaVuSans-Bold.ttf" and font_name("  ") is None
    for bad in ("/etc/passwd", "../x.ttf", "~/.fonts/x.ttf", "..\\x.ttf", "*.ttf"):
        with pytest.raises(InvalidRequest, match="font: give the file name of an installed font"):
            font_name(bad)
