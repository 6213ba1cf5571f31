"""One Studio in one Ray actor: what a Ray Serve replica and a Ray Data batch actor run.

The actor owns its Studio, and with it its device (Ray gives a replica with ``num_gpus=1`` its
own GPU through ``CUDA_VISIBLE_DEVICES``); it runs one request at a time and keeps no state of
a request after it has answered. The result is the job result the single-process server
stores (``server/jobs.py``: images with seed, subseed and infotext, the request as run), plus
the PNG bytes, made by the same functions, so a replica's pictures are the server's bytes.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import date
from pathlib import Path

from danqing.errors import DanqingError
from danqing.outputs import place
from danqing.request import GenerationRequest
from danqing.server.jobs import planned_paths, png_bytes, result_record
from danqing.settings import Settings, force_offline
from danqing.studio import Studio

SAVE_TRIES = 20  # replicas saving into one folder at once: a name taken meanwhile -> the next number


def make_studio(settings: Settings, threads: int | None, *, names_only: bool = True) -> Studio:
    """The actor's Studio: offline, ``threads`` torch CPU threads (None = torch's choice)."""
    import torch  # lazy: the actor process imports torch only when it builds its Studio

    force_offline()
    if threads:
        torch.set_num_threads(threads)
    studio = Studio(settings)
    studio.registry.names_only = names_only  # requests from the network name models, never paths
    return studio


def worker_name() -> str:
    """This actor, for answers and logs: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def generate_result(studio: Studio, request: GenerationRequest, *, save: bool, outputs_dir: place.Location,
                    on_step=None) -> dict:
    """Run ``request``; the server's job result with ``pngs`` added, or ``{"error": line}``.

    Args:
        studio: the actor's Studio.
        request: a request the ingress checked (``ServerState.prepare_request``).
        save: also write the pictures under ``outputs_dir/txt2img-images/DATE/`` (or
            ``img2img-images``) with A1111's names, as the server does; ``outputs_dir`` is a
            folder or an fsspec URL (``outputs.place``).
        on_step: called with each step's ``StepInfo`` (the job API's progress).
    """
    try:
        result = studio.generate(request, on_step=on_step, save=False)
        paths: list[Path | None] = [None] * len(result.images)
        if save:
            kind = "img2img-images" if request.init_image is not None else "txt2img-images"
            paths = _save(result, place.join(outputs_dir, kind, date.today().isoformat()))
            pngs = [place.read_bytes(p) for p in paths]  # the server answers with the files' bytes
        else:
            pngs = [png_bytes(img, text) for img, text in zip(result.images, result.infotexts)]
    except (DanqingError, FileExistsError) as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 -- a failing request must never take the replica down
        return {"error": f"internal error: {type(exc).__name__}: {exc}"}
    return {
        **result_record(result, paths),
        "pngs": pngs,
        "worker": worker_name(),
        "finished": time.time(),
    }


def _save(result, folder: place.Location) -> list[place.Location]:
    """The pictures under A1111's ``NNNNN-SEED.png`` names; another replica may take a number
    between the plan and the write, and then the run moves on to the next free numbers."""
    for _ in range(SAVE_TRIES):
        paths = planned_paths(folder, result.seeds)
        written: list[Path] = []
        try:
            for img, path, text in zip(result.images, paths, result.infotexts):
                written.append(place.save_picture(img, path, text))
            return written
        except FileExistsError:
            for p in written:  # ours, from this try: the next try writes them under new numbers
                place.remove(p)
    raise FileExistsError(f"no free picture names in {folder} after {SAVE_TRIES} tries")
