"""The job store on SQLite and on a real PostgreSQL (a throwaway cluster started here from
Debian's postgresql package): the same operations give the same results on both, a restart with
jobs queued and running recovers the same way, several servers sharing PostgreSQL never run one
job twice, and a database written before the schema was versioned is migrated in place."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import need, need_module
from danqing.request import GenerationRequest
from danqing.server.jobs import planned_paths
from danqing.server.store import SCHEMA_VERSION, JobStore

TINY = dict(width=64, height=64, steps=2)


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temporary folder, listening on a Unix socket and a free local
    port; its URL. As root, the server runs as the ``postgres`` user (it refuses to run as root)."""
    need_module("psycopg", "pip install 'psycopg[binary]'")
    bindir = _pg_bin()
    need(bindir is not None, "PostgreSQL's server programs (/usr/lib/postgresql/*/bin)", "apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="danqing-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        need(shutil.which("runuser") is not None, "runuser (util-linux)", "apt-get install util-linux")
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "danqing", "--auth=trust",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "danqing", "jobs"],
                       check=True, capture_output=True)
        yield f"postgresql://danqing@127.0.0.1:{port}/jobs"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    """A fresh, empty store location of each kind."""
    if request.param == "sqlite":
        return tmp_path / "jobs.sqlite3"
    return _emptied(request.getfixturevalue("postgres"))


def _emptied(url: str) -> str:
    """The PostgreSQL database at ``url`` with danqing's tables dropped."""
    import sqlalchemy as sa

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS jobs, options, schema_version"))
    engine.dispose()
    return url


def _req(prompt: str = "a circle", seed: int = 1) -> GenerationRequest:
    return GenerationRequest.create(prompt=prompt, seed=seed, model="danqing-tiny", **TINY)


def test_the_same_operations_give_the_same_results(where):
    store = JobStore(where, worker="node-a")
    assert store.schema_version() == SCHEMA_VERSION
    a, b, c = (store.add(_req(p, i), source="api", save=True) for i, p in enumerate(["A red Circle", "a blue square", "50%_off"]))
    assert [store.position(j) for j in (a, b, c)] == [0, 1, 2]
    claimed = store.claim_next()
    assert (claimed.id, claimed.status, claimed.worker) == (a.id, "running", "node-a")
    assert store.cancel_queued(b.id) and not store.cancel_queued(a.id)
    store.finish(a.id, "done", result={"images": [{"seed": 0}]})
    assert store.get(a.id).result == {"images": [{"seed": 0}]} and store.get(a.id).finished >= store.get(a.id).started
    assert store.count("done") == 1 and store.count("queued", "running") == 1 and store.count("cancelled") == 1
    assert [j.id for j in store.history()] == [c.id, b.id, a.id]
    assert [j.id for j in store.history(query="red circle")] == [a.id]  # case-insensitive on both
    assert [j.id for j in store.history(query="50%_")] == [c.id]  # % and _ are literal
    assert [j.id for j in store.history(status="cancelled")] == [b.id]
    assert [j.id for j in store.history(limit=1, offset=1)] == [b.id]
    assert store.get(c.id).request == _req("50%_off", 2)  # the request round-trips exactly
    store.set_options({"sd_model_checkpoint": "danqing-tiny", "CLIP_stop_at_last_layers": 2})
    store.set_options({"CLIP_stop_at_last_layers": 1})
    assert store.options() == {"sd_model_checkpoint": "danqing-tiny", "CLIP_stop_at_last_layers": 1}
    store.close()


def test_restart_with_jobs_queued_and_running(where, tmp_path):
    """What a killed server leaves: a running job with a half-written image, a queued job, and an
    A1111 job whose client is gone; the next start (same worker name) recovers all of it."""
    store = JobStore(where, worker="node-a")
    running, queued = store.add(_req(), source="api", save=True), store.add(_req(), source="ui", save=True)
    ephemeral = store.add(_req(), source="a1111", save=False)
    assert store.claim_next().id == running.id
    planned = planned_paths(tmp_path / "out", [1])
    store.set_planned(running.id, planned)
    planned[0].parent.mkdir()
    planned[0].write_bytes(b"\x89PNG half")
    store.close()

    store = JobStore(where, worker="node-a")  # the next start
    out = store.recover()
    assert out == {"requeued": [running.id], "failed": [ephemeral.id], "removed": [str(planned[0])]}
    assert [store.get(j.id).status for j in (running, queued, ephemeral)] == ["queued", "queued", "failed"]
    assert store.claim_next().id == running.id  # keeps its place at the head of the queue
    store.close()


