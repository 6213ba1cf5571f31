"""Issue 15's defects, one test each, on a server over the bundled tiny model: work limits
(final pixels, prompt length / chunks / nesting, pictures, steps, frames) refused before anything
is queued; 500s that became 4xx (lone surrogates, deep brackets) and the last-resort JSON 500;
one JSON error shape on every path (413 for chunked bodies, 400 for undecodable ones, 405 for
TRACE, decompression bombs with the pixel message, the OpenAPI schema); strict booleans and
numbers; the Host allow-list and the Origin check."""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib

import httpx
import pytest
from fastapi.testclient import TestClient
from server_helpers import TINY, LiveServer, make_app

from danqing.conditioning.prompt_limits import PARSER_MAX_DEPTH, check_prompt, nesting_depth
from danqing.errors import InvalidRequest
from danqing.request import GenerationRequest
from danqing.server.security import check_frames, host_name
from danqing.settings import ServerSettings, limits_from

T2I, I2I, JOBS = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/api/v1/jobs"
ERROR_KEYS = {"error", "field", "detail"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(make_app(tmp_path_factory.mktemp("sec-home")), raise_server_exceptions=False) as c:
        yield c


def jobs_in_store(client) -> int:
    return len(client.get("/api/v1/history", params={"limit": 500}).json()["jobs"])


def refused(r, status: int, field: str | None = None, words: str = "") -> dict:
    """The answer is ``status`` with the one error shape, naming ``field`` and saying ``words``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert ERROR_KEYS <= set(body), body
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert body["field"] == field, body
    assert words in body["detail"], body
    return body


# -- work limits ------------------------------------------------------------------------------------
def test_hires_final_size_is_bounded_before_queueing(client):
    before = jobs_in_store(client)
    r = client.post(T2I, json={"prompt": "x", "width": 4096, "height": 4096, "enable_hr": True, "hr_scale": 8})
    body = refused(r, 422, "hr_scale", "max_pixels")
    assert "32768x32768" in body["detail"]
    r = client.post(JOBS, json={"request": {"width": 4096, "height": 4096, "enable_hr": True, "hr_scale": 8}})
    refused(r, 422, "request.hr_scale", "max_pixels")
    assert jobs_in_store(client) == before  # nothing was queued


@pytest.mark.parametrize("path,wrap", [(T2I, lambda b: b), (JOBS, lambda b: {"request": b})])
def test_two_million_character_prompt_is_refused_fast(client, path, wrap):
    body = json.dumps(wrap({"prompt": "a red circle, " * 142_858}))  # 2,000,012 characters
    t = time.perf_counter()
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - t
    refused(r, 422, None, "max_prompt_chars")
    assert r.json()["field"].endswith("prompt")
    assert elapsed < 1.0, f"took {elapsed:.2f} s"


@pytest.mark.parametrize("prompt", ["(" * 1000 + "a" + ")" * 1000, "[a:" * 3000 + "b" + ":0.5]" * 3000,
                                    "[" * 5000, "(((" * 400])
@pytest.mark.parametrize("path,wrap,field", [(T2I, lambda b: b, "prompt"), (JOBS, lambda b: {"request": b}, "request.prompt"),
                                             (T2I, lambda b: {"negative_prompt": b["prompt"]}, "negative_prompt")])
def test_deep_brackets_are_4xx_not_500(client, prompt, path, wrap, field):
    r = client.post(path, json=wrap({"prompt": prompt}))
    refused(r, 422, field, "max_prompt_depth" if len(prompt) <= 10_000 else "max_prompt_chars")


def test_prompt_chunks_batch_and_steps_limits(tmp_path):
    app = make_app(tmp_path, max_steps=10, max_batch_images=4, max_prompt_chunks=2, max_pixels=128 * 128,
                   max_prompt_chars=30_000, max_prompt_depth=5)
    with TestClient(app) as c:
        refused(c.post(JOBS, json={"request": {"prompt": "[a:" * 3000 + "b" + ":0.5]" * 3000}}), 422, "request.prompt",
                "3000 deep")
        refused(c.post(T2I, json={"prompt": "((((((a))))))", "steps": 2}), 422, "prompt", "max_prompt_depth")
        refused(c.post(T2I, json={"prompt": "cat " * 160, "steps": 2, **TINY}), 422, "prompt", "max_prompt_chunks")  # 160 tokens: 3 chunks
        refused(c.post(T2I, json={"prompt": "x", "steps": 11, **TINY}), 422, "steps", "max_steps")
        refused(c.post(T2I, json={"prompt": "x", "steps": 2, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 20,
                                  "hr_upscaler": "Latent", **TINY}), 422, "hr_second_pass_steps", "max_steps")
        refused(c.post(T2I, json={"prompt": "x", "steps": 2, "batch_size": 2, "n_iter": 3, **TINY}), 422, "batch_size",
                "max_batch_images")
        refused(c.post(T2I, json={"prompt": "x", "steps": 2, "width": 256, "height": 128}), 422, "width", "max_pixels")
        refused(c.post(T2I, json={"steps": 2, "enable_hr": True, "hr_resize_x": 256, "hr_resize_y": 256, **TINY}), 422,
                "hr_resize_x",
                "max_pixels")
        refused(c.post(JOBS, json={"request": {"batch_count": 5, "steps": 2, **TINY}}), 422, "request.batch_size",
                "max_batch_images")
        assert len(c.get("/api/v1/history").json()["jobs"]) == 0
        # at the limits: accepted and run
        r = c.post(T2I, json={"prompt": "cat " * 100, "steps": 2, "batch_size": 2, "n_iter": 2, "seed": 1, **TINY})
        assert r.status_code == 200 and len(r.json()["images"]) == 4, r.text


def test_limits_from_environment_and_flags(monkeypatch, capsys):
    assert limits_from(["max_pixels=1_000_000"], {"DANQING_MAX_STEPS": "30", "DANQING_MAX_PIXELS": "5"}) == {
        "max_steps": 30, "max_pixels": 1_000_000}
    with pytest.raises(InvalidRequest, match="max_wobble"):
        limits_from(["max_wobble=3"], {})
    with pytest.raises(InvalidRequest, match="max_steps"):
        limits_from([], {"DANQING_MAX_STEPS": "many"})
    with pytest.raises(InvalidRequest, match="max_prompt_depth"):
        ServerSettings(max_prompt_depth=PARSER_MAX_DEPTH + 1)
    with pytest.raises(InvalidRequest, match="max_frames"):
        ServerSettings(max_frames=0)
    # the CLI reads both: a bad --limit is one line and exit code 2, before anything starts
    from danqing.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--limit", "max_steps=none", "--port", "1"])
    assert exc.value.code == 2 and "max_steps" in capsys.readouterr().err
    monkeypatch.setenv("DANQING_MAX_PROMPT_DEPTH", "1000")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "1"])
    assert exc.value.code == 2 and "max_prompt_depth" in capsys.readouterr().err


def test_frames_limit():
    limits = ServerSettings(max_frames=16)
    assert check_frames(16, limits) == 16
    with pytest.raises(InvalidRequest, match=r"frames: 17 frames is more than the limit of 16 \(max_frames\)"):
        check_frames(17, limits)
    with pytest.raises(InvalidRequest, match="frames"):
        check_frames(True, limits)


def test_nesting_prescan_is_pure_and_guards_the_library():
    assert nesting_depth("a (b [c:d:0.5]) e") == (2, 5)
    assert nesting_depth(r"\(\(\( a") == (0, -1)  # escaped brackets are text
    assert nesting_depth("))) (a)") == (1, 4)
    assert nesting_depth("(" * 100_000)[0] == 100_000  # no recursion
    check_prompt("((a))", "prompt", max_depth=2)
    with pytest.raises(InvalidRequest, match="max_prompt_depth"):
        check_prompt("(((a)))", "prompt", max_depth=2)
    # the CLI and the library: an InvalidRequest, never a RecursionError
    for prompt in ("(" * 1000 + "a" + ")" * 1000, "[a:" * 3000 + "b" + ":0.5]" * 3000):
        with pytest.raises(InvalidRequest, match="prompt: brackets nested"):
            GenerationRequest.create(prompt=prompt)
    with pytest.raises(InvalidRequest, match="surrogate"):
        GenerationRequest.create(negative_prompt="ok \ud800")


# -- 500 -> 4xx ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,field", [
    (T2I, '{"prompt": "a \\ud800 cat"}', "prompt"),
    (T2I, '{"prompt": "x", "sampler_name": "\\udfff"}', "sampler_name"),
    (JOBS, '{"request": {"prompt": "\\ud800"}}', "request.prompt"),
    (JOBS, '{"request": {"controlnet": [{"model": "\\ud800"}]}}', "request.controlnet.0.model"),
    ("/sdapi/v1/options", '{"sd_vae": "\\ud800"}', "sd_vae"),
    ("/sdapi/v1/png-info", '{"image": "\\ud800"}', "image"),
])
def test_lone_surrogate_is_a_json_4xx(client, path, body, field):
    before = jobs_in_store(client)
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    refused(r, 422, field, "surrogate")
    assert jobs_in_store(client) == before


def test_an_unexpected_error_is_still_json(tmp_path, monkeypatch):
    app = make_app(tmp_path)
    with TestClient(app, raise_server_exceptions=False) as c:
        monkeypatch.setattr(app.state.danqing.worker, "interrupt", lambda: 1 / 0)
        r = c.post("/sdapi/v1/interrupt")
        body = refused(r, 500, None, "ZeroDivisionError")
        assert body["error"] == "InternalError" and r.headers["content-type"] == "application/json"


# -- the error contract ---------------------------------------------------------------------------
def test_chunked_body_over_the_limit_is_413(tmp_path):
    def chunks():
        for _ in range(40):
            yield b'{"prompt": "' + b"x" * 50_000  # 2 MB, never a Content-Length

    with LiveServer(make_app(tmp_path, max_body_bytes=1_000_000)) as server:
        for path in (T2I, JOBS, "/sdapi/v1/options"):
            r = httpx.post(server.url + path, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
            assert "content-length" not in r.request.headers
            refused(r, 413, "body", "limit of 1000000 bytes")
        r = httpx.post(server.url + T2I, content=b"x" * 1_000_001, headers={"content-type": "application/json"})
        refused(r, 413, "body", "limit of 1000000 bytes")


def test_undecodable_bodies_are_400_naming_the_body(client):
    r = client.post(T2I, content='{"prompt": "caf\xe9"}'.encode("latin-1"), headers={"content-type": "application/json"})
    refused(r, 400, "body", "UTF-8")
    r = client.post(JOBS, content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    refused(r, 400, "body", "nested too deeply")


def test_wrong_methods_are_405(client):
    for method, path in (("TRACE", T2I), ("TRACE", "/"), ("TRACE", "/api/v1/health"), ("DELETE", T2I),
                         ("PUT", "/sdapi/v1/options"), ("GET", "/sdapi/v1/interrupt"), ("CONNECT", JOBS)):
        r = client.request(method, path)
        refused(r, 405, None, method)
        assert r.headers.get("allow")
    refused(client.get("/sdapi/v1/nothing-here"), 404, None, "no route")
    refused(client.get("/api/v1/jobs/" + "0" * 32), 404, None, "no job")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data (what a bomb looks like to
    Image.open: only the header is read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(5000, 5000), (30_000, 30_000)])  # over our limit; over Pillow's own too
def test_decompression_bombs_get_the_pixel_limit_message(client, size):
    png = base64.b64encode(_png_header(*size)).decode()
    refused(client.post(I2I, json={"init_images": [png]}), 422, "init_images", "more than the limit of 16777216")
    refused(client.post("/sdapi/v1/png-info", json={"image": png}), 422, "image", "more than the limit of")
    refused(client.post(JOBS, json={"request": {}, "init_image": png}), 422, "init_image", "more than the limit of")


def test_openapi_documents_the_error_answers(client):
    schema = client.get("/openapi.json").json()
    error = schema["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"error", "detail"} and ERROR_KEYS <= set(error["properties"])
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # not what the server answers
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            for status in ("400", "404", "413", "422"):
                ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (method, path, status)
    # a real 422 answer holds exactly the schema's fields
    body = client.post(T2I, json={"steps": "many"}).json()
    assert set(body) <= set(error["properties"]) and all(k in body for k in error["required"])


def test_numbers_and_booleans_are_strict(client):
    for body, field in (({"enable_hr": 0}, "enable_hr"), ({"restore_faces": "false"}, "restore_faces"),
                        ({"steps": 20.0}, "steps"), ({"steps": True}, "steps"), ({"seed": "1"}, "seed"),
                        ({"cfg_scale": True}, "cfg_scale"), ({"send_images": 1}, "send_images")):
        refused(client.post(T2I, json={"prompt": "x", **body}), 422, field)
    refused(client.post(I2I, json={"init_images": ["x"], "inpaint_full_res": 1.0}), 422, "inpaint_full_res")
    for body, field in (({"request": {"enable_hr": 1}}, "request.enable_hr"), ({"request": {"steps": 4.0}}, "request.steps"),
                        ({"request": {"cfg_scale": False}}, "request.cfg_scale"), ({"request": {}, "save": 0}, "save"),
                        ({"request": {"restore_faces": 0}}, "request.restore_faces")):
        refused(client.post(JOBS, json=body), 422, field)
    # what stays accepted: an integer for a float, true/false or 0/1 where A1111 sends both
    from danqing.server.a1111 import Img2ImgBody, Txt2ImgBody

    assert Txt2ImgBody.model_validate({"cfg_scale": 7, "enable_hr": False}).cfg_scale == 7
    assert Img2ImgBody.model_validate({"inpaint_full_res": True, "inpainting_mask_invert": 0}).inpaint_full_res is True


def test_every_error_has_the_one_shape(tmp_path):
    with TestClient(make_app(tmp_path, api_auth="u:p", max_body_bytes=1000)) as c:
        assert set(c.get("/sdapi/v1/samplers").json()) == ERROR_KEYS  # 401
        auth = ("u", "p")
        for r in (c.post(T2I, content=b"x" * 2000, auth=auth), c.get("/nope/", auth=auth),
                  c.post("/api/v1/jobs/" + "0" * 32 + "/cancel", auth=auth), c.post(T2I, json={"steps": -1}, auth=auth),
                  c.post(T2I, content=b"{bad", headers={"content-type": "application/json"}, auth=auth)):
            assert r.status_code >= 400 and ERROR_KEYS <= set(r.json()), r.text


# -- Host and Origin ------------------------------------------------------------------------------
def test_foreign_host_is_refused(tmp_path):
    with TestClient(make_app(tmp_path, allowed_hosts=())) as c:
        body = refused(c.get("/sdapi/v1/samplers", headers={"host": "attacker.example"}), 400, "host", "attacker.example")
        assert "localhost" in body["detail"]
        refused(c.post("/sdapi/v1/interrupt", headers={"host": "attacker.example:7860"}), 400, "host")
        for host in ("localhost:7860", "127.0.0.1", "[::1]:7860", "LOCALHOST"):
            assert c.get("/sdapi/v1/samplers", headers={"host": host}).status_code == 200, host
    with TestClient(make_app(tmp_path, allowed_hosts=("studio.lan",))) as c:
        assert c.get("/sdapi/v1/samplers", headers={"host": "studio.lan:7860"}).status_code == 200
        assert c.get("/sdapi/v1/samplers", headers={"host": "other.lan"}).status_code == 400
    assert host_name("[::1]:80") == "::1" and host_name("Example.COM:1") == "example.com"
    assert "192.168.1.5" in ServerSettings(host="192.168.1.5", api_auth="u:p").host_names()
    assert ServerSettings(host="0.0.0.0", api_auth="u:p").host_names() is None  # every name: auth guards it
    assert "box" in ServerSettings(host="0.0.0.0", api_auth="u:p", allowed_hosts=("box",)).host_names()


def test_foreign_origin_cannot_change_state(tmp_path):
    evil = {"origin": "http://attacker.example"}
    with TestClient(make_app(tmp_path / "a", allowed_hosts=(), cors_origins=("http://ok.example",)),
                    base_url="http://localhost:7860") as c:
        refused(c.post("/sdapi/v1/interrupt", headers=evil), 403, "origin", "attacker.example")
        refused(c.post("/sdapi/v1/interrupt", headers={"origin": "null"}), 403, "origin")
        refused(c.post("/sdapi/v1/interrupt", headers={"origin": "http://localhost:9999"}), 403, "origin")  # another port
        refused(c.post(JOBS, json={"request": TINY}, headers=evil), 403, "origin")
        assert len(c.get("/api/v1/history", headers=evil).json()["jobs"]) == 0  # reading is no side effect
        assert c.post("/sdapi/v1/interrupt").status_code == 200  # no Origin: a script
        assert c.post("/sdapi/v1/interrupt", headers={"origin": "http://localhost:7860"}).status_code == 200
        assert c.post("/sdapi/v1/interrupt", headers={"origin": "http://ok.example"}).status_code == 200
    with TestClient(make_app(tmp_path / "b", api_auth="u:p"), base_url="http://localhost:7860") as c:
        refused(c.post("/sdapi/v1/skip", headers=evil, auth=("u", "p")), 403, "origin")  # cached credentials too


def test_api_paths_keep_their_answers_with_the_web_ui_mounted(tmp_path):
    """The UI is mounted at ``/`` and would take every path: API misses stay 404/405 JSON."""
    with TestClient(make_app(tmp_path, ui=True)) as c:
        for method, path in (("TRACE", "/"), ("DELETE", T2I), ("PUT", JOBS), ("GET", "/sdapi/v1/interrupt")):
            r = c.request(method, path)
            refused(r, 405, None, method)
        assert c.delete(T2I).headers["allow"] == "POST"
        refused(c.get("/sdapi/v1/nothing-here"), 404, None, "no route")
        refused(c.get("/", headers={"host": "attacker.example"}), 400, "host")  # the UI is behind the Host check too
        assert c.get("/").status_code == 200
