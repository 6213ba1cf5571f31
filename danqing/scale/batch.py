"""Batch generation: a file of requests -> one folder of pictures (``danqing batch``, docs/scale.md).

The file is read and every request checked before anything runs: a ``.jsonl`` file holds one
JSON object of GenerationRequest fields per line; any other file is A1111's "prompts from
file" (one prompt per line, or ``--prompt "..." --steps 20 --seed 5`` lines;
``danqing.apps.prompts_file``). Random seeds are drawn at planning time.

Request *i* (its line, counted from 0 over the non-empty lines) writes ``NNNNN.png`` (its
further pictures ``NNNNN-1.png``, ...), each with its infotext, and then ``NNNNN.json``: the
request as run, the seeds, the infotexts and the file names. Every file is written atomically,
and the JSON file last, so it marks a finished request: a rerun over the same folder skips the
requests whose JSON file is there and redoes the others (a PNG left by a run killed before
its JSON is written over by the same picture).

``run_local`` runs the requests in this process with one Studio; ``run_ray`` maps them over
Ray Data actors (``map_batches`` with an actor pool), one Studio per actor.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from danqing.errors import InvalidRequest
from danqing.files import atomic_write_text
from danqing.outputs.store import save_png
from danqing.request import GenerationRequest
from danqing.scale.replica import make_studio, worker_name
from danqing.settings import Settings
from danqing.studio import Studio, resolve_request


@dataclass(frozen=True)
class BatchItem:
    """One request of the file and where its files go."""

    index: int
    request: GenerationRequest

    @property
    def stem(self) -> str:
        return f"{self.index:05d}"


def read_requests(path: Path, base: GenerationRequest, default_model: str) -> list[BatchItem]:
    """Every request of ``path``, checked, with random seeds drawn and the model named.

    Args:
        path: ``.jsonl`` (GenerationRequest fields per line) or a prompts file (A1111's syntax).
        base: the request a prompts-file line starts from (``danqing batch``'s options).
        default_model: the model of requests that name none.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest("file", f"cannot read {path}: {exc}") from None
    if Path(path).suffix.lower() == ".jsonl":
        requests = list(_jsonl(text, base))
    else:
        from danqing.apps.prompts_file import plan_lines

        requests = [job.request for job in plan_lines(base, text)]
    if not requests:
        raise InvalidRequest("file", f"{path} holds no request")
    return [BatchItem(i, resolve_request(r, default_model)) for i, r in enumerate(requests)]


def _jsonl(text: str, base: GenerationRequest) -> Iterator[GenerationRequest]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest("file", f"line {lineno}: not JSON ({exc.msg})") from None
        if not isinstance(fields, dict):
            raise InvalidRequest("file", f"line {lineno}: must be a JSON object of request fields")
        try:
            yield GenerationRequest.create(**{**base.model_dump(exclude_unset=True), **fields})
        except InvalidRequest as exc:
            raise InvalidRequest(exc.field, f"line {lineno}: {str(exc).split(': ', 1)[-1]}") from None


def pending(items: list[BatchItem], out_dir: Path) -> list[BatchItem]:
    """The items whose JSON file (written last) is not in ``out_dir`` yet."""
    return [it for it in items if not (Path(out_dir) / f"{it.stem}.json").exists()]


def write_item(studio: Studio, item: BatchItem, out_dir: Path) -> dict:
    """Run one request and write its pictures, then its JSON file; returns the JSON's content."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    result = studio.generate(item.request, save=False)
    names = [f"{item.stem}.png" if i == 0 else f"{item.stem}-{i}.png" for i in range(len(result.images))]
    for img, name, text in zip(result.images, names, result.infotexts):
        save_png(img, out_dir / name, text, overwrite=True)  # a picture left without its JSON: the same picture
    meta = {
        "index": item.index, "files": names, "seeds": result.seeds, "subseeds": result.subseeds,
        "infotexts": result.infotexts, "request": result.request.model_dump(mode="json"),
        "seconds": round(time.perf_counter() - started, 4), "worker": worker_name(), "warnings": result.warnings,
    }
    atomic_write_text(out_dir / f"{item.stem}.json", json.dumps(meta, indent=1), overwrite=True)
    return meta


def run_local(settings: Settings, items: list[BatchItem], out_dir: Path, *, threads: int | None = None,
              on_done: Callable[[dict], None] | None = None) -> int:
    """The pending items in this process, one after another; returns how many ran."""
    todo = pending(items, out_dir)
    if not todo:
        return 0
    studio = make_studio(settings, threads, names_only=False)
    for item in todo:
        meta = write_item(studio, item, out_dir)
        if on_done:
            on_done(meta)
    return len(todo)


class BatchActor:
    """A Ray Data actor: one Studio; ``__call__`` runs a batch of rows (index, request JSON)."""

    def __init__(self, settings: Settings, out_dir: str, threads: int | None):
        self.studio = make_studio(settings, threads, names_only=False)
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict) -> dict:
        metas = [write_item(self.studio, BatchItem(int(i), GenerationRequest.model_validate_json(r)), self.out_dir)
                 for i, r in zip(batch["index"], batch["request"])]
        return {"index": [m["index"] for m in metas], "meta": [json.dumps(m) for m in metas]}


def run_ray(settings: Settings, items: list[BatchItem], out_dir: Path, *, workers: int, threads: int | None = 1,
            worker_cpus: float = 1.0, worker_gpus: float = 0.0, on_done: Callable[[dict], None] | None = None,
            address: str | None = None) -> int:
    """The pending items over ``workers`` Ray Data actors; returns how many ran.

    Args:
        workers: actors, each with its own Studio (``worker_cpus`` / ``worker_gpus`` reserved each).
        threads: torch CPU threads per actor.
        address: a Ray cluster to join (None: the running one, or a new local one).
    """
    import ray  # lazy: only the Ray runs need it

    todo = pending(items, out_dir)
    if not todo:
        return 0
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows its own
    rows = [{"index": it.index, "request": it.request.model_dump_json()} for it in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(BatchActor, fn_constructor_args=(settings, str(out_dir), threads), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))), num_cpus=worker_cpus, num_gpus=worker_gpus)
    done = 0
    for row in ds.iter_rows():
        done += 1
        if on_done:
            on_done(json.loads(row["meta"]))
    return done
