"""Names at the edge (docs/security.md): every field and tag of a server request that names a
model -- checkpoint, VAE, refiner, LoRA tag, ControlNet, IP-Adapter and its image encoder, hires
upscaler, face-restoration model, the options -- is looked up among the models installed in its
own folder. An absolute path, a ``../`` path, a symlink that leads out of the folder and a name
that is not installed are refused 422 with one message per field (the echoed name aside), the
same whether or not the named file exists, and no file outside the server's folders is opened.
Refused requests leave none of their uploads behind."""

from __future__ import annotations

import base64
import builtins
import io
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from server_helpers import TINY, make_app

from danqing import Settings, Studio
from danqing.errors import InvalidRequest
from danqing.models.names import Named, inside, resolve
from danqing.models.registry import Registry

# kind folder -> the file planted outside and linked in as "escape"
FOLDERS = {"checkpoints": "secret.safetensors", "vae": "secret.safetensors", "lora": "secret.safetensors",
           "embeddings": "secret.safetensors", "controlnet": "secret.safetensors",
           "ipadapter": "secret.safetensors", "upscalers": "secret.pth", "face_restore": "secret.pth"}


def b64_png(size=(64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A models folder whose every kind folder holds a symlink ``escape`` to a file outside it,
    and that outside folder (files that exist, beside the models folder)."""
    root = tmp_path_factory.mktemp("names")
    models, outside = root / "models", root / "outside"
    outside.mkdir()
    for folder, fn in FOLDERS.items():
        (models / folder).mkdir(parents=True)
        (outside / fn).write_bytes(b"not a model, and never to be opened")
        (models / folder / f"escape{Path(fn).suffix}").symlink_to(outside / fn)
    (outside / "encoder").mkdir()
    (outside / "encoder" / "config.json").write_text("{}")
    (models / "clip_vision").mkdir()
    (models / "clip_vision" / "escape").symlink_to(outside / "encoder", target_is_directory=True)
    studio = Studio(Settings(home=root / "studio", models_dir=models, device="cpu", dtype="fp32"))
    return root, models, outside, studio


@pytest.fixture(scope="module")
def client(world):
    root, _, _, studio = world
    with TestClient(make_app(root / "home", studio=studio), base_url="http://localhost") as c:
        yield c


@pytest.fixture()
def opened(monkeypatch):
    """Every path opened through open / os.open / safetensors / torch.load while the test runs."""
    import safetensors
    import safetensors.torch
    import torch

    seen: list[str] = []

    def watch(fn):
        def wrapped(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                seen.append(os.fsdecode(file))
            return fn(file, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(builtins, "open", watch(builtins.open))
    monkeypatch.setattr(io, "open", watch(io.open))
    monkeypatch.setattr(os, "open", watch(os.open))
    monkeypatch.setattr(safetensors, "safe_open", watch(safetensors.safe_open))
    monkeypatch.setattr(safetensors.torch, "load_file", watch(safetensors.torch.load_file))
    monkeypatch.setattr(torch, "load", watch(torch.load))
    return seen


def names_for(world, folder: str) -> dict[str, str]:
    """The four (five) ways a request may try to leave ``folder``: an absolute path of a file
    that exists, one that does not, a ../ path from the folder, the symlink, a missing name."""
    _, models, outside, _ = world
    fn = FOLDERS.get(folder, "encoder")
    return {"absolute": str(outside / fn), "absolute-missing": str(outside / "missing.safetensors"),
            "dotdot": f"../../outside/{fn}", "symlink": "escape", "missing": "not-installed"}


def one_message(answers: dict[str, tuple[str, dict]]) -> str:
    """The answers are 422s naming one field with one message once the echoed name is set aside."""
    fields = {body.get("field") for _, body in answers.values()}
    assert len(fields) == 1, answers
    messages = {body["detail"].replace(repr(name), "<name>") for name, body in answers.values()}
    assert len(messages) == 1, messages
    return messages.pop()


def ask(client, method: str, url: str, body: dict) -> dict:
    r = client.request(method, url, json=body)
    assert r.status_code == 422, (url, body, r.status_code, r.text)
    return r.json()


JOB_FIELDS = {
    # field -> (folder, request fields for a name, extra body)
    "model": ("checkpoints", lambda n: {"model": n}, {}),
    "vae": ("vae", lambda n: {"vae": n}, {}),
    "refiner_checkpoint": ("checkpoints", lambda n: {"refiner_checkpoint": n}, {}),
    "prompt": ("lora", lambda n: {"prompt": f"a cat <lora:{n}:0.8>"}, {}),
    "controlnet.0.model": ("controlnet", lambda n: {"controlnet": [{"model": n, "image": "x.png"}]}, {}),
    "ip_adapter": ("ipadapter", lambda n: {"ip_adapter": n}, {"ip_adapter_images": [b64_png()]}),
    "ip_adapter_encoder": ("clip_vision", lambda n: {"ip_adapter_encoder": n}, {"ip_adapter_images": [b64_png()]}),
    "hr_upscaler": ("upscalers", lambda n: {"enable_hr": True, "hr_upscaler": n, "denoising_strength": 0.5}, {}),
    "face_restoration_model": ("face_restore", lambda n: {"restore_faces": True, "face_restoration_model": n}, {}),
}


@pytest.mark.parametrize("field", list(JOB_FIELDS))
def test_job_api_names_stay_in_their_folder(client, world, opened, field):
    folder, make, extra = JOB_FIELDS[field]
    answers = {}
    for case, name in names_for(world, folder).items():
        body = ask(client, "post", "/api/v1/jobs", {"request": {**TINY, "steps": 2, **make(name)}, **extra})
        assert body["field"] == f"request.{field}", body
        answers[case] = (name, body)
    message = one_message(answers)
    assert "names only, never paths" in message and "escape" not in message.split("installed:")[-1]
    outside = str(world[2])
    assert not [p for p in opened if p.startswith(outside)]


A1111 = {
    # field named in the answer -> (folder, route, body for a name)
    "sd_model_checkpoint": ("checkpoints", "/sdapi/v1/options", lambda n: {"sd_model_checkpoint": n}),
    "sd_vae": ("vae", "/sdapi/v1/options", lambda n: {"sd_vae": n}),
    "override:sd_model_checkpoint": ("checkpoints", "/sdapi/v1/txt2img",
                                     lambda n: {**TINY, "override_settings": {"sd_model_checkpoint": n}}),
    "override:sd_vae": ("vae", "/sdapi/v1/txt2img", lambda n: {**TINY, "override_settings": {"sd_vae": n}}),
    "refiner_checkpoint": ("checkpoints", "/sdapi/v1/txt2img", lambda n: {**TINY, "refiner_checkpoint": n}),
    "prompt": ("lora", "/sdapi/v1/txt2img", lambda n: {**TINY, "prompt": f"<lora:{n}:1> a cat"}),
    "hr_upscaler": ("upscalers", "/sdapi/v1/txt2img", lambda n: {**TINY, "enable_hr": True, "hr_upscaler": n}),
    "alwayson_scripts.controlnet.args.0.model": ("controlnet", "/sdapi/v1/txt2img", lambda n: {**TINY, "alwayson_scripts": {
        "controlnet": {"args": [{"module": "none", "model": n, "image": b64_png()}]}}}),
    "ip_adapter": ("ipadapter", "/sdapi/v1/txt2img", lambda n: {**TINY, "alwayson_scripts": {
        "controlnet": {"args": [{"module": "ip-adapter_clip_sd15", "model": n, "image": b64_png()}]}}}),
}


@pytest.mark.parametrize("field", list(A1111))
def test_a1111_names_stay_in_their_folder(client, world, opened, field):
    folder, route, make = A1111[field]
    answers = {}
    for case, name in names_for(world, folder).items():
        body = ask(client, "post", route, make(name))
        want = field.split(":")[-1].replace("alwayson_scripts.controlnet.args.0.model", "controlnet.0.model")
        assert body["field"] == want, body
        answers[case] = (name, body)
    one_message(answers)
    assert not [p for p in opened if p.startswith(str(world[2]))]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] != names_for(world, folder)["symlink"]


def test_listings_leave_out_symlinks_out_of_their_folder(client):
    assert "escape" not in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert "escape" not in [m["model_name"] for m in client.get("/sdapi/v1/sd-vae").json()]
    assert "escape" not in [m["name"] for m in client.get("/sdapi/v1/loras").json()]
    assert "escape" not in [m["name"] for m in client.get("/sdapi/v1/upscalers").json()]
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert "escape" not in {**embeddings["loaded"], **embeddings["skipped"]}


def test_an_embedding_linked_from_outside_is_never_read(client, world, opened):
    """Embeddings are words of the prompt, matched against the listing: one linked in from
    outside is not listed, so its name is a plain word and its file is never opened."""
    r = client.post("/api/v1/jobs", json={"request": {**TINY, "steps": 2, "prompt": "escape", "seed": 1,
                                                      "model": "danqing-tiny"}, "save": False})
    assert r.status_code == 202, r.text
    done = client.get(f"/api/v1/jobs/{r.json()['id']}/wait", params={"timeout": 300}).json()
    assert done["status"] == "done", done
    assert not [p for p in opened if p.startswith(str(world[2]))]


def test_the_library_in_names_only_mode(world):
    """The server's Studio runs names-only: the library's own lookups take no path either."""
    _, models, outside, _ = world
    strict = Studio(Settings(home=world[0] / "strict", models_dir=models, device="cpu", dtype="fp32"))
    strict.registry.names_only = True
    for kind in ("checkpoint", "vae", "lora", "controlnet"):
        for name in (str(outside / "secret.safetensors"), "../../outside/secret.safetensors", "escape"):
            with pytest.raises(InvalidRequest, match="names only, never paths"):
                strict.registry.find(kind, name)
    with pytest.raises(InvalidRequest, match="names only"):
        strict.ip_adapters.adapter_path(str(outside / "secret.safetensors"))
    with pytest.raises(InvalidRequest, match="names only"):
        strict.ip_adapters.encoder_path("escape")
    assert "escape" not in strict.upscalers.names() and strict.upscalers.face_names() == []
    # the CLI (names_only off) still takes a path its user gives
    loose = Registry(models)
    assert loose.find("checkpoint", str(outside / "secret.safetensors")).path == outside / "secret.safetensors"


def test_resolver_compares_with_the_listing_only(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.safetensors").write_bytes(b"")
    (tmp_path / "out.safetensors").write_bytes(b"")
    (tmp_path / "in" / "link.safetensors").symlink_to(tmp_path / "out.safetensors")
    assert inside(tmp_path / "in" / "a.safetensors", tmp_path / "in")
    assert not inside(tmp_path / "in" / "link.safetensors", tmp_path / "in")
    assert not inside(tmp_path / "in" / ".." / "out.safetensors", tmp_path / "in")
    listing = [Named("a", tmp_path / "in" / "a.safetensors", ("a.safetensors",))]
    kw = {"field": "model", "what": "checkpoint", "folder": "checkpoints"}
    assert resolve("a", listing, **kw).name == "a"
    assert resolve("a.safetensors", listing, **kw).name == "a"
    assert resolve("a [0123456789]", listing, **kw).name == "a"
    messages = set()
    for bad in ("/etc/passwd", "../a", "..\\a", "in/../a", "", None, 7, ["a"], "x" * 5000):
        with pytest.raises(InvalidRequest) as err:
            resolve(bad, listing, **kw)
        messages.add(str(err.value).replace(repr(str(bad)[:120] + ("..." if len(str(bad)) > 120 else "")), "<n>"))
    assert len(messages) == 1, messages


# ---------------------------------------------------------------------------------------------
# Uploads of refused requests
# ---------------------------------------------------------------------------------------------
def uploads(world) -> list[Path]:
    folder = world[0] / "home" / "outputs" / "init-images"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


@pytest.mark.parametrize("route,body", [
    ("/sdapi/v1/img2img", {"init_images": [b64_png()], "mask": b64_png(), "refiner_checkpoint": "/etc/passwd"}),
    ("/sdapi/v1/img2img", {"init_images": [b64_png()], "override_settings": {"sd_model_checkpoint": "nope"}}),
    ("/sdapi/v1/img2img", {"init_images": [b64_png()], "steps": 0}),
    ("/sdapi/v1/txt2img", {"prompt": "<lora:nope:1>", "alwayson_scripts": {"controlnet": {"args": [
        {"module": "ip-adapter_clip_sd15", "model": "escape", "image": b64_png()}]}}}),
    ("/sdapi/v1/txt2img", {"prompt": "<lora:nope:1>", "alwayson_scripts": {"controlnet": {"args": [
        {"module": "none", "model": "danqing-tiny-canny", "image": b64_png()}]}}}),
    ("/api/v1/jobs", {"request": {"prompt": "x", "model": "/etc/passwd"}, "init_image": b64_png(),
                      "ip_adapter_images": [b64_png()]}),
])
def test_a_refused_request_leaves_no_upload(client, world, route, body):
    before = uploads(world)
    r = client.post(route, json={**TINY, **body} if route.startswith("/sdapi") else body)
    assert r.status_code == 422, r.text
    assert uploads(world) == before


def test_an_accepted_request_stores_its_upload(client, world):
    before = uploads(world)
    r = client.post("/api/v1/jobs", json={"request": {**TINY, "steps": 2, "denoising_strength": 0.5},
                                          "init_image": b64_png(), "save": False})
    assert r.status_code == 202, r.text
    added = [p for p in uploads(world) if p not in before]
    assert len(added) == 1 and added[0].name.endswith("-init.png")
    assert r.json()["request"]["init_image"] == str(added[0].resolve())
