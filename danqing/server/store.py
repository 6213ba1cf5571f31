"""The job store: jobs, history and options in SQLite (one machine, the default) or PostgreSQL
(several servers sharing one queue), behind one class.

Both go through SQLAlchemy (its connection pool, URL parsing and drivers: the standard library's
sqlite3, psycopg 3 for PostgreSQL) with plain SQL that both dialects read; where they differ
(the schema's column types, taking the next job) the difference is a row in ``DIALECT``.

The schema is versioned: ``MIGRATIONS`` lists each version's statements, ``schema_version``
records the last one applied, and opening a store applies the missing ones in order (a file
written before versioning is version 1: its statements are all ``IF NOT EXISTS``).

Several servers on one PostgreSQL database: a job is claimed by one atomic statement
(``FOR UPDATE SKIP LOCKED``), so no two workers run the same job; each claimed job records the
claiming worker's name, and ``recover`` after a restart touches only its own worker's jobs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from danqing.errors import InvalidRequest
from danqing.files import is_url
from danqing.outputs import place
from danqing.request import GenerationRequest
from danqing.request_video import VideoRequest
from danqing.server.comic_request import ComicJob
from danqing.server.portrait_request import PortraitJob
from danqing.server.talk_request import TalkJob
from danqing.threed.run import ThreeDRequest

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL = (DONE, FAILED, CANCELLED)
VIDEO_KINDS = ("txt2video", "video2video", "img2video")  # their rows hold a VideoRequest
REQUEST_TYPES = {**dict.fromkeys(VIDEO_KINDS, VideoRequest), "3d": ThreeDRequest, "talk": TalkJob,
                 "comic": ComicJob, "portrait": PortraitJob}  # kind -> request type (else GenerationRequest)
STATUSES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)

# What differs between the dialects, as data. {seq}: the queue-order column's definition;
# {float}: a timestamp column (PostgreSQL's REAL is 4 bytes); {lock}: how the next job is taken.
DIALECT = {
    "sqlite": {"seq": "INTEGER PRIMARY KEY AUTOINCREMENT", "float": "REAL", "lock": ""},
    "postgresql": {"seq": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "float": "DOUBLE PRECISION",
                   "lock": "FOR UPDATE SKIP LOCKED"},
}

MIGRATIONS: list[list[str]] = [
    [  # 1: jobs and options (the layout of every database written before versioning)
        """CREATE TABLE IF NOT EXISTS jobs (
            seq {seq},
            id TEXT UNIQUE NOT NULL,
            status TEXT NOT NULL,
            kind TEXT NOT NULL,
            source TEXT NOT NULL,
            save INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            request TEXT NOT NULL,
            created {float} NOT NULL,
            started {float},
            finished {float},
            error TEXT,
            planned TEXT,
            result TEXT)""",
        "CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq)",
        "CREATE TABLE IF NOT EXISTS options (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
    [  # 2: the worker that claimed a job (several servers on one database)
        "ALTER TABLE jobs ADD COLUMN worker TEXT",
    ],
    [  # 3: training jobs (server/train.py); data: JSON of the config, loss summary, files, run folder
        """CREATE TABLE IF NOT EXISTS train_jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            status TEXT NOT NULL,
            step INTEGER NOT NULL,
            total INTEGER NOT NULL,
            created {float} NOT NULL,
            error TEXT,
            worker TEXT,
            data TEXT NOT NULL)""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


def new_job_id() -> str:
    return uuid.uuid4().hex


def default_worker_name() -> str:
    """This server's name in a shared store: ``DANQING_WORKER``, else the host name (stable across
    restarts, so a restarted server recovers its own jobs; two servers on one host sharing a
    database each need their own ``DANQING_WORKER``)."""
    import os

    return os.environ.get("DANQING_WORKER") or socket.gethostname()


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds") if t else None


@dataclass
class Job:
    """One row of the jobs table.

    Attributes:
        seq: queue order (submission order); id: 32 hex chars.
        status: queued, running, done, failed or cancelled.
        kind: "txt2img", "img2img", "txt2video", "video2video" or "img2video"; source: "api", "a1111" or "ui".
        save: write the images to the outputs folder (else they are handed to the waiting client).
        request: the request as it will run (random seeds already drawn, model named).
        result: {"images": [{"path", "seed", "subseed", "infotext"}], "interrupted", "warnings", ...}.
        worker: the worker that claimed it (None while queued).
    """

    seq: int
    id: str
    status: str
    kind: str
    source: str
    save: bool
    prompt: str
    request: GenerationRequest
    created: float
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    planned: list[str] = field(default_factory=list)
    result: dict | None = None
    worker: str | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id, "seq": self.seq, "status": self.status, "kind": self.kind, "source": self.source,
            "save": self.save, "prompt": self.prompt, "created": _iso(self.created), "started": _iso(self.started),
            "finished": _iso(self.finished), "error": self.error, "request": self.request.model_dump(),
            "result": self.result,
        }


