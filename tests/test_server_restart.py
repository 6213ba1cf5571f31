"""Restart: 5 jobs queued on a real ``danqing serve`` process; the server is killed (SIGKILL)
mid-queue, started again, stopped gracefully (SIGTERM) mid-job, started a third time. Every job
ends done exactly once, in submission order, with one complete PNG and no stray file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from PIL import Image
from server_helpers import TINY, free_port

from danqing.settings import OFFLINE_ENV


class ServerProcess:
    def __init__(self, home, port):
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "danqing.cli", "--home", str(home), "--device", "cpu", "serve",
               "--port", str(port), "--no-ui"]
        env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
        self.log = open(home / f"server-{time.time_ns()}.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.url + "/api/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not start: {(home / self.log.name).read_text()[-2000:]}")
            time.sleep(0.1)

    def job(self, job_id):
        return httpx.get(f"{self.url}/api/v1/jobs/{job_id}", timeout=10).json()

    def wait_running(self, job_id, min_step=3, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = self.job(job_id)
            if j["status"] == "running" and j.get("progress", {}).get("step", 0) >= min_step:
                return j
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never ran: {self.job(job_id)}")

    def stop(self, sig):
        self.proc.send_signal(sig)
        self.proc.wait(60)
        self.log.close()


def test_jobs_survive_kill_and_restart(tmp_path):
    home = tmp_path
    port = free_port()
    a = ServerProcess(home, port)
    ids = []
    for i in range(5):
        r = httpx.post(a.url + "/api/v1/jobs", json={"request": {"prompt": f"job {i} a red circle", "seed": 100 + i,
                                                                 "steps": 60, "sampler": "Euler", **TINY}})
        assert r.status_code == 202
        ids.append(r.json()["id"])
    a.wait_running(ids[1])
    a.stop(signal.SIGKILL)  # no chance to clean up

    b = ServerProcess(home, port)
    assert b.job(ids[0])["status"] == "done"
    a_states = [b.job(i)["status"] for i in ids[1:]]
    assert all(s in ("queued", "running") for s in a_states), a_states  # job 1 re-queued, none lost
    b.wait_running(ids[3])
    b.stop(signal.SIGTERM)  # graceful: the running job goes back to the queue
    assert b.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after shutting down

    c = ServerProcess(home, port)
    jobs = [httpx.get(f"{c.url}/api/v1/jobs/{i}/wait", params={"timeout": 120}, timeout=130).json() for i in ids]
    c.stop(signal.SIGTERM)

    assert [j["status"] for j in jobs] == ["done"] * 5
    starts = [j["started"] for j in jobs]
    assert starts == sorted(starts)  # still run in submission order
    pngs = sorted((home / "outputs" / "txt2img-images").rglob("*.png"))
    assert len(pngs) == 5, pngs  # one image per job: nothing duplicated by the re-runs
    stray = [p for p in (home / "outputs").rglob("*") if p.is_file() and p.name.startswith(".")]
    assert not stray, stray  # no temp file left half-written
    for job in jobs:
        (img,) = job["result"]["images"]
        with Image.open(img["path"]) as pic:
            pic.load()  # a complete file
            assert pic.size == (64, 64) and pic.info["parameters"] == img["infotext"]
        assert f"Seed: {job['request']['seed']}" in img["infotext"]
