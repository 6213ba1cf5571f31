"""The Ray ingress's job dispatcher (danqing/scale/dispatch.py) without Ray: a stand-in ``send``
in place of the replicas, a real job store. At most ``slots`` jobs in flight, the rest queued;
the streamed steps are the running job's progress; the replica's answer is written back as the
server's result record (or its error line); a running job cannot be cancelled; jobs of other
kinds (video) are left in the queue. tests/test_ray.py runs it on a real Ray Serve deployment."""

from __future__ import annotations

import threading
import time

import pytest

from danqing.request import GenerationRequest
from danqing.request_video import VideoRequest
from danqing.scale.dispatch import Dispatcher
from danqing.server.common import JobFailed
from danqing.server.store import JobStore

RECORD = ("images", "interrupted", "warnings", "timings", "request")  # server.jobs.result_record's keys


def until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_dispatcher_fills_the_replicas_and_writes_the_result(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    gate, sent = threading.Event(), []

    def send(request, save, on_step):  # a replica: streams its steps, then answers
        sent.append(request.prompt)
        for step in range(1, request.steps + 1):
            on_step(0, step, request.steps, 1)
        gate.wait(10)
        if request.prompt == "refused":
            return {"error": "prompt: refused by the engine"}
        record = {"images": [{"path": None, "seed": request.seed, "subseed": 1, "infotext": request.prompt}],
                  "interrupted": False, "warnings": [], "timings": {"total": 0.1}, "request": request.model_dump()}
        return {**record, "pngs": [b"png"], "worker": "replica:1", "finished": 0.0, "model_loads": 1, "attempts": 1}

    dispatcher = Dispatcher(store, None, slots=2, send=send, poll_s=0.02)
    video = store.add(VideoRequest.create(prompt="a clip", steps=2, seed=1), source="api", save=True)
    jobs = [dispatcher.submit(GenerationRequest.create(prompt=p, steps=3, seed=i), source="api", save=True)
            for i, p in enumerate(["a red circle", "refused", "a blue square"])]
    assert dispatcher.start() == {"requeued": [], "failed": [], "removed": []}
    try:
        until(lambda: len(sent) == 2)
        time.sleep(0.1)  # a third job would have been claimed by now
        assert [store.get(j.id).status for j in jobs] == ["running", "running", "queued"]
        progress = dispatcher.progress(jobs[0].id)
        assert (progress["job_id"], progress["step"], progress["total"], progress["fraction"]) == (jobs[0].id, 3, 3, 1.0)
        assert dispatcher.steps_since(jobs[0].id, 1) == [(0, 2, 3), (0, 3, 3)]
        with pytest.raises(JobFailed) as busy:
            dispatcher.cancel(jobs[0].id)
        assert busy.value.status == 409
        gate.set()
        finished = [dispatcher.wait(j.id, timeout=10) for j in jobs]
        assert [j.status for j in finished] == ["done", "failed", "done"]
        assert tuple(finished[0].result) == RECORD and finished[0].result["images"][0]["seed"] == 0
        assert finished[1].error == "prompt: refused by the engine" and finished[1].result is None
        assert finished[0].started >= finished[0].created and finished[0].finished >= finished[0].started
        assert dispatcher.steps_since(jobs[2].id, 0) == [(0, 1, 3), (0, 2, 3), (0, 3, 3)]  # kept after the end
        assert store.get(video.id).status == "queued"  # a video job is danqing serve's
    finally:
        dispatcher.stop()
    assert not dispatcher.alive
