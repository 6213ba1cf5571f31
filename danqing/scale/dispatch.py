"""The job API on the Ray Serve ingress: ``Dispatcher`` stands in for ``danqing serve``'s worker
(``server/jobs.py``) behind the very same job routes (``server.app.job_router``).

The jobs live in the job store (SQLite or PostgreSQL), exactly as the single server keeps them:
a submitted job is a 'queued' row; the dispatcher's thread claims queued generation jobs
(oldest first, marked 'running' with its start time) while fewer than ``slots`` are in flight,
sends each to a Studio replica (``serving.stream_replica``: the checkpoint as Ray Serve's
multiplexed model id, sent once more if its replica dies), and writes the replica's
``result_record`` back as 'done' -- or the replica's one-line error as 'failed'. The replica
saves the pictures (``replica.generate_result``, as ``save_images`` does for the A1111 route)
and streams each step as it is taken: a running job's view has the single server's
``progress`` (step, total, fraction, eta), and its event stream one ``progress`` event per step.

A restarted ingress recovers as the single server does (``JobStore.recover``): queued jobs stay
queued and are dispatched again; jobs it was running go back to the queue at their old place.

What the single server's worker has and the dispatcher does not: live previews (the preview
route answers 204, the events carry no ``preview``), and stopping a running job (only queued
jobs can be cancelled; a running one answers 409). A job counts as running from the moment it
is claimed, also while Ray holds it for a replica busy with an A1111 request.
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from danqing.request import GenerationRequest
from danqing.server.common import JobFailed
from danqing.server.jobs import Progress, wait_for_job
from danqing.server.store import DONE, FAILED, RUNNING, Job, JobStore

# What a replica's answer adds to the server's result record (replica.generate_result,
# serving.call_replica); the job keeps the record only, as the single server's does.
ANSWER_EXTRAS = ("pngs", "worker", "finished", "model_loads", "attempts")
SCAN = 64  # queued rows looked at per claim (other kinds of job, e.g. video, are left to `danqing serve`)
RECENT_LOGS = 32  # step logs kept for event streams that read a job after it ended

OnStep = Callable[[int, int, int, int], None]  # batch_index, step, total, batch_count
Send = Callable[[GenerationRequest, bool, OnStep], dict]


class Dispatcher:
    """Claims queued generation jobs from the store and has replicas run them.

    Args:
        store: the job store the job routes read.
        studio: the ingress's Studio, for names only (``ServerState.registry``); it generates nothing.
        slots: jobs in flight at most (the replica count: each replica runs one request at a time).
        send: runs one request on a replica, calling ``on_step`` for each step, and answers
            ``generate_result``'s dict (with ``error`` when it failed).
        poll_s: how often the store is looked at for jobs submitted elsewhere (another ingress,
            a ``danqing serve`` on the same database).
    """

    def __init__(self, store: JobStore, studio, *, slots: int, send: Send, poll_s: float = 0.25):
        self.store = store
        self.studio = studio
        self.slots = max(1, slots)
        self.send = send
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._busy: dict[str, Progress] = {}  # the jobs in flight and how far each is
        self._recent_logs: dict[str, list] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> dict[str, list[str]]:
        """Recover what a previous ingress left (``JobStore.recover``), then start dispatching;
        returns what was recovered."""
        recovered = self.store.recover()
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="danqing-dispatch")
        self._thread = threading.Thread(target=self._run, name="danqing-dispatcher", daemon=True)
        self._thread.start()
        return recovered

    def stop(self) -> None:
        """Stop claiming. Jobs in flight stay 'running' in the store unless their answer comes
        first; the next start puts them back in the queue."""
        self._stop.set()
        self._notify()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- what the job routes call (the single server's Worker interface) ----------------------
    def submit(self, request: GenerationRequest, *, source: str, save: bool) -> Job:
        job = self.store.add(request, source=source, save=save)
        self._notify()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        """The job once it is done, failed or cancelled, or as it is after ``timeout`` seconds
        (woken when a job of this ingress ends; the store is read again anyway)."""
        return wait_for_job(self.store, self._cond, job_id, timeout, self.poll_s)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job; a running one is on a replica and cannot be stopped (409)."""
        if self.store.cancel_queued(job_id):
            self._notify()
            return self.store.get(job_id)
        job = self.store.get(job_id)
        if job is not None and job.status == RUNNING:
            raise JobFailed(409, f"job {job_id} is running on a replica; the Ray deployment cancels queued "
                                 "jobs only", job_id)
        return job

    def progress(self, job_id: str | None = None) -> dict:
        """How far a job in flight is (the steps its replica has streamed); an empty snapshot
        for any other job."""
        with self._cond:
            return self._busy.get(job_id, Progress()).snapshot()

    def steps_since(self, job_id: str, start: int) -> list[tuple[int, int, int]]:
        """The (batch_index, step, total) of every step of the job from index ``start``."""
        with self._cond:
            if job_id in self._busy:
                return list(self._busy[job_id].log[start:])
            return list(self._recent_logs.get(job_id, [])[start:])  # finished meanwhile

    def take_images(self, job_id: str) -> list[bytes] | None:
        return None

    # -- the thread ---------------------------------------------------------------------------
    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                free = self.slots - len(self._busy)
            jobs = self._claim(free) if free > 0 else []
            for job in jobs:
                with self._cond:
                    self._busy[job.id] = Progress(job_id=job.id, batch_count=job.request.batch_count,
                                                  total=job.request.steps, started=time.monotonic())
                self._pool.submit(self._dispatch, job)
            if not jobs:
                with self._cond:
                    self._cond.wait(self.poll_s)

    def _claim(self, free: int) -> list[Job]:
        """Up to ``free`` of the oldest queued generation jobs, now 'running' (one conditional
        statement each: a job another ingress or server took meanwhile is skipped)."""
        left = [free]

        def accept(request) -> bool:
            if left[0] <= 0 or type(request) is not GenerationRequest:  # video, 3D, talk, comic: not here
                return False
            left[0] -= 1
            return True

        return self.store.claim_matching(accept, rows=1 << 30, scan=SCAN)

    def _on_step(self, job_id: str, batch_index: int, step: int, total: int, batch_count: int) -> None:
        with self._cond:
            p = self._busy[job_id]
            if (batch_index, step) < (p.batch_index, p.step):  # sent again after a replica died: anew
                p.log.clear()
            p.step, p.total, p.batch_index, p.batch_count = step, total, batch_index, batch_count
            p.log.append((batch_index, step, total))

    def _dispatch(self, job: Job) -> None:
        try:
            out = self.send(job.request, job.save, functools.partial(self._on_step, job.id))
        except Exception as exc:  # noqa: BLE001 -- a failing call must never stop the dispatcher
            out = {"error": f"internal error: {type(exc).__name__}: {exc}"}
        try:
            if "error" in out:
                self.store.finish(job.id, FAILED, error=out["error"])
            else:
                self.store.finish(job.id, DONE, result={k: v for k, v in out.items() if k not in ANSWER_EXTRAS})
        finally:
            with self._cond:
                self._recent_logs[job.id] = self._busy.pop(job.id).log
                while len(self._recent_logs) > RECENT_LOGS:
                    del self._recent_logs[next(iter(self._recent_logs))]
                self._cond.notify_all()


__all__ = ["Dispatcher"]
