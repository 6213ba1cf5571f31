"""Batched serving: which queued requests may share one UNet batch, and how long the worker
waits to gather them.

Two requests are compatible when they agree on every request field except the per-image ones
(``PER_JOB``: prompts, seeds, variation seed and strength, batch size): the same model, VAE,
size, sampler, schedule, steps, CFG scale, clip skip, RNG source and every other option. The
rule is "everything not listed as per-job must be equal", so a field added to the request
later is compatible only when equal, never by accident. Requests that use something the
joint pass does not run (``SOLO``: an init picture, hires fix, refiner, LoRA tags, ...) always
run alone. The joint pass itself is ``danqing.passes.joint``; each picture equals its solo run
up to the batched kernels' rounding (docs/benchmarks.md, "Batched serving").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from danqing.customise.lora import request_tags
from danqing.errors import DanqingError
from danqing.request import GenerationRequest
from danqing.sampling.loop import SKIP, STOP
from danqing.server.jobs import Progress, Worker, png_bytes
from danqing.server.store import DONE, FAILED, Job, JobStore

# Fields that may differ between the requests of one batch (each keeps its own).
PER_JOB = ("prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "batch_size")

# field -> the value a request must have to share a batch (anything else runs alone).
SOLO = {
    "batch_count": 1,
    "init_image": None,
    "mask": None,
    "enable_hr": False,
    "restore_faces": False,
    "refiner_checkpoint": None,
    "p2p_source": None,
    "ip_adapter_image": (),
    "controlnet": (),
    "regions": None,
}


@dataclass(frozen=True)
class BatchSettings:
    """How the worker gathers requests into one UNet batch.

    Attributes:
        max_batch: most images (rows) in one batch; 1 turns batching off.
        max_wait_s: longest time the worker waits for compatible requests after taking the
            first one from the queue: no request is delayed by more than this.
    """

    max_batch: int = 1
    max_wait_s: float = 0.05

    def __post_init__(self):
        if self.max_batch < 1 or not 0 <= self.max_wait_s <= 10:
            raise ValueError(f"batching: max_batch must be >= 1 and max_wait_s in [0, 10], got "
                             f"{self.max_batch} and {self.max_wait_s}")

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1


def compat_key(request) -> str | None:
    """The key two requests must share to run in one batch, or None when the request runs alone.

    Args:
        request: a ``GenerationRequest`` as queued (seeds drawn, model named).
    """
    if not isinstance(request, GenerationRequest):
        return None  # a media job (3D, talking portrait) runs alone
    for name, joinable in SOLO.items():
        if getattr(request, name) != joinable:
            return None
    try:
        if request_tags(request):  # LoRA weights are patched per request
            return None
    except DanqingError:
        return None  # a bad tag: the solo run reports it
    return json.dumps(request.model_dump(mode="json", exclude=set(PER_JOB)), sort_keys=True)


class BatchingWorker(Worker):
    """The worker with batched serving: compatible queued jobs run as one UNet batch.

    Args:
        store, studio, outputs_dir, preview_interval, pictures: as ``Worker``.
        batching: ``BatchSettings`` (default: off, every job alone as ``Worker`` runs it).
    """

    def __init__(self, store: JobStore, studio, outputs_dir, *, preview_interval: float = 0.25,
                 batching: BatchSettings | None = None, pictures=None):
        super().__init__(store, studio, outputs_dir, preview_interval=preview_interval, pictures=pictures)
        self.batching = batching or BatchSettings()

    def _gather(self, first: Job) -> list[Job]:
        """``first`` and the compatible jobs queued within ``batching.max_wait_s`` of taking it,
        up to ``batching.max_batch`` images."""
        key = compat_key(first.request) if self.batching.enabled else None
        if key is None:
            return [first]
        group, rows = [first], first.request.batch_size
        deadline = time.monotonic() + self.batching.max_wait_s
        while rows < self.batching.max_batch and not self._stop.is_set():
            more = self.store.claim_matching(lambda r: compat_key(r) == key, self.batching.max_batch - rows)
            group += more
            rows += sum(j.request.batch_size for j in more)
            left = deadline - time.monotonic()
            if rows >= self.batching.max_batch or left <= 0:
                break
            with self._cond:
                self._cond.wait(left)
        return group

    def _run_group(self, jobs: list[Job]) -> None:
        """Compatible jobs as one UNet batch (``Studio.generate_joint``); each is finished,
        cancelled or failed on its own. Should the joint run fail, each job runs alone."""
        with self._cond:
            self._abort = None
            self._cancelled = set()
            self._members = {j.id: Progress(job_id=j.id, total=j.request.steps, started=time.monotonic()) for j in jobs}
            self._progress = self._members[jobs[0].id]
        try:
            results = self.studio.generate_joint([j.request for j in jobs], on_steps=[self._member_step(j.id) for j in jobs])
        except Exception:  # noqa: BLE001 -- each job alone then reports its own error
            results = None
        with self._cond:
            members, self._members = self._members, {}
            cancelled, abort = self._cancelled, self._abort
        with self._cond:
            if results is not None:
                self._recent_logs.update((job_id, p.log) for job_id, p in members.items())
            while len(self._recent_logs) > 32:
                del self._recent_logs[next(iter(self._recent_logs))]
            self._progress = Progress()
            self._abort = None
        for i, job in enumerate(jobs):
            if job.id in cancelled:
                continue  # finished by cancel()
            if results is None:
                self._run_job(job)
            elif abort == "shutdown":
                continue  # left 'running': recover() re-queues it on the next start
            else:
                try:
                    self.store.finish(job.id, DONE, result=self._deliver(job, results[i]))
                except (DanqingError, FileExistsError) as exc:
                    self.store.finish(job.id, FAILED, error=str(exc))

    def _member_step(self, job_id: str):
        """The step callback of one job of a batch: its own progress, log and preview; STOP
        when it is cancelled (or the batch interrupted), SKIP when the batch is skipped."""
        last = [0.0]

        def on_step(info):
            now = time.monotonic()
            with self._cond:
                p = self._members[job_id]
                p.step, p.total = info.step, info.total
                p.log.append((0, info.step, info.total))
                abort = "cancel" if job_id in self._cancelled else self._abort
                due = info.step == info.total or now - last[0] >= self.preview_interval
            if due:
                last[0] = now
                preview = png_bytes(info.preview())
                with self._cond:
                    p.preview_png, p.preview_step = preview, info.step
            if abort == "skip":
                return SKIP
            return STOP if abort else None

        return on_step

