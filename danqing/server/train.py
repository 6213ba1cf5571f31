"""Training jobs over HTTP: a LoRA, a textual-inversion embedding or a DreamBooth checkpoint
trained on a folder of captioned images (``danqing train lora|textual-inversion|dreambooth``'s
trainers, ``training.finetune.trainer(kind)``) as a job with its own routes under
``/api/v1/train/jobs`` (docs/api.md, "Training jobs").

A dataset is named, never given as a path: it is a sub-folder of the data folder
``HOME/datasets/`` (images with ``.txt`` captions, kohya ``N_concept/`` sub-folders or
``metadata.jsonl``). The run is written under ``HOME/runs/KIND-NAME/`` and its result copied
into the models folder, usable at once (``KINDS``): ``models/lora/NAME.safetensors``
(``<lora:NAME:1>``), ``models/embeddings/NAME.safetensors`` (the word NAME in a prompt) or
``models/checkpoints/NAME.safetensors``.

A LoRA may instead be a portrait-studio person's (``person``: ``HOME/people/NAME/``, by name): their
training crops, with the recipe's settings where the request gives none (``apps.portrait_train``).

Each run writes four checkpoints and keeps the newest; ``POST .../jobs/ID/resume`` queues an
interrupted, cancelled or failed job again, and it continues from there.

Training jobs run one at a time on a thread of their own, in submission order; each reports its
step, total and the loss of every step, and the sample grids the trainer writes every
``sample_every`` steps. Each job is also a row of the server's job store (``train_jobs``: id,
kind, status, name, step/total, the loss curve thinned to ``CURVE_POINTS``, files), written when
its status changes and every ``SAVE_EVERY_S`` seconds while it runs, so the list survives a
restart; a job that was queued or running when its server stopped reads as ``interrupted``.
"""

from __future__ import annotations

import math
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, File, Form, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from danqing.apps.portrait_train import RECIPES
from danqing.errors import DanqingError, InvalidRequest
from danqing.files import atomic_save
from danqing.models.names import MAX_SHOWN, check_new_name, inside
from danqing.models.registry import KINDS as MODEL_FOLDERS
from danqing.server.common import JobFailed
from danqing.server.state import ServerState
from danqing.server.train_datasets import new_dataset
from danqing.training.config import FINETUNE_CONFIGS

JOB_ID = PathParam(pattern=r"^[0-9a-f]{32}$", description="train job id (32 hex characters)")
DATASET = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Kind = Literal["lora", "textual-inversion", "dreambooth"]


@dataclass(frozen=True)
class TrainKind:
    """What differs between the kinds of training job, as data (``KINDS``).

    Attributes:
        models: the models-folder kind its result is installed in (``registry.KINDS``).
        what: what the result is called in messages.
        lr: the learning rate when the request gives none.
        fields: the request fields only this kind reads (given for another kind: 422).
        result: which of the trainer's files is installed (its index in ``summary["files"]``).
    """

    models: str
    what: str
    lr: float
    fields: tuple[str, ...]
    result: int


KINDS = {
    "lora": TrainKind("lora", "LoRA", 1e-3, ("rank", "train_text_encoder"), 0),
    "textual-inversion": TrainKind("embedding", "embedding", 5e-3, ("init_word", "vectors"), 0),
    "dreambooth": TrainKind("checkpoint", "checkpoint", 2e-4, ("train_text_encoder", "instance_prompt", "class_prompt",
                                                               "prior_preservation", "class_images"), 1),
}
KIND_FIELDS = {f for k in KINDS.values() for f in k.fields}
ACTIVE = ("queued", "running")
RESUMABLE = ("interrupted", "cancelled", "failed")
CURVE_POINTS = 200  # loss points kept in the job store per job
SAVE_EVERY_S = 5.0  # a running job's row is updated at most this often (and at each status change)


