"""Helpers that every shell of the server uses (the job API, the A1111 routes, the web UI): the
HTTP answer for a job that did not finish, the infotext of an uploaded picture, the memory
report. They live here so that no shell imports another."""

from __future__ import annotations

import os
from typing import Any

from danqing.outputs.store import _decode_user_comment, _user_comment
from danqing.server.store import TERMINAL


class JobFailed(Exception):
    """A job's outcome as an HTTP error (status, one line, the job's id)."""

    def __init__(self, status: int, detail: str, job_id: str):
        super().__init__(detail)
        self.status, self.detail, self.job_id = status, detail, job_id


def job_error(job) -> JobFailed:
    """The HTTP answer for a job that did not finish: 422 for a request the engine refused,
    409 cancelled, 504 still waiting, 500 for an internal error."""
    if job.status == "cancelled":
        return JobFailed(409, f"job {job.id} was cancelled", job.id)
    if job.status not in TERMINAL:
        return JobFailed(504, f"job {job.id} is still {job.status}; follow it at /api/v1/jobs/{job.id}", job.id)
    if (job.error or "").startswith("internal error"):
        return JobFailed(500, job.error, job.id)
    return JobFailed(422, job.error or "failed", job.id)


def infotext_of_image(img) -> str:
    """The A1111 parameters of an in-memory picture: PNG text chunk or EXIF UserComment."""
    text = img.info.get("parameters")
    if not text:
        raw = _user_comment(img)
        text = _decode_user_comment(raw) if raw else ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text or ""


def memory_report(state) -> dict:
    """A1111 /memory: RAM of the machine and this process; CUDA when the worker's device is CUDA."""
    import resource

    page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
    avail = os.sysconf("SC_AVPHYS_PAGES")
    total, free = page * pages, page * avail
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out: dict[str, Any] = {"ram": {"free": free, "used": total - free, "total": total, "process_peak_rss": rss}}
    device = state.worker.studio.models.device
    if device.type == "cuda":
        import torch

        free_c, total_c = torch.cuda.mem_get_info(device)
        out["cuda"] = {"system": {"free": free_c, "used": total_c - free_c, "total": total_c},
                       "active": {"current": torch.cuda.memory_allocated(device), "peak": torch.cuda.max_memory_allocated(device)}}
    else:
        out["cuda"] = {"error": f"the worker runs on {device.type}, not CUDA"}
    return out
