"""Bad input at the edge: a table of malformed requests, each answered 4xx with a JSON message
naming the field, the server serving on afterwards; auth, CORS, --listen; and schemathesis
fuzzing the OpenAPI schema (a bounded number of examples per operation): never a 5xx."""

from __future__ import annotations

import base64
import io
import os
import pickle

import httpx
import pytest
from conftest import need_module
from fastapi.testclient import TestClient
from PIL import Image
from server_helpers import TINY, FakeStudio, LiveServer, make_app, shared_studio

from danqing.errors import InvalidRequest

LIMITS = {"max_upload_bytes": 200_000, "max_upload_pixels": 512 * 512, "max_body_bytes": 1_000_000}


def b64_png(size=(64, 64), color=(10, 20, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(make_app(tmp_path_factory.mktemp("bad-home"), **LIMITS)) as c:
        yield c


T2I, I2I, JOBS = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/api/v1/jobs"
BOMB = b64_png((4000, 4000))  # 16 MP of one colour: a few KB of PNG
PICKLE = base64.b64encode(pickle.dumps({"state_dict": [1, 2, 3]})).decode()

CASES = [
    # (id, method, path, json body, status, field named in the answer)
    ("steps-type", "post", T2I, {"steps": "abc"}, 422, "steps"),
    ("steps-range", "post", T2I, {"steps": -5}, 422, "steps"),
    ("huge-width", "post", T2I, {"width": 100000}, 422, "width"),
    ("width-not-8", "post", T2I, {"width": 65}, 422, "width"),
    ("huge-batch", "post", T2I, {"batch_size": 1000}, 422, "batch_size"),
    ("seed-range", "post", T2I, {"seed": 2**40}, 422, "seed"),
    ("prompt-type", "post", T2I, {"prompt": 123}, 422, "prompt"),
    ("prompt-syntax", "post", T2I, {"prompt": "(unbalanced"}, 422, "prompt"),
    ("lora-tag", "post", T2I, {"prompt": "a cat <lora:style:0.8>"}, 422, "prompt"),
    ("unknown-sampler", "post", T2I, {"sampler_name": "Nope"}, 422, "sampler_name"),
    ("unknown-scheduler", "post", T2I, {"scheduler": "wobbly"}, 422, "scheduler"),
    ("unknown-field", "post", T2I, {"prompt": "x", "foo": 1}, 422, "foo"),
    ("no-face-model", "post", T2I, {"restore_faces": True}, 422, "restore_faces"),
    ("unsupported-field", "post", T2I, {"tiling": True}, 422, "tiling"),
    ("hr-upscaler", "post", T2I, {"enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, 422, "hr_upscaler"),
    ("model-traversal", "post", T2I, {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 422, "sd_model_checkpoint"),
    ("model-absolute", "post", T2I, {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, 422, "sd_model_checkpoint"),
    ("model-backslash", "post", T2I, {"override_settings": {"sd_model_checkpoint": "..\\..\\x"}}, 422, "sd_model_checkpoint"),
    ("model-unknown", "post", T2I, {"override_settings": {"sd_model_checkpoint": "not-there"}}, 422, "sd_model_checkpoint"),
    ("unknown-option", "post", T2I, {"override_settings": {"samples_format": "jpg"}}, 422, "samples_format"),
    ("no-init", "post", I2I, {"prompt": "x"}, 422, "init_images"),
    ("two-inits", "post", I2I, {"init_images": [b64_png(), b64_png()]}, 422, "init_images"),
    ("bad-base64", "post", I2I, {"init_images": ["not base64!!"]}, 422, "init_images"),
    ("not-an-image", "post", I2I, {"init_images": [base64.b64encode(b"hello world").decode()]}, 422, "init_images"),
    ("pickle-upload", "post", I2I, {"init_images": [PICKLE]}, 422, "init_images"),
    ("decompression-bomb", "post", I2I, {"init_images": [BOMB]}, 422, "init_images"),
    ("upload-too-big", "post", I2I, {"init_images": [base64.b64encode(os.urandom(300_000)).decode()]}, 422, "init_images"),
    ("bad-mask", "post", I2I, {"init_images": [b64_png()], "mask": "%%%"}, 422, "mask"),
    ("resize-mode", "post", I2I, {"init_images": [b64_png()], "resize_mode": 9}, 422, "resize_mode"),
    ("pnginfo-empty", "post", "/sdapi/v1/png-info", {"image": ""}, 422, "image"),
    ("pnginfo-junk", "post", "/sdapi/v1/png-info", {"image": "AAAA"}, 422, "image"),
    ("options-type", "post", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": "two"}, 422, "CLIP_stop_at_last_layers"),
    ("options-vae-traversal", "post", "/sdapi/v1/options", {"sd_vae": "../../../root/.ssh/id_rsa"}, 422, "sd_vae"),
    ("job-model-traversal", "post", JOBS, {"request": {"model": "../secrets"}}, 422, "request.model"),
    ("job-vae-absolute", "post", JOBS, {"request": {"vae": "/etc/passwd"}}, 422, "request.vae"),
    ("job-init-path", "post", JOBS, {"request": {"init_image": "/etc/passwd"}}, 422, "request.init_image"),
    ("job-mask-path", "post", JOBS, {"request": {"mask": "../x.png"}, "init_image": b64_png()}, 422, "request.mask"),
    ("job-unknown-field", "post", JOBS, {"request": {"promt": "typo"}}, 422, "request.promt"),
    ("job-steps", "post", JOBS, {"request": {"steps": 10**9}}, 422, "request.steps"),
    ("job-no-request", "post", JOBS, {}, 422, "request"),
    ("job-bad-init", "post", JOBS, {"request": {}, "init_image": "@@@"}, 422, "init_image"),
    ("job-id-format", "get", "/api/v1/jobs/zzz", None, 422, "job_id"),
    ("job-unknown", "get", "/api/v1/jobs/" + "0" * 32, None, 404, None),
    ("history-status", "get", "/api/v1/history?status=weird", None, 422, "status"),
    ("history-limit", "get", "/api/v1/history?limit=100000", None, 422, "limit"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_answers_4xx_naming_the_field(client, case):
    _, method, path, body, status, field = case
    r = getattr(client, method)(path, json=body) if body is not None else getattr(client, method)(path)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    if field is not None:
        assert r.json().get("field") == field or detail.startswith(f"{field}:"), detail


def test_not_json_and_too_large_bodies(client):
    r = client.post(T2I, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = client.post(T2I, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post(I2I, content=b"x" * 1_000_001, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_server_still_serves_after_bad_input(client):
    for case in CASES:  # all of them again, back to back
        _, method, path, body, status, _ = case
        r = getattr(client, method)(path, json=body) if body is not None else getattr(client, method)(path)
        assert r.status_code == status
    r = client.post(T2I, json={"prompt": "a red circle", "steps": 2, "seed": 1, **TINY})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_basic_auth_and_listen(tmp_path):
    from danqing.server.app import create_app
    from danqing.settings import ServerSettings, Settings

    with TestClient(make_app(tmp_path / "a", api_auth="alice:s3cret")) as c:
        r = c.get("/sdapi/v1/samplers")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert c.get("/sdapi/v1/samplers", auth=("alice", "wrong")).status_code == 401
        assert c.get("/api/v1/history", auth=("alice", "s3cret")).status_code == 200
        assert c.post(T2I, json={"prompt": "x"}).status_code == 401  # checked before the body is read
    with pytest.raises(InvalidRequest, match="api-auth"):
        create_app(Settings(home=tmp_path / "b"), ServerSettings(host="0.0.0.0"), studio=shared_studio())
    with pytest.raises(InvalidRequest, match="api_auth"):
        ServerSettings(api_auth="nopassword").credentials()


def test_cli_listen_without_auth_refuses_to_start(capsys):
    from danqing.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--listen", "--port", "1"])
    assert exc.value.code == 2 and "api-auth" in capsys.readouterr().err


def test_no_cors_unless_configured(tmp_path):
    evil = {"Origin": "http://evil.example"}
    with TestClient(make_app(tmp_path / "a")) as c:
        r = c.get("/sdapi/v1/samplers", headers=evil)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with TestClient(make_app(tmp_path / "b", cors_origins=("http://ok.example",))) as c:
        assert c.get("/sdapi/v1/samplers", headers={"Origin": "http://ok.example"}).headers[
            "access-control-allow-origin"] == "http://ok.example"
        assert "access-control-allow-origin" not in c.get("/sdapi/v1/samplers", headers=evil).headers


# -- schemathesis ---------------------------------------------------------------------------------
schemathesis = need_module("schemathesis", "pip install -e '.[test]'")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    fake = FakeStudio(shared_studio())
    with LiveServer(make_app(tmp_path_factory.mktemp("fuzz-home"), studio=fake, sync_timeout_s=30, **LIMITS)) as server:
        server.fake = fake
        yield server


def test_openapi_fuzz_never_5xx(fuzz_server):
    """Every operation of the OpenAPI schema, with schemathesis' generated requests (valid and
    invalid, bounded per operation; DANQING_FUZZ_EXAMPLES raises it): no answer is a 5xx."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    raw = httpx.get(fuzz_server.url + "/openapi.json").json()
    api = schemathesis.openapi.from_dict(raw)
    failures, tried = [], 0
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for result in api.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events"):  # a stream; its behaviour is tested in test_server_jobs
            continue
        tried += 1
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=int(os.environ.get("DANQING_FUZZ_EXAMPLES", "12")), deadline=None,
                      derandomize=True, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case):
                case.call_and_validate(base_url=fuzz_server.url, checks=[not_a_server_error], timeout=60)

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode is schemathesis.GenerationMode.NEGATIVE
            except Exception as exc:  # noqa: BLE001 -- collect every operation's failure, then report
                failures.append(f"{mode.value} {operation.method.upper()} {operation.path}: {str(exc)[:2000]}")
    assert tried >= 30
    assert not failures, "\n\n".join(failures)
    assert httpx.get(fuzz_server.url + "/api/v1/health").json()["worker"] is True  # still serving
