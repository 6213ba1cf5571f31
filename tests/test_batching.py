"""Batched serving: compatible requests as one UNet batch, each picture its solo run's.

Tolerance: the relative bound of the parity tests (tests/parity.py, max|diff| <= 1e-4 x
max|solo|). Batched runs are not bit-identical to solo runs on the CPU: the UNet's matrix
products over 2N rows sum in another order than over 2 rows (measured on danqing-tiny, 8 Euler a
steps: max |latent diff| 7.8e-5, some images bit-identical); docs/benchmarks.md.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image
from parity import assert_close_scaled

from danqing import GenerationRequest
from danqing.server.batching import BatchingWorker, BatchSettings, compat_key
from danqing.server.jobs import CANCELLED, DONE, JobStore



@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a busy 2-core machine two spinning threads per process are many
    times slower; batched and solo runs are compared under the same setting (conftest gives
    the thread count back after each test)."""
    import torch

    torch.set_num_threads(1)


BASE = dict(steps=4, width=64, height=64, model="tiny-sd1")
# Different prompts (one with prompt editing), negatives, seeds, batch sizes, a variation seed.
MIXED = [
    dict(prompt="a red circle", seed=1),
    dict(prompt="a blue [square:star:0.5]", negative_prompt="blurry", seed=2, batch_size=2),
    dict(prompt="a green triangle", seed=3, subseed=7, subseed_strength=0.4),
]


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_joint_pictures_equal_their_solo_runs(studio, sampler):
    requests = [GenerationRequest(**BASE, sampler=sampler, **kw) for kw in MIXED]
    joint = studio.generate_joint(requests)
    for request, got in zip(requests, joint):
        solo = studio.generate(request)
        assert got.seeds == solo.seeds and got.infotexts == solo.infotexts
        assert_close_scaled(got.latents[0], solo.latents[0], what=f"{sampler} {request.prompt}")
        for a, b in zip(got.images, solo.images):  # the saved pictures: at most one level apart
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_joint_stop_keeps_each_requests_own_step(studio):
    """A request whose callback stops (a cancel) keeps its latents of that step; the others go on."""
    requests = [GenerationRequest(**BASE, sampler="Euler", seed=s, prompt="a star") for s in (1, 2)]
    seen = []
    stop_first = lambda info: seen.append(info.latents.shape[0]) or (True if info.step < 2 else False)  # noqa: E731
    joint = studio.generate_joint(requests, on_steps=[stop_first, None])
    assert joint[0].interrupted and not joint[1].interrupted
    assert seen == [1, 1]  # its own rows only, until it stopped at step 2
    short = studio.generate(requests[0].replace(steps=4), on_step=lambda info: info.step < 2)
    assert_close_scaled(joint[0].latents[0], short.latents[0])
    assert_close_scaled(joint[1].latents[0], studio.generate(requests[1]).latents[0])


def test_compat_key_is_everything_but_the_per_image_fields():
    a = GenerationRequest(prompt="x", seed=1, model="m", steps=4)
    assert compat_key(a) == compat_key(a.replace(prompt="y", negative_prompt="z", seed=9, batch_size=3,
                                                 subseed=4, subseed_strength=0.5))
    for change in (dict(steps=5), dict(cfg_scale=5.0), dict(sampler="Euler"), dict(width=64), dict(model="n"),
                   dict(schedule="Karras"), dict(clip_skip=2)):
        assert compat_key(a.replace(**change)) != compat_key(a), change
    for solo in (dict(enable_hr=True), dict(batch_count=2), dict(restore_faces=True), dict(prompt="x <lora:y:1>"),
                 dict(init_image="in.png")):
        assert compat_key(a.replace(**solo)) is None, solo


class _Spy:
    """The Studio, recording how many requests each joint run took."""

    def __init__(self, studio):
        self.studio, self.joint_sizes = studio, []

    def __getattr__(self, name):
        return getattr(self.studio, name)

    def generate_joint(self, requests, on_steps=None):
        self.joint_sizes.append(len(requests))
        return self.studio.generate_joint(requests, on_steps)