def test_servers_sharing_postgresql_never_run_a_job_twice(postgres):
    where = _emptied(postgres)
    first = JobStore(where, worker="node-a")
    ids = {first.add(_req(seed=i), source="api", save=True).id for i in range(40)}
    stores = [first, JobStore(where, worker="node-b"), JobStore(where, worker="node-c")]
    claimed: dict[str, list[str]] = {s.worker: [] for s in stores}

    def drain(store):
        while (job := store.claim_next()) is not None:
            claimed[store.worker].append(job.id)

    threads = [threading.Thread(target=drain, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [i for got in claimed.values() for i in got]
    assert sorted(every) == sorted(ids) and len(set(every)) == len(every)
    assert {first.get(i).worker for i in claimed["node-b"]} <= {"node-b"}
    # node-b restarts: it takes back its own running jobs only
    back = JobStore(where, worker="node-b").recover()
    assert sorted(back["requeued"]) == sorted(claimed["node-b"])
    assert all(first.get(i).status == "running" for i in claimed["node-a"] + claimed["node-c"])
    for s in stores:
        s.close()


def test_a_database_from_before_versioning_is_migrated(tmp_path):
    old = tmp_path / "old.sqlite3"
    db = sqlite3.connect(old)
    db.executescript("""
        CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
            kind TEXT NOT NULL, source TEXT NOT NULL, save INTEGER NOT NULL, prompt TEXT NOT NULL, request TEXT NOT NULL,
            created REAL NOT NULL, started REAL, finished REAL, error TEXT, planned TEXT, result TEXT);
        CREATE TABLE options (key TEXT PRIMARY KEY, value TEXT NOT NULL);""")
    db.execute("INSERT INTO jobs (id, status, kind, source, save, prompt, request, created) VALUES (?,?,?,?,?,?,?,?)",
               ("f" * 32, "queued", "txt2img", "api", 1, "a circle", _req().to_json(), 1.0))
    db.commit()
    db.close()
    store = JobStore(old, worker="node-a")
    assert store.schema_version() == SCHEMA_VERSION
    job = store.claim_next()
    assert (job.id, job.request, job.worker) == ("f" * 32, _req(), "node-a")
    store.close()
    assert JobStore(old).schema_version() == SCHEMA_VERSION  # opening again changes nothing


def test_an_unsupported_database_is_one_clear_error(tmp_path):
    from danqing.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="postgresql://"):
        JobStore("mysql://localhost/jobs")


def test_the_server_keeps_its_jobs_in_postgresql(postgres, tmp_path):
    """``danqing serve --db-url``'s store end to end: a job submitted to one server instance is
    run and saved, and a second instance on the same database lists it in its history."""
    from fastapi.testclient import TestClient
    from server_helpers import TINY as SIZE, shared_studio

    from danqing.server.app import create_app
    from danqing.settings import ServerSettings, Settings

    studio = shared_studio()
    settings = Settings(home=tmp_path, models_dir=studio.settings.models_dir, device="cpu", dtype="fp32",
                        db_url=_emptied(postgres))
    server = ServerSettings(ui=False, allowed_hosts=("testserver",))
    with TestClient(create_app(settings, server, studio=studio, preview_interval=0.0)) as client:
        job = client.post("/api/v1/jobs", json={"request": {**SIZE, "steps": 2, "prompt": "a red circle", "seed": 5}})
        assert job.status_code == 202, job.text
        done = client.get(f"/api/v1/jobs/{job.json()['id']}/wait", params={"timeout": 120}).json()
        assert done["status"] == "done" and done["result"]["images"][0]["seed"] == 5
    with TestClient(create_app(settings, server, studio=studio, preview_interval=0.0)) as client:
        listed = client.get("/api/v1/history").json()
    assert [j["id"] for j in listed["jobs"]] == [job.json()["id"]]