class TrainJobSubmit(BaseModel):
    """A training job: its kind, the dataset folder's name under ``HOME/datasets/``, the result's
    name and the few settings people change (the rest are the kind's config defaults,
    ``training.config.FINETUNE_CONFIGS``). A kind's own fields (``KINDS``) are refused for
    another kind."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Kind = Field("lora", description="lora, textual-inversion or dreambooth")
    dataset: Optional[str] = Field(None, max_length=200, description="a folder of HOME/datasets/ (its name, not a "
                                   "path); or give person")
    person: Optional[str] = Field(None, max_length=200, description="lora: a person of the portrait studio "
                                  "(HOME/people/NAME/, by name): their LoRA on their training crops, with recipe")
    recipe: Optional[Literal[tuple(RECIPES)]] = Field(None, description="with person: the recipe whose "
                                                               "steps, lr, batch, size, rank, text encoder and "
                                                               "regularisation pictures apply where the request gives "
                                                               "none (apps.portrait_train.RECIPES); default course")
    name: str = Field(..., max_length=200, description="the result's name: models/lora/NAME.safetensors, "
                      "models/embeddings/NAME.safetensors (the embedding's word) or models/checkpoints/NAME.safetensors")
    base: Optional[str] = Field(None, max_length=1024, description="checkpoint to train on; default: the current model")
    steps: int = Field(200, ge=1, le=20_000)
    lr: Optional[float] = Field(None, gt=0, le=1.0, description="default: 1e-3 (LoRA), 5e-3 (textual inversion), "
                                "2e-4 (DreamBooth)")
    batch_size: int = Field(2, ge=1, le=64)
    resolution: int = Field(64, ge=16, le=1024, description="training side (buckets hold about side^2 pixels)")
    sample_every: int = Field(50, ge=1, le=20_000, description="a sample grid every N steps (and at the end)")
    sample_prompts: list[str] = Field(default_factory=list, max_length=8,
                                      description="prompts of the sample grids; default: the first captions")
    sample_steps: int = Field(10, ge=1, le=100, description="steps of each sample (and of DreamBooth's class images)")
    # lora
    rank: int = Field(8, ge=1, le=128, description="lora: the adapters' rank")
    train_text_encoder: bool = Field(False, description="lora, dreambooth: train the text encoder too")
    # textual-inversion (its word is the name: every caption must contain it)
    init_word: str = Field("shape", min_length=1, max_length=100, description="textual-inversion: the word its "
                           "vectors start from")
    vectors: int = Field(2, ge=1, le=75, description="textual-inversion: vectors per word")
    # dreambooth
    instance_prompt: Optional[str] = Field(None, max_length=500, description="dreambooth: one caption for every "
                                           "image (default: their own captions)")
    class_prompt: Optional[str] = Field(None, max_length=500, description="dreambooth: the prompt of the class "
                                        "images (default: ordinary synthetic scenes)")
    prior_preservation: bool = Field(True, description="dreambooth: train on class images the base model draws too")
    class_images: int = Field(8, ge=1, le=1000, description="dreambooth: how many class images")

    def check_kind_fields(self) -> None:
        """A field of another kind, given, is an error naming it and the kinds that read it."""
        for f in sorted((self.model_fields_set & KIND_FIELDS) - set(KINDS[self.kind].fields)):
            kinds = [k for k, v in KINDS.items() if f in v.fields]
            raise InvalidRequest(f, f"only a {' or '.join(kinds)} job reads {f}; this job's kind is {self.kind!r}")


@dataclass
class TrainJob:
    id: str
    kind: str
    config: dict
    name: str
    status: str = "queued"
    step: int = 0
    total: int = 0
    losses: list = field(default_factory=list)  # (step, loss) of every step
    files: list = field(default_factory=list)
    error: Optional[str] = None
    created: float = field(default_factory=time.time)
    run_dir: Optional[Path] = None
    cancel: bool = False
    resume: bool = False  # continue from the run folder's newest checkpoint (``TrainQueue.resume``)

    def samples(self) -> list[Path]:
        folder = self.run_dir / "samples" if self.run_dir else None
        return sorted(folder.glob("step-*.png")) if folder and folder.is_dir() else []

    def record(self) -> dict:
        """The job's row of the job store (``JobStore.put_train_job``)."""
        stride = max(1, math.ceil(len(self.losses) / CURVE_POINTS))
        curve = self.losses[::stride] + ([self.losses[-1]] if self.losses and (len(self.losses) - 1) % stride else [])
        finite = [v for _, v in self.losses if v is not None]
        summary = {"count": len(self.losses), "first": finite[0], "last": finite[-1], "min": min(finite)} if finite else {}
        return {"id": self.id, "kind": self.kind, "name": self.name, "status": self.status, "step": self.step,
                "total": self.total, "created": self.created, "error": self.error,
                "data": {"config": self.config, "files": self.files, "run_dir": str(self.run_dir) if self.run_dir else None,
                         "losses": [list(p) for p in curve], "loss_summary": summary}}

    @classmethod
    def from_record(cls, row: dict) -> "TrainJob":
        data = row["data"]
        return cls(id=row["id"], kind=row["kind"], config=data["config"], name=row["name"], status=row["status"],
                   step=row["step"], total=row["total"], losses=[tuple(p) for p in data["losses"]],
                   files=data["files"], error=row["error"], created=row["created"],
                   run_dir=Path(data["run_dir"]) if data["run_dir"] else None)

    def view(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "name": self.name,
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
        self.store = state.store
        self.jobs: dict[str, TrainJob] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._saved: dict[str, float] = {}  # job id -> when its row was last written (monotonic)
        self._load()

    # -- the job store ------------------------------------------------------------------------
    def _load(self) -> None:
        """The jobs of the store, oldest first; this server's jobs that had not ended read as
        interrupted (a SQLite store has one server; PostgreSQL ones record their worker)."""
        single = self.store.dialect == "sqlite"
        for row in reversed(self.store.train_jobs()):
            job = TrainJob.from_record(row)
            if job.status in ACTIVE and (single or row["worker"] in (None, self.store.worker)):
                job.status = "interrupted"
                job.error = job.error or f"the server stopped at step {job.step} of {job.total}"
                self._save(job)
            self.jobs[job.id] = job

    def _save(self, job: TrainJob, *, every: float = 0.0) -> None:
        """Write the job's row now (``every`` > 0: only if the last write is that old)."""
        now = time.monotonic()
        if every and now - self._saved.get(job.id, -math.inf) < every:
            return
        self._saved[job.id] = now
        self.store.put_train_job(job.record())

    # -- checks -------------------------------------------------------------------------------
    @property
    def datasets_dir(self) -> Path:
        return Path(self.state.settings.home) / "datasets"

    def datasets(self) -> list[str]:
        d = self.datasets_dir
        return sorted(p.name for p in d.iterdir() if p.is_dir() and re.fullmatch(DATASET, p.name) and inside(p, d)) \
            if d.is_dir() else []

    def dataset_folder(self, name: object) -> Path:
        """A dataset's name -> its folder inside ``HOME/datasets/``; anything else is refused."""
        folder = self.datasets_dir / name if isinstance(name, str) and re.fullmatch(DATASET, name) else None
        if folder is None or not inside(folder, self.datasets_dir) or not folder.is_dir():
            shown = str(name)[:MAX_SHOWN]
            raise InvalidRequest("dataset", f"unknown dataset {shown!r}: give the name of a folder of captioned images "
                                            f"in {self.datasets_dir}/ (names only, never paths); there: "
                                            f"{', '.join(self.datasets()) or 'none'}")
        return folder

    def target(self, kind: str, name: str) -> Path:
        """Where a job's result is installed: ``models/<folder>/NAME.safetensors``."""
        return self.state.registry.folder(KINDS[kind].models) / f"{name}.safetensors"

    def check_name(self, kind: str, name: object) -> str:
        """A new result's name: usable as a file name, not installed, not the name of a pending job."""
        spec = KINDS[kind]
        name = check_new_name(name, "name", spec.what)
        taken = {e.name for e in self.state.registry.scan(spec.models)}
        pending = {j.name for j in self.jobs.values() if j.status in ACTIVE
                   and KINDS[j.kind].models == spec.models}
        if name in taken or name in pending or self.target(kind, name).exists():
            where = "is being trained" if name in pending else f"already exists in models/{MODEL_FOLDERS[spec.models]}/"
            raise InvalidRequest("name", f"{spec.what} {name!r} {where}; pick a new name")
        return name

    def prepare(self, body: TrainJobSubmit) -> TrainJob:
        """A checked job: the trainer's config (every name resolved inside its folder)."""
        from danqing.training.data import caption_folder  # imports torch: loaded by the first job

        body.check_kind_fields()
        if body.person is not None:
            return self.prepare_person(body)
        if body.recipe is not None:
            raise InvalidRequest("recipe", "a recipe is for a person's LoRA: give person too")
        if body.dataset is None:
            raise InvalidRequest("dataset", f"give a dataset (a folder of {self.datasets_dir}/, by name) or, for a "
                                            f"LoRA, a person of the portrait studio")
        folder = self.dataset_folder(body.dataset)
        name = self.check_name(body.kind, body.name)
        base = self.base(body)
        run_dir = Path(self.state.settings.home) / "runs" / f"{body.kind}-{name}"
        items = caption_folder(folder)  # refuses an empty folder or images without captions, naming them
        prompts = list(body.sample_prompts) or ([body.instance_prompt] if body.instance_prompt else
                                                [c for it in items[:2] for c in it.captions[:1]])
        raw = {"model": {"base": base},
               "data": {"source": str(folder), "resolution": body.resolution},
               "train": {"steps": body.steps, "batch_size": body.batch_size, "lr": body.lr or KINDS[body.kind].lr},
               "output": {"output_dir": str(run_dir), "name": name, "log_every": 1,
                          "checkpoint_every": -(-body.steps // 4), "sample_every": body.sample_every,
                          "sample_prompts": prompts, "sample_steps": body.sample_steps}}
        if body.kind == "lora":
            raw["network"] = {"rank": body.rank, "alpha": float(body.rank), "train_text_encoder": body.train_text_encoder}
            raw["output"]["formats"] = ["kohya"]
        elif body.kind == "textual-inversion":
            raw["embedding"] = {"name": name, "init_word": body.init_word, "n_vectors": body.vectors}
            missing = [it.name for it in items if not any(name in c for c in it.captions)]
            if missing:
                raise InvalidRequest("name", f"textual inversion learns the word {name!r}: every caption must contain "
                                             f"it; {len(missing)} of {len(items)} do not ({', '.join(missing[:5])})")
        else:
            raw["dreambooth"] = {"train_text_encoder": body.train_text_encoder, "instance_prompt": body.instance_prompt}
            raw["prior"] = {"enabled": body.prior_preservation, "n_class_images": body.class_images,
                            "sample_steps": body.sample_steps,
                            "class_source": f"prompt:{body.class_prompt}" if body.class_prompt else "synthetic"}
        try:
            FINETUNE_CONFIGS[body.kind].model_validate(raw)
        except ValueError as exc:
            raise InvalidRequest("request", str(exc).splitlines()[0]) from None
        return TrainJob(id=uuid.uuid4().hex, kind=body.kind, config=raw, name=name, total=body.steps, run_dir=run_dir)

    def base(self, body: TrainJobSubmit) -> str:
        return self.state.model_name("checkpoint", body.base if body.base is not None
                                     else self.state.options()["sd_model_checkpoint"], "base")

    def prepare_person(self, body: TrainJobSubmit) -> TrainJob:
        """A person LoRA of the portrait studio: the person's crops, the recipe's settings where
        the request gives none (``apps.portrait_train``); four resumable checkpoints."""
        from danqing.apps.portrait_people import load_person
        from danqing.apps.portrait_train import OVERRIDES, person_lora_config

        if body.kind != "lora":
            raise InvalidRequest("person", f"a person trains a LoRA; this job's kind is {body.kind!r}")
        if body.dataset is not None:
            raise InvalidRequest("dataset", "give a dataset or a person, not both (a person's dataset is their crops)")
        person = load_person(self.state.settings.home, body.person)
        name = self.check_name(body.kind, body.name)
        run_dir = Path(self.state.settings.home) / "runs" / f"{body.kind}-{name}"
        given = body.model_fields_set
        raw = person_lora_config(person, name=name, base=self.base(body), output_dir=run_dir,
                                 recipe=body.recipe or "course",
                                 overrides={f: getattr(body, f) for f in OVERRIDES if f in given},
                                 sample_every=body.sample_every if "sample_every" in given else None,
                                 sample_steps=body.sample_steps)
        if body.sample_prompts:
            raw["output"]["sample_prompts"] = list(body.sample_prompts)
        try:
            FINETUNE_CONFIGS["lora"].model_validate(raw)
        except ValueError as exc:
            raise InvalidRequest("request", str(exc).splitlines()[0]) from None
        return TrainJob(id=uuid.uuid4().hex, kind="lora", config=raw, name=name, total=raw["train"]["steps"],
                        run_dir=run_dir)

    # -- the queue ----------------------------------------------------------------------------
    def submit(self, job: TrainJob) -> TrainJob:
        self._save(job)
        with self._cond:
            self.jobs[job.id] = job
            self._wake()
        return job

    def _wake(self) -> None:
        """Start the queue's thread if it is not running (the condition's lock held)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="danqing-train", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def resume(self, job_id: str) -> TrainJob:
        """Queue an interrupted, cancelled or failed job again: its run continues from the newest
        checkpoint in its run folder (the steps before it are not trained again)."""
        job = self.get(job_id)
        with self._cond:
            if job.status not in RESUMABLE:
                raise JobFailed(409, f"train job {job_id} is {job.status}; only a job that is "
                                     f"{', '.join(RESUMABLE)} can be resumed", job_id)
            spec = KINDS[job.kind]
            if any(j.name == job.name and j.status in ACTIVE and KINDS[j.kind].models == spec.models
                   for j in self.jobs.values()) or self.target(job.kind, job.name).exists():
                raise JobFailed(409, f"{spec.what} {job.name!r} has been made or is being trained since; "
                                     f"submit a job with a new name", job_id)
            job.status, job.error, job.cancel, job.resume = "queued", None, False, True
            self._save(job)
            self._wake()
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
                self._save(job)
            elif job.status == "running":
                job.cancel = True
            else:
                raise JobFailed(409, f"train job {job_id} has already {'finished' if job.status == 'done' else job.status}",
                                job_id)
        return job

    def wait(self, job_id: str, timeout: float) -> TrainJob:
        job, deadline = self.get(job_id), time.monotonic() + timeout
        with self._cond:
            while job.status in ACTIVE and time.monotonic() < deadline:
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        return job

    def _next(self) -> TrainJob | None:
        with self._cond:
            return next((j for j in self.jobs.values() if j.status == "queued"), None)

    def _run(self) -> None:
        while (job := self._next()) is not None:
            with self._cond:
                job.status = "running"
            self._save(job)
            try:
                job.files = self._train(job)
                job.status = "done"
            except Stopped:
                job.status = "cancelled"
            except DanqingError as exc:
                job.status, job.error = "failed", str(exc)
            except Exception as exc:  # noqa: BLE001 -- a failing run must not stop the queue
                job.status, job.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
            self._save(job)
            with self._cond:
                self._cond.notify_all()

    def _train(self, job: TrainJob) -> list[str]:
        from danqing.training.finetune import trainer  # the trainers (torch), loaded by the first job
        from danqing.training.runs import prune_checkpoints

        def on_step(step: int, total: int, loss: float) -> None:
            with self._cond:
                job.step, job.total = step, total
                while job.losses and job.losses[-1][0] >= step:  # a resumed run trains these steps again
                    job.losses.pop()
                job.losses.append((step, loss if math.isfinite(loss) else None))
                self._cond.notify_all()
            self._save(job, every=SAVE_EVERY_S)
            prune_checkpoints(job.run_dir)  # the newest is all a resume needs
            if job.cancel:
                raise Stopped()

        cfg = FINETUNE_CONFIGS[job.kind].model_validate(job.config)
        summary = trainer(job.kind)(cfg, resume=job.resume, log=lambda line: None, settings=self.state.settings,
                                    on_step=on_step)
        prune_checkpoints(job.run_dir)
        made = Path(summary["files"][KINDS[job.kind].result])
        target = atomic_save(self.target(job.kind, job.name), lambda p: shutil.copyfile(made, p))
        return [str(made), str(target)]


def train_router(state: ServerState) -> tuple[APIRouter, TrainQueue]:
    """``/api/v1/train/jobs``: submit, list, status, wait, cancel, sample pictures."""
    queue = TrainQueue(state)
    r = APIRouter(prefix="/api/v1/train", tags=["train"])

    @r.get("/datasets", summary="The dataset folders of HOME/datasets/")
    def datasets() -> dict:
        return {"folder": str(queue.datasets_dir), "datasets": queue.datasets()}

    @r.post("/datasets", status_code=201, summary="Upload a dataset: a .zip of pictures with .txt captions, "
                                                  "unpacked into HOME/datasets/NAME")
    def upload(name: str = Form(..., max_length=200, description="the new dataset folder's name"),
               file: UploadFile = File(..., description="a .zip of pictures (.png, .jpg, .webp, .bmp) with .txt "
                                                        "captions (or a metadata.jsonl)")) -> dict:
        return new_dataset(queue.datasets_dir, name, file.file)

    @r.post("/jobs", status_code=202, summary="Submit a training job: LoRA, textual inversion or DreamBooth on a "
                                              "dataset folder (its name), or a portrait-studio person's LoRA")
    def submit(body: TrainJobSubmit) -> dict:
        return queue.submit(queue.prepare(body)).view()

    @r.get("/jobs", summary="Every training job of the job store (this run's and earlier ones), newest first")
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

    @r.post("/jobs/{job_id}/resume", summary="Queue an interrupted, cancelled or failed training job again; it "
                                             "continues from its newest checkpoint")
    def resume(job_id: str = JOB_ID) -> dict:
        return queue.resume(job_id).view()

    @r.get("/jobs/{job_id}/samples/{index}", response_class=FileResponse, summary="A sample grid (PNG)")
    def sample(job_id: str = JOB_ID, index: int = PathParam(ge=0, le=100_000)):
        samples = queue.get(job_id).samples()
        if index >= len(samples):
            raise JobFailed(404, f"train job {job_id} has no sample {index}", job_id)
        return FileResponse(samples[index], media_type="image/png")

    return r, queue
