"""``make_3d``: a text-to-3D run from request to files, the steps numbered as ``Studio.generate``'s."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from danqing.threed.cameras import preset
from danqing.threed.export import (OutputPaths, extract_mesh, refuse_existing, turntable_frames, write_gif, write_mesh,
                                   write_params, write_turntable_video)
from danqing.threed.run import RunResult, ThreeDRequest, check_size, optimise
from danqing.threed.sds import native_size


@dataclass
class Made:
    """What ``make_3d`` wrote: the files, the run, the mesh and the turntable pictures."""

    paths: list[Path]
    result: RunResult
    mesh: object
    frames: list
    params: dict


def peak_memory_mb() -> float:
    """The process's peak resident memory in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def prepare_3d(studio, request: ThreeDRequest, out: OutputPaths):
    """Steps 1 and 2, before any optimisation: nothing would be overwritten, the model loads
    and takes the render size.

    Returns:
        (the request with its model named, the ``LoadedModel``).
    """
    # 1. validate: nothing is overwritten; the model is named.
    refuse_existing(out)
    request = request.replace(model=request.model or studio.settings.default_model).with_model_defaults()
    # 2. load the frozen model (the ModelManager places it) and check the size against it.
    loaded = studio.models.load(request.model)
    check_size(request.size, native_size(loaded.components), loaded.name)
    return request, loaded


def make_3d(loaded, request: ThreeDRequest, out: OutputPaths, *, on_step=None, resume: Path | None = None) -> Made:
    """Optimise, then write the mesh (GLB, OBJ, PLY), the parameters and the turntable (GIF, MP4).

    Args:
        loaded: the ``LoadedModel`` of ``prepare_3d``.
        request: the request of ``prepare_3d``.
        out: the files to write (``export.output_paths``); none may exist.
        on_step: called with a ``StepReport`` after every step; False stops the run.
        resume: a checkpoint of this same run (``out.checkpoint`` of an earlier, stopped run).
    """
    # 3. optimise (checkpoints beside the mesh).
    result = optimise(loaded.components, request, model_name=loaded.name, model_hash=loaded.sha256, on_step=on_step,
                      checkpoint=out.checkpoint, resume=resume)
    # 4. mesh and turntable.
    mesh = extract_mesh(result.field)
    ranges = preset(request.camera_preset())
    frames = turntable_frames(result.field, result.background, ranges, size=request.size, frames=request.frames,
                              samples=request.samples)
    params = {"danqing": "3d", "request": request.to_dict(), "model": loaded.name, "model_hash": loaded.short_hash,
              "steps_done": result.steps_done, "interrupted": result.interrupted,
              "seconds": round(result.seconds, 1), "peak_memory_mb": round(peak_memory_mb(), 1),
              "mesh": {"vertices": len(mesh.vertices), "faces": len(mesh.faces), "watertight": bool(mesh.is_watertight)},
              "files": [p.name for p in out.written()], "checkpoint": out.checkpoint.name}
    # 5. save.
    paths = [write_mesh(mesh, p, params) for p in out.meshes()]
    paths += [write_params(params, out.params), write_gif(frames, out.turntable)]
    paths += write_turntable_video(frames, out.video, params)
    return Made(paths, result, mesh, frames, params)
