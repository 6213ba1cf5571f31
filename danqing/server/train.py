"""Training jobs over HTTP: a LoRA trained on a folder of captioned images (``danqing train
lora``'s trainer, ``training.finetune.train_lora``) as a job with its own routes under
``/api/v1/train/jobs`` (docs/api.md, "Training jobs").

A dataset is named, never given as a path: it is a sub-folder of the data folder
``HOME/datasets/`` (images with ``.txt`` captions, kohya ``N_concept/`` sub-folders or
``metadata.jsonl``). The trained LoRA is written under ``HOME/runs/lora-NAME/`` and copied into
``models/lora/NAME.safetensors`` so that prompts can use ``<lora:NAME:1>`` at once.

Training jobs run one at a time on a thread of their own, in submission order; each reports its
step, total and the loss of every step, and the sample grids the trainer writes every
``sample_every`` steps. They are kept in memory (a restart forgets them; their files stay).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from danqing.errors import DanqingError, InvalidRequest
from danqing.files import atomic_write_bytes
from danqing.models.names import MAX_SHOWN, inside
from danqing.server.common import JobFailed
from danqing.server.state import ServerState

JOB_ID = PathParam(pattern=r"^[0-9a-f]{32}$", description="train job id (32 hex characters)")
DATASET = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class TrainJobSubmit(BaseModel):
    """A LoRA training job: the dataset folder's name under ``HOME/datasets/``, the LoRA's name
    and the few settings people change (the rest are ``LoraTrainConfig``'s defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field(..., max_length=200, description="a folder of HOME/datasets/ (its name, not a path)")
    name: str = Field(..., max_length=200, description="the LoRA's name: models/lora/NAME.safetensors")
    base: Optional[str] = Field(None, max_length=1024, description="checkpoint to train on; default: the current model")
    steps: int = Field(200, ge=1, le=20_000)
    rank: int = Field(8, ge=1, le=128)
    lr: float = Field(1e-3, gt=0, le=1.0)
    batch_size: int = Field(2, ge=1, le=64)
    resolution: int = Field(64, ge=16, le=1024, description="training side (buckets hold about side^2 pixels)")
    train_text_encoder: bool = False
    sample_every: int = Field(50, ge=1, le=20_000, description="a sample grid every N steps (and at the end)")
    sample_prompts: list[str] = Field(default_factory=list, max_length=8,
                                      description="prompts of the sample grids; default: the first captions")
    sample_steps: int = Field(10, ge=1, le=100)


@dataclass
class TrainJob:
    id: str
    kind: str
    config: dict
    lora_name: str
    status: str = "queued"
    step: int = 0
    total: int = 0
    losses: list = field(default_factory=list)  # (step, loss) of every step
    files: list = field(default_factory=list)
    error: Optional[str] = None
    created: float = field(default_factory=time.time)
    run_dir: Optional[Path] = None
    cancel: bool = False

    def samples(self) -> list[Path]:
        folder = self.run_dir / "samples" if self.run_dir else None
        return sorted(folder.glob("step-*.png")) if folder and folder.is_dir() else []

    def view(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "name": self.lora_name,
                "step": self.step, "total": self.total, "fraction": round(self.step / self.total, 4) if self.total else 0.0,
                "loss": self.losses[-1][1] if self.losses else None,
                "losses": [{"step": s, "loss": v} for s, v in self.losses],
                "samples": [{"step": int(p.stem.split("-")[1]), "url": f"/api/v1/train/jobs/{self.id}/samples/{i}"}
                            for i, p in enumerate(self.samples())],
                "files": self.files, "error": self.error, "config": self.config}


class Stopped(Exception):
    """Raised from the step callback to end a cancelled run."""


class TrainQueue:
    """The training jobs of one server: a list in memory and one thread that runs them in order."""

    def __init__(self, state: ServerState):
        self.state = state
        self.jobs: dict[str, TrainJob] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    # -- checks -------------------------------------------------------------------------------
    @property
    def datasets_dir(self) -> Path:
        return Path(self.state.settings.home) / "datasets"

    def datasets(self) -> list[str]:
        d = self.datasets_dir
        return sorted(p.name for p in d.iterdir() if p.is_dir() and inside(p, d)) if d.is_dir() else []

    def dataset_folder(self, name: object) -> Path:
        """A dataset's name -> its folder inside ``HOME/datasets/``; anything else is refused."""
        import re

        folder = self.datasets_dir / name if isinstance(name, str) and re.fullmatch(DATASET, name) else None
        if folder is None or not inside(folder, self.datasets_dir) or not folder.is_dir():
            shown = str(name)[:MAX_SHOWN]
            raise InvalidRequest("dataset", f"unknown dataset {shown!r}: give the name of a folder of captioned images "
                                            f"in {self.datasets_dir}/ (names only, never paths); there: "
                                            f"{', '.join(self.datasets()) or 'none'}")
        return folder

    def prepare(self, body: TrainJobSubmit) -> TrainJob:
        """A checked job: the trainer's config (every name resolved inside its folder)."""
        from danqing.models.names import check_new_name
        from danqing.training.config import LoraTrainConfig

        folder = self.dataset_folder(body.dataset)
        name = check_new_name(body.name, "name", "LoRA")
        base = self.state.model_name("checkpoint", body.base if body.base is not None
                                     else self.state.options()["sd_model_checkpoint"], "base")
        run_dir = Path(self.state.settings.home) / "runs" / f"lora-{name}"
        raw = {"model": {"base": base},
               "data": {"source": str(folder), "resolution": body.resolution},
               "network": {"rank": body.rank, "alpha": float(body.rank), "train_text_encoder": body.train_text_encoder},
               "train": {"steps": body.steps, "batch_size": body.batch_size, "lr": body.lr},
               "output": {"output_dir": str(run_dir), "name": name, "formats": ["kohya"], "log_every": 1,
                          "checkpoint_every": body.steps, "sample_every": body.sample_every,
                          "sample_prompts": list(body.sample_prompts), "sample_steps": body.sample_steps}}
        try:
            LoraTrainConfig.model_validate(raw)
        except ValueError as exc:
            raise InvalidRequest("request", str(exc).splitlines()[0]) from None
        from danqing.training.data import caption_folder

        caption_folder(folder)  # refuses an empty folder or images without captions, naming them
        if not body.sample_prompts:  # the first captions of the dataset
            raw["output"]["sample_prompts"] = [c for it in caption_folder(folder)[:2] for c in it.captions[:1]]
        return TrainJob(id=uuid.uuid4().hex, kind="lora", config=raw, lora_name=name, total=body.steps, run_dir=run_dir)

    # -- the queue ----------------------------------------------------------------------------
    def submit(self, job: TrainJob) -> TrainJob:
        with self._cond:
            self.jobs[job.id] = job
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="danqing-train", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> TrainJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobFailed(404, f"no train job {job_id}", job_id)
        return job

    def cancel(self, job_id: str) -> TrainJob:
        job = self.get(job_id)
        with self._cond:
            if job.status == "queued":
                job.status = "cancelled"
            elif job.status == "running":
                job.cancel = True
            else:
                raise JobFailed(409, f"train job {job_id} has already {'finished' if job.status == 'done' else job.status}",
                                job_id)
        return job

    def wait(self, job_id: str, timeout: float) -> TrainJob:
        job, deadline = self.get(job_id), time.monotonic() + timeout
        with self._cond:
            while job.status in ("queued", "running") and time.monotonic() < deadline:
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        return job

    def _next(self) -> TrainJob | None:
        with self._cond:
            return next((j for j in self.jobs.values() if j.status == "queued"), None)

    def _run(self) -> None:
        while (job := self._next()) is not None:
            with self._cond:
                job.status = "running"
            try:
                job.files = self._train(job)
                job.status = "done"
            except Stopped:
                job.status = "cancelled"
            except DanqingError as exc:
                job.status, job.error = "failed", str(exc)
            except Exception as exc:  # noqa: BLE001 -- a failing run must not stop the queue
                job.status, job.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
            with self._cond:
                self._cond.notify_all()

    def _train(self, job: TrainJob) -> list[str]:
        from danqing.training.config import LoraTrainConfig
        from danqing.training.finetune import train_lora  # the trainer (torch), loaded by the first job

        def on_step(step: int, total: int, loss: float) -> None:
            with self._cond:
                job.step, job.total = step, total
                job.losses.append((step, loss if math.isfinite(loss) else None))
                self._cond.notify_all()
            if job.cancel:
                raise Stopped()

        cfg = LoraTrainConfig.model_validate(job.config)
        summary = train_lora(cfg, resume=False, log=lambda line: None, settings=self.state.settings, on_step=on_step)
        kohya = Path(summary["files"][0])
        target = self.state.registry.folder("lora") / f"{job.lora_name}.safetensors"
        atomic_write_bytes(target, kohya.read_bytes())
        return [str(kohya), str(target)]


def train_router(state: ServerState) -> tuple[APIRouter, TrainQueue]:
    """``/api/v1/train/jobs``: submit, list, status, wait, cancel, sample pictures."""
    queue = TrainQueue(state)
    r = APIRouter(prefix="/api/v1/train", tags=["train"])

    @r.get("/datasets", summary="The dataset folders of HOME/datasets/")
    def datasets() -> dict:
        return {"folder": str(queue.datasets_dir), "datasets": queue.datasets()}

    @r.post("/jobs", status_code=202, summary="Submit a LoRA training job (a dataset folder's name)")
    def submit(body: TrainJobSubmit) -> dict:
        return queue.submit(queue.prepare(body)).view()

    @r.get("/jobs", summary="Every training job of this server run, newest first")
    def jobs() -> list[dict]:
        return [j.view() for j in sorted(queue.jobs.values(), key=lambda j: -j.created)]

    @r.get("/jobs/{job_id}", summary="A training job: status, step, the loss of every step, samples")
    def status(job_id: str = JOB_ID) -> dict:
        return queue.get(job_id).view()

    @r.get("/jobs/{job_id}/wait", summary="Wait (up to timeout seconds) until the training job has ended")
    def wait(job_id: str = JOB_ID, timeout: float = 30.0) -> dict:
        return queue.wait(job_id, max(0.0, min(timeout, 600.0))).view()

    @r.post("/jobs/{job_id}/cancel", summary="Cancel a queued training job or stop the running one")
    def cancel(job_id: str = JOB_ID) -> dict:
        return queue.cancel(job_id).view()

    @r.get("/jobs/{job_id}/samples/{index}", response_class=FileResponse, summary="A sample grid (PNG)")
    def sample(job_id: str = JOB_ID, index: int = PathParam(ge=0, le=100_000)):
        samples = queue.get(job_id).samples()
        if index >= len(samples):
            raise JobFailed(404, f"train job {job_id} has no sample {index}", job_id)
        return FileResponse(samples[index], media_type="image/png")

    return r, queue
