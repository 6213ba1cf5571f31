"""The job queue: the store of jobs, history and options (``server/store.py``: SQLite or
PostgreSQL), and the one worker thread that owns the Studio (and with it the device).

Every way in -- the async job API, the A1111 routes, the web UI -- adds a job here and, if it
wants to, waits for it. HTTP handlers never touch tensors: the worker turns previews and results
into PNG bytes before anyone else sees them.

Durability: a job's row is committed before its id is returned; images are written atomically
(``save_png``: temp file + fsync + rename) and their planned names recorded before writing, so a
server killed mid-job leaves no half-written file. On start, ``recover`` deletes what an
interrupted run may have left, puts 'running' jobs back in the queue (same place: the queue is
ordered by ``seq``), and fails the jobs whose only consumer was an HTTP client that is gone.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from danqing.apps.families import family_of, run_request
from danqing.decode import tiny_preview
from danqing.models.preview_decoder import PREVIEW_MODES, find_tiny_decoder, latent_space, load_tiny_decoder
from danqing.outputs.video import clip_paths, planned_files
from danqing.request import GenerationRequest
from danqing.request_video import VideoRequest
from danqing.errors import DanqingError
from danqing.outputs import place
from danqing.outputs.place import planned as planned_paths  # A1111 names for a run's pictures (re-exported)
from danqing.outputs.store import next_output_path
from danqing.sampling.loop import SKIP, STOP
from danqing.server.comic_request import ComicJob, run_comic
from danqing.server.portrait_request import PortraitJob, run_portrait
from danqing.server.media import run_3d, run_talk
from danqing.server.talk_request import TalkJob
from danqing.server.store import CANCELLED, DONE, FAILED, TERMINAL, Job, JobStore
from danqing.threed.run import ThreeDRequest
from danqing.studio import resolve_request


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """What the running job has reached; a snapshot is handed to HTTP handlers."""

    job_id: str | None = None
    step: int = 0
    total: int = 0
    batch_index: int = 0
    batch_count: int = 1
    passes_done: int = 0
    started: float = 0.0
    preview_png: bytes | None = None
    preview_step: int = 0
    loss: float | None = None  # a 3D job's score-distillation loss at ``step``
    interrupted: bool = False
    skipped: bool = False
    log: list = field(default_factory=list)  # one (batch_index, step, total) per step, for SSE

    @property
    def fraction(self) -> float:
        if not self.job_id or not self.total:
            return 0.0
        done = self.batch_index * self.total + self.step
        return min(1.0, done / (self.batch_count * self.total))

    @property
    def eta(self) -> float:
        f = self.fraction
        if f <= 0:
            return 0.0
        elapsed = time.monotonic() - self.started
        return max(0.0, elapsed / f - elapsed)

    def snapshot(self) -> dict:
        return {
            "job_id": self.job_id, "step": self.step, "total": self.total, "batch_index": self.batch_index,
            "batch_count": self.batch_count, "fraction": round(self.fraction, 4), "eta": round(self.eta, 3),
            "preview_png": self.preview_png, "preview_step": self.preview_step, "loss": self.loss,
            "interrupted": self.interrupted, "skipped": self.skipped, "log_len": len(self.log),
        }


def png_bytes(image, infotext: str | None = None) -> bytes:
    from PIL import PngImagePlugin

    info = None
    if infotext:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def result_record(result, paths) -> dict:
    """What a finished generation job keeps: each picture's file, seeds and infotext, and the run's
    flags, warnings, timings and request."""
    return {
        "images": [{"path": str(p) if p else None, "seed": s, "subseed": ss, "infotext": t}
                   for p, s, ss, t in zip(paths, result.seeds, result.subseeds, result.infotexts)],
        "interrupted": result.interrupted,
        "warnings": result.warnings,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "request": result.request.model_dump(),
    }


def wait_for_job(store: JobStore, cond: threading.Condition, job_id: str, timeout: float | None = None,
                 poll_s: float = 0.5) -> Job | None:
    """The job once it is done, failed or cancelled, or as it is after ``timeout`` seconds; the
    store is read again whenever ``cond`` is notified (a job ended) or every ``poll_s``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = store.get(job_id)
        if job is None or job.status in TERMINAL:
            return job
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return job
        with cond:
            cond.wait(poll_s if left is None else min(poll_s, left))