def _row_to_job(row) -> Job:
    m = row._mapping
    return Job(
        seq=m["seq"], id=m["id"], status=m["status"], kind=m["kind"], source=m["source"],
        save=bool(m["save"]), prompt=m["prompt"],
        request=REQUEST_TYPES.get(m["kind"], GenerationRequest).model_validate_json(m["request"]),
        created=m["created"], started=m["started"], finished=m["finished"], error=m["error"],
        planned=json.loads(m["planned"]) if m["planned"] else [],
        result=json.loads(m["result"]) if m["result"] else None, worker=m["worker"],
    )


def database_url(where: str | Path) -> str:
    """A SQLAlchemy URL for a SQLite file path or a ``postgresql://`` URL (driver: psycopg 3)."""
    text = str(where)
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if text.startswith("postgresql+psycopg://"):
        return text
    if "://" in text:
        raise InvalidRequest("db", f"unsupported database {text.split('://')[0]!r}: give a SQLite file path "
                                   "or a postgresql://user:password@host/dbname URL")
    return f"sqlite:///{Path(text).expanduser()}"


def _engine(url: str):
    import sqlalchemy as sa  # lazy: only the server and the store's tests need it

    if url.startswith("sqlite:"):
        Path(url.split("sqlite:///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        return engine
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise InvalidRequest("db", "a PostgreSQL job store needs the psycopg package "
                                   "(pip install 'psycopg[binary]')") from None
    return sa.create_engine(url, pool_pre_ping=True)


class JobStore:
    """Jobs, history and options in SQLite or PostgreSQL. Thread-safe: each call is one
    transaction on a pooled connection.

    Args:
        where: a SQLite file path, or a ``postgresql://user:password@host/dbname`` URL.
        worker: this server's name in the store (default ``default_worker_name()``).
    """

    def __init__(self, where: str | Path, *, worker: str | None = None):
        import sqlalchemy as sa

        self._sa = sa
        self.url = database_url(where)
        self.path = Path(self.url.split("sqlite:///", 1)[1]) if self.url.startswith("sqlite:") else None
        self.worker = worker or default_worker_name()
        self._engine = _engine(self.url)
        self.dialect = self._engine.dialect.name
        self._lock = threading.Lock() if self.dialect == "sqlite" else None
        self.migrate()

    # -- plumbing -----------------------------------------------------------------------------
    def _run(self, sql: str, params: dict | None = None, *, fetch: str | None = None):
        """One statement in its own transaction; ``fetch`` = "one", "all" or None (row count)."""
        def go():
            with self._engine.begin() as conn:
                res = conn.execute(self._sa.text(sql), params or {})
                return res.fetchone() if fetch == "one" else res.fetchall() if fetch == "all" else res.rowcount
        if self._lock is None:
            return go()
        with self._lock:  # SQLite takes one writer at a time anyway; the lock keeps waits in-process
            return go()

    def _one(self, sql: str, params: dict) -> Job | None:
        row = self._run(sql, params, fetch="one")
        return _row_to_job(row) if row else None

    def migrate(self) -> int:
        """Apply the missing migrations in order; the schema version now."""
        words = DIALECT[self.dialect]
        with self._engine.begin() as conn:
            if self.dialect == "postgresql":  # one server migrates at a time
                conn.execute(self._sa.text("SELECT pg_advisory_xact_lock(784219)"))
            conn.execute(self._sa.text("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"))
            row = conn.execute(self._sa.text("SELECT MAX(version) FROM schema_version")).fetchone()
            have = row[0] or 0  # 0: new, or written before versioning (version 1's statements are idempotent)
            for version in range(have + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version - 1]:
                    if not self._applied(conn, statement):
                        conn.execute(self._sa.text(statement.format(**words)))
                conn.execute(self._sa.text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": version})
        return SCHEMA_VERSION

    def _applied(self, conn, statement: str) -> bool:
        """An ADD COLUMN already there (a database another version of danqing migrated)."""
        words = statement.split()
        if words[:2] != ["ALTER", "TABLE"] or "ADD" not in words:
            return False
        table, column = words[2], words[words.index("COLUMN") + 1]
        return column in {c["name"] for c in self._sa.inspect(conn).get_columns(table)}

    def where(self) -> str:
        """The database for people to read: the SQLite file, or the PostgreSQL URL without its password."""
        return str(self.path) if self.path else self._engine.url.render_as_string(hide_password=True)

    def schema_version(self) -> int:
        return int(self._run("SELECT MAX(version) FROM schema_version", fetch="one")[0])

    def close(self) -> None:
        self._engine.dispose()

    # -- jobs ---------------------------------------------------------------------------------
    def add(self, request: GenerationRequest, *, source: str, save: bool) -> Job:
        job_id = new_job_id()
        kind = "img2img" if request.init_image is not None else "txt2img"
        if isinstance(request, ThreeDRequest):
            kind = "3d"
        elif isinstance(request, TalkJob):
            kind = "talk"
        elif isinstance(request, ComicJob):
            kind = "comic"
        elif isinstance(request, PortraitJob):
            kind = "portrait"
        elif isinstance(request, VideoRequest):
            kind = ("video2video" if request.init_video is not None else
                    "img2video" if request.init_image is not None else "txt2video")
        # the row as inserted, in the same statement: a worker may claim the job before a second read
        return self._one("INSERT INTO jobs (id, status, kind, source, save, prompt, request, created) "
                         "VALUES (:id, :status, :kind, :source, :save, :prompt, :request, :created) RETURNING *",
                         {"id": job_id, "status": QUEUED, "kind": kind, "source": source, "save": int(save),
                          "prompt": request.prompt, "request": request.to_json(), "created": time.time()})

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = :id", {"id": job_id})

    def claim_next(self) -> Job | None:
        """The oldest queued job, now marked running by this worker (None when the queue is
        empty). One statement: with several servers on PostgreSQL each job goes to one of them."""
        lock = DIALECT[self.dialect]["lock"]
        row = self._run(
            "UPDATE jobs SET status = :running, started = :t, worker = :worker WHERE id = "
            f"(SELECT id FROM jobs WHERE status = :queued ORDER BY seq LIMIT 1 {lock}) AND status = :queued "
            "RETURNING id", {"running": RUNNING, "queued": QUEUED, "t": time.time(), "worker": self.worker},
            fetch="one")
        return self.get(row[0]) if row else None

    def claim_matching(self, accept, rows: int, *, scan: int = 64) -> list[Job]:
        """Queued jobs (oldest first, among the first ``scan``) whose request ``accept`` takes
        and whose images fit in ``rows``, now marked running by this worker (batched serving).
        Each is taken by one conditional statement, so a job another worker took is skipped."""
        taken = []
        queued = self._run("SELECT * FROM jobs WHERE status = :q ORDER BY seq LIMIT :n", {"q": QUEUED, "n": scan},
                           fetch="all")
        for job in map(_row_to_job, queued):
            if job.request.batch_size <= rows and accept(job.request) and self._run(
                    "UPDATE jobs SET status = :r, started = :t, worker = :w WHERE id = :id AND status = :q",
                    {"r": RUNNING, "t": time.time(), "w": self.worker, "id": job.id, "q": QUEUED}) == 1:
                taken.append(job.id)
                rows -= job.request.batch_size
        return [self.get(i) for i in taken]

    def set_planned(self, job_id: str, paths: list[Path]) -> None:
        self._run("UPDATE jobs SET planned = :p WHERE id = :id", {"p": json.dumps([str(p) for p in paths]), "id": job_id})

    def finish(self, job_id: str, status: str, *, result: dict | None = None, error: str | None = None) -> None:
        self._run("UPDATE jobs SET status = :s, finished = :t, result = :r, error = :e, planned = NULL WHERE id = :id",
                  {"s": status, "t": time.time(), "r": json.dumps(result) if result is not None else None,
                   "e": error, "id": job_id})

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False when it is no longer queued."""
        return self._run("UPDATE jobs SET status = :c, finished = :t WHERE id = :id AND status = :q",
                         {"c": CANCELLED, "t": time.time(), "id": job_id, "q": QUEUED}) == 1

    def position(self, job: Job) -> int:
        """Jobs ahead of a queued job (0 = next)."""
        row = self._run("SELECT COUNT(*) FROM jobs WHERE status IN (:q, :r) AND seq < :seq",
                        {"q": QUEUED, "r": RUNNING, "seq": job.seq}, fetch="one")
        return int(row[0])

    def count(self, *statuses: str) -> int:
        params = {f"s{i}": s for i, s in enumerate(statuses)}
        marks = ",".join(f":{k}" for k in params)
        return int(self._run(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", params, fetch="one")[0])

    def history(self, *, query: str = "", status: str | None = None, limit: int = 50, offset: int = 0) -> list[Job]:
        """Newest first; ``query`` matches the prompt (case-insensitive substring)."""
        sql, params = "SELECT * FROM jobs WHERE 1=1", {"limit": limit, "offset": offset}
        if query:
            escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            sql += " AND LOWER(prompt) LIKE LOWER(:query) ESCAPE '\\'"
            params["query"] = f"%{escaped}%"
        if status:
            sql += " AND status = :status"
            params["status"] = status
        sql += " ORDER BY seq DESC LIMIT :limit OFFSET :offset"
        return [_row_to_job(r) for r in self._run(sql, params, fetch="all")]

    def recover(self) -> dict[str, list[str]]:
        """After a restart: clean up and re-queue this worker's interrupted jobs (see the jobs
        module's docstring); other workers' running jobs are theirs.

        Returns:
            {"requeued": [...ids], "failed": [...ids], "removed": [...paths]}.
        """
        out: dict[str, list[str]] = {"requeued": [], "failed": [], "removed": []}
        rows = self._run("SELECT * FROM jobs WHERE status = :q OR (status = :r AND (worker = :w OR worker IS NULL "
                         "OR :single = 1)) ORDER BY seq",
                         {"q": QUEUED, "r": RUNNING, "w": self.worker, "single": int(self.dialect == "sqlite")},
                         fetch="all")
        for job in map(_row_to_job, rows):
            for planned in job.planned:
                out["removed"] += remove_planned(planned)
            if not job.save:
                self.finish(job.id, FAILED, error="the server restarted before this job finished; its client "
                                                  "(an A1111 request that does not save images) is gone")
                out["failed"].append(job.id)
            elif job.status == RUNNING:
                self._run("UPDATE jobs SET status = :q, started = NULL, planned = NULL, worker = NULL WHERE id = :id",
                          {"q": QUEUED, "id": job.id})
                out["requeued"].append(job.id)
        return out

    # -- training jobs (server/train.py) ---------------------------------------------------------
    def put_train_job(self, row: dict[str, Any]) -> None:
        """Insert or update one training job: id, kind, name, status, step, total, created,
        error and data (a JSON-able dict); recorded as this worker's."""
        self._run("INSERT INTO train_jobs (id, kind, name, status, step, total, created, error, worker, data) "
                  "VALUES (:id, :kind, :name, :status, :step, :total, :created, :error, :worker, :data) "
                  "ON CONFLICT (id) DO UPDATE SET status = excluded.status, step = excluded.step, "
                  "total = excluded.total, error = excluded.error, worker = excluded.worker, data = excluded.data",
                  {**row, "worker": self.worker, "data": json.dumps(row["data"])})

    def train_jobs(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The training jobs, newest first (rows as ``put_train_job`` takes them, with ``worker``)."""
        rows = self._run("SELECT * FROM train_jobs ORDER BY created DESC LIMIT :n", {"n": limit}, fetch="all")
        return [{**r._mapping, "data": json.loads(r._mapping["data"])} for r in rows]

    # -- options ------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        return {r[0]: json.loads(r[1]) for r in self._run("SELECT key, value FROM options", fetch="all")}

    def set_options(self, values: dict[str, Any]) -> None:
        def go():
            with self._engine.begin() as conn:
                for k, v in values.items():
                    conn.execute(self._sa.text("INSERT INTO options (key, value) VALUES (:k, :v) "
                                               "ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
                                 {"k": k, "v": json.dumps(v)})
        if self._lock is None:
            return go()
        with self._lock:
            return go()


def remove_planned(planned: str) -> list[str]:
    """Delete what an interrupted job may have left at a planned name: the picture and its temp
    files (a local folder), or the published object (an fsspec URL); the names removed."""
    if is_url(planned):
        if place.exists(planned):
            place.remove(planned)
            return [planned]
        return []
    path = Path(planned)
    removed = []
    for leftover in [path, *path.parent.glob(f".{path.name}.*.tmp")]:
        if leftover.exists():
            leftover.unlink()
            removed.append(str(leftover))
    return removed
