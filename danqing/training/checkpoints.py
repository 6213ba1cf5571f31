"""Resumable training checkpoints: ``<run>/checkpoints/step-N/`` holds accelerate's
``save_state`` (models, optimiser, LR schedule, objects registered for checkpointing such as
the EMA weights, RNG states) and ``step.json``, written last, so a folder without it is an
unfinished checkpoint that ``latest_checkpoint`` skips.

With every random draw of step ``s`` taken from a generator seeded with (seed, s), a run resumed
from ``step-N`` continues bit for bit as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from danqing.training.base import latest_checkpoint


def save_checkpoint(accelerator, run_dir: Path, step: int, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-<step>``; ``extra(folder)`` adds files before ``step.json``
    marks it complete."""
    ckpt = Path(run_dir) / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(ckpt))
    if extra is not None:
        extra(ckpt)
    (ckpt / "step.json").write_text(json.dumps({"step": step}))
    return ckpt


def resume_step(accelerator, run_dir: Path, log: Callable[[str], None],
                before_load: Callable[[Path], None] | None = None) -> int:
    """Load the newest complete checkpoint of ``run_dir`` into ``accelerator``'s prepared objects
    and return its step (0 when there is none). ``before_load(folder)`` reads extra files first."""
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        return 0
    if before_load is not None:
        before_load(ckpt)
    accelerator.load_state(str(ckpt))
    step = json.loads((ckpt / "step.json").read_text())["step"]
    log(f"resumed from {ckpt} at step {step}")
    return step


def clear_checkpoints(run_dir: Path) -> None:
    """Remove the run's checkpoints (a fresh start must not later resume from an older run's)."""
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