def _worker(studio, tmp_path, **batching):
    store = JobStore(tmp_path / "jobs.sqlite3")
    return BatchingWorker(store, _Spy(studio), tmp_path / "out", preview_interval=0.0,
                          batching=BatchSettings(**batching)), store


def test_gather_waits_at_most_max_wait_and_takes_only_compatible_jobs(studio, tmp_path):
    worker, store = _worker(studio, tmp_path, max_batch=3, max_wait_s=0.2)
    req = GenerationRequest(prompt="a", seed=1, **BASE)
    store.add(req, source="api", save=False)
    t = time.monotonic()
    assert len(worker._gather(store.claim_next())) == 1  # alone: back after the bounded wait
    assert 0.15 < time.monotonic() - t < 1.0
    worker = BatchingWorker(store, studio, tmp_path, batching=BatchSettings(max_batch=3, max_wait_s=10))
    ids = [store.add(req.replace(seed=s, prompt=f"p{s}"), source="api", save=False).id for s in (2, 3)]
    other = store.add(req.replace(steps=5), source="api", save=False).id
    last = store.add(req.replace(seed=4), source="api", save=False).id
    t = time.monotonic()
    group = worker._gather(store.claim_next())
    assert time.monotonic() - t < 5  # full at max_batch: no waiting for the window to close
    assert [j.id for j in group] == [*ids, last]  # the incompatible job stays queued
    assert store.get(other).status == "queued"


def test_worker_batches_queued_jobs_with_progress_and_cancel(studio, tmp_path):
    worker, store = _worker(studio, tmp_path, max_batch=8, max_wait_s=0.05)
    slow = dict(BASE, steps=24)
    jobs = [worker.submit(GenerationRequest(prompt=f"job {i}", seed=10 + i, sampler="Euler", **slow),
                          source="api", save=False) for i in range(3)]
    cancelled = jobs[1].id
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while worker.progress(cancelled)["step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.progress(cancelled)["job_id"] == cancelled  # each job of the batch has its own progress
        assert worker.cancel(cancelled).status == CANCELLED  # at once, while the others run on
        done = [worker.wait(j.id, timeout=120) for j in jobs]
    finally:
        worker.stop()
    assert worker.studio.joint_sizes == [3]
    assert [j.status for j in done] == [DONE, CANCELLED, DONE]
    assert worker.take_images(cancelled) is None
    assert len(worker.steps_since(jobs[0].id, 0)) == 24  # every step logged for late SSE readers
    for job in (jobs[0], jobs[2]):
        got = np.asarray(Image.open(io.BytesIO(worker.take_images(job.id)[0])), np.int16)
        solo = np.asarray(studio.generate(job.request).images[0], np.int16)
        assert np.abs(got - solo).max() <= 1


def test_batching_off_runs_every_job_alone(studio, tmp_path):
    worker, _ = _worker(studio, tmp_path, max_batch=1)
    jobs = [worker.submit(GenerationRequest(prompt="x", seed=s, **BASE), source="api", save=False) for s in (1, 2)]
    worker.start()
    try:
        assert all(worker.wait(j.id, timeout=60).status == DONE for j in jobs)
    finally:
        worker.stop()
    assert worker.studio.joint_sizes == []


def test_interrupt_stops_the_whole_batch_and_keeps_what_it_reached(studio, tmp_path):
    worker, _ = _worker(studio, tmp_path, max_batch=8, max_wait_s=0.05)
    jobs = [worker.submit(GenerationRequest(prompt="x", seed=s, **dict(BASE, steps=60)), source="api", save=False)
            for s in (1, 2)]
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while worker.progress(jobs[1].id)["step"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.interrupt()
        done = [worker.wait(j.id, timeout=60) for j in jobs]
    finally:
        worker.stop()
    assert [j.status for j in done] == [DONE, DONE]
    assert all(j.result["interrupted"] for j in done)