class Worker:
    """The single thread that runs jobs in submission order with the one Studio.

    Args:
        store: the job store.
        studio: the Studio (its ModelManager owns the device); only this thread calls generate.
        outputs_dir: the working folder (video clips go to ``txt2video/DATE/``, ...).
        pictures: where saved pictures go (``txt2img-images/DATE/``, ``img2img-images/DATE/``):
            a folder or an fsspec URL (``outputs.place``) [default: ``outputs_dir``].
        preview_interval: seconds between live previews (the last step always gets one).
    """

    def __init__(self, store: JobStore, studio, outputs_dir: Path, *, preview_interval: float = 0.25,
                 pictures: place.Location | None = None):
        self.store = store
        self.studio = studio
        self.outputs_dir = Path(outputs_dir)
        self.pictures = pictures or self.outputs_dir
        self.preview_interval = preview_interval
        self._cond = threading.Condition()
        self._progress = Progress()
        self._stop = threading.Event()
        self._abort: str | None = None  # "cancel", "interrupt" or "skip" for the running job
        self._thread: threading.Thread | None = None
        self._handed: dict[str, tuple[float, list[bytes]]] = {}
        self._recent_logs: dict[str, list] = {}  # step logs of the last finished jobs (late SSE readers)
        self._members: dict[str, Progress] = {}  # the jobs of a running batch (batched serving)
        self._cancelled: set[str] = set()  # members of the running batch cancelled one by one
        self._preview_mode = PREVIEW_MODES[0]  # the running job's (read from the options as it starts)
        self._tiny_decoders: dict[str, object] = {}  # latent space -> preview decoder (or None): a model cache
        self._preview_request, self._preview_space = None, None
        self.ready = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="danqing-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish: the running job is interrupted and stays 'running' in the store only if the
        thread does not end in time (then ``recover`` re-queues it on the next start)."""
        self._stop.set()
        with self._cond:
            if self._progress.job_id:
                self._abort = "shutdown"
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- what handlers call -------------------------------------------------------------------
    def submit(self, request: GenerationRequest, *, source: str, save: bool) -> Job:
        job = self.store.add(request, source=source, save=save)
        with self._cond:
            self._cond.notify_all()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is done, failed or cancelled (or ``timeout``); returns its row."""
        return wait_for_job(self.store, self._cond, job_id, timeout)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job, or stop the running one (its images are not kept)."""
        if self.store.cancel_queued(job_id):
            self._notify()
            return self.store.get(job_id)
        with self._cond:
            if job_id in self._members and job_id not in self._cancelled:  # one job of a batch: its
                self._cancelled.add(job_id)  # rows run on with the others', its result is dropped
                self.store.finish(job_id, CANCELLED, error="cancelled while running")
            elif self._progress.job_id == job_id:
                self._abort = "cancel"
        return self.store.get(job_id)

    def interrupt(self) -> str | None:
        """A1111 interrupt: stop the running job and keep what it has reached."""
        with self._cond:
            if self._progress.job_id:
                self._abort = "interrupt"
                self._progress.interrupted = True
            return self._progress.job_id

    def skip(self) -> str | None:
        """A1111 skip: end the running batch where it is (its pictures are kept as reached) and
        go on with the job's next batch."""
        with self._cond:
            if self._progress.job_id:
                self._abort = "skip"
                self._progress.skipped = True
            return self._progress.job_id

    def progress(self, job_id: str | None = None) -> dict:
        """The running job's progress; with ``job_id``, that job's when it runs in a batch."""
        with self._cond:
            return self._members.get(job_id, self._progress).snapshot()

    def steps_since(self, job_id: str, start: int) -> list[tuple[int, int, int]]:
        """The (batch_index, step, total) of every step of the running job from index ``start``
        (SSE replays all of them, however fast the steps are)."""
        with self._cond:
            if job_id in self._members:
                return list(self._members[job_id].log[start:])
            if self._progress.job_id == job_id:
                return list(self._progress.log[start:])
            return list(self._recent_logs.get(job_id, [])[start:])  # finished meanwhile

    def take_images(self, job_id: str) -> list[bytes] | None:
        """The PNG bytes of a finished job (A1111 routes), once; None if not kept."""
        with self._cond:
            entry = self._handed.pop(job_id, None)
        return entry[1] if entry else None

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        self.ready.set()
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is None:
                with self._cond:
                    self._cond.wait(0.5)
                continue
            group = self._gather(job)
            if len(group) == 1:
                self._run_job(job)
            else:
                self._run_group(group)
            self._notify()

    def _gather(self, first: Job) -> list[Job]:
        """The jobs to run with ``first`` as one batch (``server.batching.BatchingWorker``)."""
        return [first]

    def _run_group(self, jobs: list[Job]) -> None:
        """Jobs gathered by ``_gather`` (``server.batching.BatchingWorker`` runs them as one batch)."""
        for job in jobs:
            self._run_job(job)

    def _run_job(self, job: Job) -> None:
        self._preview_mode = self.store.options().get("show_progress_type", PREVIEW_MODES[0])
        self._preview_request, self._preview_space = job.request, None
        with self._cond:
            self._abort = None
            self._progress = Progress(job_id=job.id, batch_count=job.request.batch_count, total=job.request.steps,
                                      started=time.monotonic())
        try:
            result = self._generate(job)
        except (DanqingError, FileExistsError) as exc:
            self.store.finish(job.id, FAILED, error=str(exc))
        except Exception as exc:  # noqa: BLE001 -- a failing job must never stop the worker
            self.store.finish(job.id, FAILED, error=f"internal error: {type(exc).__name__}: {exc}")
        else:
            if result is None:
                if self._abort == "shutdown":
                    pass  # left 'running': recover() re-queues it on the next start
                else:
                    self.store.finish(job.id, CANCELLED, error="cancelled while running")
            else:
                self.store.finish(job.id, DONE, result=result)
        finally:
            with self._cond:
                self._recent_logs[job.id] = self._progress.log
                while len(self._recent_logs) > 32:
                    del self._recent_logs[next(iter(self._recent_logs))]
                self._progress = Progress()
                self._abort = None
                now = time.monotonic()
                for k in [k for k, (t, _) in self._handed.items() if now - t > 600]:
                    del self._handed[k]  # nobody came for them

    def _preview(self, info):
        """The live preview of a step: TAESD's tiny decoder where the option asks for it and one is
        installed for the model's family (``models.preview_decoder``), else the linear approximation."""
        if self._preview_mode == "TAESD" and isinstance(self._preview_request, GenerationRequest):
            if self._preview_space is None:  # the job's model is loaded (cached) by now
                r = self._preview_request
                model = r.model or self.studio.settings.default_model
                # IF, unCLIP and Kandinsky (apps.families) have no TAESD latent space: linear preview
                self._preview_space = ("" if family_of(self.studio.registry, model) is not None
                                       else latent_space(self.studio.models.load(model, r.vae).components))
            space = self._preview_space
            if not space:
                return info.preview()
            if space not in self._tiny_decoders:
                path = find_tiny_decoder(self.studio.registry.models_dir, space)
                self._tiny_decoders[space] = load_tiny_decoder(path).to(self.studio.models.device) if path else None
            if self._tiny_decoders[space] is not None:
                return tiny_preview(info.latents, self._tiny_decoders[space])
        return info.preview()

    def _on_step(self, info):
        now = time.monotonic()
        with self._cond:
            p = self._progress
            p.step, p.total, p.batch_index, p.batch_count = info.step, info.total, info.batch_index, info.batch_count
            p.log.append((info.batch_index, info.step, info.total))
            abort = self._abort
            due = info.step == info.total or now - getattr(self, "_last_preview", 0.0) >= self.preview_interval
        if due:
            self._last_preview = now
            preview = png_bytes(self._preview(info))
            with self._cond:
                self._progress.preview_png = preview
                self._progress.preview_step = info.batch_index * info.total + info.step
        if abort == "skip":
            with self._cond:
                if self._abort == "skip":
                    self._abort = None  # one batch only
            return SKIP
        return STOP if abort else None

    def media_step(self, step: int, total: int, loss: float | None, preview=None) -> bool:
        """Progress of a media job that is not a sampling loop (3D): its step, loss and, when
        given, a preview picture. False when the job is to stop (cancel, interrupt, shutdown)."""
        with self._cond:
            p = self._progress
            p.step, p.total, p.loss = step, total, loss
            p.log.append((0, step, total))
            if preview is not None:
                p.preview_png, p.preview_step = png_bytes(preview), step
            return not self._abort

    def aborted(self) -> bool:
        """Whether the running job was cancelled or the server is stopping (its files go)."""
        return self._abort in ("cancel", "shutdown")

    def _generate(self, job: Job) -> dict | None:
        if isinstance(job.request, ThreeDRequest):
            return run_3d(self, job)
        if isinstance(job.request, TalkJob):
            return run_talk(self, job)
        if isinstance(job.request, ComicJob):
            return run_comic(self, job)
        if isinstance(job.request, PortraitJob):
            return run_portrait(self, job)
        if isinstance(job.request, VideoRequest):
            return self._generate_video(job)
        result = (run_request(self.studio, job.request, on_step=self._on_step)  # IF, unCLIP, Kandinsky 2.2
                  or self.studio.generate(job.request, on_step=self._on_step, save=False))
        if self._abort in ("cancel", "shutdown"):
            return None
        return self._deliver(job, result)

    def _generate_video(self, job: Job) -> dict | None:
        """A video job: its clips written as MP4 (with sidecars) under ``txt2video/DATE/``."""
        from danqing.video.studio import VideoStudio  # the video workflow, loaded by its first job

        request = job.request
        folder = self.outputs_dir / job.kind / date.today().isoformat()
        clips = request.batch_size * request.batch_count
        path = next_output_path(folder, request.seed, ext="mp4")
        videos = clip_paths(path, clips)
        self.store.set_planned(job.id, planned_files(path, clips, request.frames))
        result = VideoStudio(self.studio).generate(request, on_step=self._on_step, out=path)
        if self._abort in ("cancel", "shutdown"):
            for p in planned_files(path, clips, request.frames):
                p.unlink(missing_ok=True)
            return None
        return video_result(result, videos)

    def _deliver(self, job: Job, result) -> dict:
        """Save a finished job's pictures (or keep them for its waiting client); its result row."""
        paths: list[Path | None] = [None] * len(result.images)
        if job.save:
            kind = "img2img-images" if job.kind == "img2img" else "txt2img-images"
            folder = place.join(self.pictures, kind, date.today().isoformat())
            paths = planned_paths(folder, result.seeds)
            self.store.set_planned(job.id, paths)
            for img, path, text in zip(result.images, paths, result.infotexts):
                place.save_picture(img, path, text)
        else:
            pngs = [png_bytes(img, text) for img, text in zip(result.images, result.infotexts)]
            with self._cond:
                self._handed[job.id] = (time.monotonic(), pngs)
        return result_record(result, paths)


def video_result(result, videos: list[Path]) -> dict:
    """The result row of a video job: each clip's file, seed and JSON parameters."""
    return {
        "images": [],
        "videos": [{"path": str(p), "seed": s, "parameters": t} for p, s, t in zip(videos, result.seeds, result.parameters)],
        "interrupted": result.interrupted,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "request": result.request.model_dump(),
    }


def resolve_for_queue(request: GenerationRequest, default_model: str) -> GenerationRequest:
    """Draw random seeds and name the model at submission, so a job re-run after a restart
    makes the very same images (``Studio.generate``'s own resolution, done earlier)."""

    return resolve_request(request, default_model)
