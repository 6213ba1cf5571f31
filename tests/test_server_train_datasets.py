"""Datasets uploaded as a .zip (danqing/server/train_datasets.py, ``POST /api/v1/train/datasets``):
a captioned set unpacks into HOME/datasets/NAME and trains; zip slip, absolute paths, symlinks,
other files, too many files or bytes, uncaptioned pictures and a taken name are each one 4xx line
naming the field, and leave nothing behind, inside the datasets folder or out of it."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest
from PIL import Image
from server_helpers import make_app

from danqing.errors import InvalidRequest
from danqing.server.train_datasets import IMAGE_SUFFIXES, unpack_dataset


def png(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    return buf.getvalue()


def make_zip(members: dict[str, bytes | str], *, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


GOOD = {"0.png": png(), "0.txt": "a red square", "sub/1.png": png((30, 30, 200)), "sub/1.txt": "a blue square"}


def test_a_captioned_zip_unpacks_whole(tmp_path):
    litter = {"__MACOSX/._0.png": b"\0\5\x16\7", "sub/.DS_Store": b"\0"}  # what macOS's Finder adds
    out = unpack_dataset(io.BytesIO(make_zip({**GOOD, **litter})), tmp_path / "sq")
    assert out == {"images": 2, "captions": 2, "bytes": sum(len(v if isinstance(v, bytes) else v.encode())
                                                          for v in GOOD.values())}
    assert (tmp_path / "sq" / "sub" / "1.txt").read_text() == "a blue square"
    assert Image.open(tmp_path / "sq" / "0.png").getpixel((0, 0)) == (200, 30, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sq"]
    assert sorted(p.relative_to(tmp_path / "sq").as_posix() for p in (tmp_path / "sq").rglob("*")) == \
        ["0.png", "0.txt", "sub", "sub/1.png", "sub/1.txt"]


@pytest.mark.parametrize("members, symlink, limits, words", [
    ({**GOOD, "../evil.txt": "x"}, None, {}, "'..'"),                      # zip slip
    ({**GOOD, "sub/../../evil.txt": "x"}, None, {}, "'..'"),
    ({**GOOD, "/tmp/evil.png": png()}, None, {}, "absolute"),
    ({**GOOD, "sub\\..\\evil.txt": "x"}, None, {}, "backslash"),
    ({**GOOD, "C:/evil.txt": "x"}, None, {}, "drives"),
    (GOOD, "2.png", {}, "symlink"),
    ({**GOOD, "run.sh": "rm -rf /"}, None, {}, "not allowed"),
    ({**GOOD, "2.png": png()}, None, {}, "no .txt caption"),               # a picture without its caption
    ({**GOOD, "2.png": b"not a picture", "2.txt": "x"}, None, {}, "unreadable image"),
    ({**GOOD, "0.TXT": "again"}, None, {}, "twice"),
    (GOOD, None, {"max_files": 3}, "limit of 3"),
    ({**GOOD, "big.txt": "x" * 5000}, None, {"max_bytes": 4000}, "limit of 4000 bytes"),  # counted while unpacking
    ({}, None, {}, "empty"),
])
def test_refused_archives_leave_nothing(tmp_path, members, symlink, limits, words):
    datasets = tmp_path / "home" / "datasets"
    datasets.mkdir(parents=True)
    with pytest.raises(InvalidRequest, match=words) as err:
        unpack_dataset(io.BytesIO(make_zip(members, symlink=symlink)), datasets / "sq", **limits)
    assert err.value.field == "file"
    assert list(datasets.iterdir()) == []  # no dataset, no temporary folder
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["datasets", "home"]  # nothing climbed out


def test_not_a_zip_and_the_suffixes_of_training(tmp_path):
    from danqing.training.data import IMAGE_SUFFIXES as TRAINING

    with pytest.raises(InvalidRequest, match="not a .zip"):
        unpack_dataset(io.BytesIO(b"PK but not really"), tmp_path / "x")
    assert IMAGE_SUFFIXES == TRAINING


@pytest.fixture(scope="module")
def client(studio, tmp_path_factory):
    from fastapi.testclient import TestClient

    with TestClient(make_app(tmp_path_factory.mktemp("upload-home"), studio=studio)) as c:
        yield c


def upload(client, name, data: bytes):
    return client.post("/api/v1/train/datasets", data={"name": name},
                       files={"file": ("set.zip", data, "application/zip")})


def test_the_upload_route_makes_a_dataset_a_job_can_name(client):
    r = upload(client, "squares", make_zip(GOOD))
    assert r.status_code == 201, r.text
    assert r.json()["dataset"] == "squares" and r.json()["images"] == 2
    assert client.get("/api/v1/train/datasets").json()["datasets"] == ["squares"]
    state = client.app.state.danqing
    from danqing.server.train import TrainJobSubmit

    job = state.train.prepare(TrainJobSubmit(dataset="squares", name="sq-up", base="tiny-sd1"))
    assert job.config["data"]["source"] == str(state.settings.home / "datasets" / "squares")
    for name, data, field in (("squares", make_zip(GOOD), "name"), ("../up", make_zip(GOOD), "name"),
                              ("slip", make_zip({**GOOD, "../../evil.txt": "x"}), "file")):
        r = upload(client, name, data)
        assert r.status_code == 422 and field in r.text and "Traceback" not in r.text, r.text
    assert client.get("/api/v1/train/datasets").json()["datasets"] == ["squares"]
    assert not (state.settings.home / "evil.txt").exists()
