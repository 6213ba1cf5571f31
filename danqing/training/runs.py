"""What the trainers' runs share: the optimiser step, EMA weights for evaluation, the step log,
and resumable checkpoints.

Checkpoints: ``<run>/checkpoints/step-N/`` holds accelerate's
``save_state`` (models, optimiser, LR schedule, objects registered for checkpointing such as
the EMA weights, RNG states) and ``step.json``, written last, so a folder without it is an
unfinished checkpoint that ``latest_checkpoint`` skips.

With every random draw of step ``s`` taken from a generator seeded with (seed, s), a run resumed
from ``step-N`` continues bit for bit as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

Log = Callable[[str], None]


def write_json_line(path: Path, row: dict) -> None:
    """Append ``row`` to the run's JSON-lines log."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` of ``run_dir`` (one with ``step.json``), or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [p for p in ckpts if (p / "step.json").is_file()]
    return ckpts[-1] if ckpts else None


def optimiser_step(accelerator, loss, params, opt, sched, max_grad_norm: float, ema=None) -> None:
    """One update: ``loss`` backward through accelerate (mixed-precision scaling, DDP), gradients
    clipped to ``max_grad_norm``, the optimiser and LR schedule stepped, then the EMA weights."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.step(params)


@contextlib.contextmanager
def ema_weights(ema, params, *modules):
    """The EMA weights in ``params`` (``modules`` in eval mode) for the block; the trained ones after."""
    ema.store(params)
    ema.copy_to(params)
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        ema.restore(params)
        for m in modules:
            m.train()


class StepLog:
    """The running mean of the loss; every ``every`` steps (and at the last) a log line with
    it/s and the time left, and a ``log.jsonl`` row. ``last``: the newest logged step and loss,
    and the newest evaluation."""

    def __init__(self, stage: str, total: int, start: int, log: Log, run_dir: Path, every: int):
        self.stage, self.total, self.start, self.log, self.every = stage, total, start, log, every
        self.path = Path(run_dir) / "log.jsonl"
        self.t0, self.avg = time.perf_counter(), None
        self.last: dict = {"step": start, "loss": None, "eval": None}

    def add(self, done: int, value: float, final: bool) -> None:
        self.avg = value if self.avg is None else 0.98 * self.avg + 0.02 * value
        if done % self.every == 0 or final:
            rate = (done - self.start) / (time.perf_counter() - self.t0)
            self.log(f"{self.stage} step {done}/{self.total} loss {self.avg:.4f} {rate:.2f} it/s "
                     f"eta {(self.total - done) / max(rate, 1e-9) / 60:.1f} min")
            write_json_line(self.path, {"stage": self.stage, "step": done, "loss": self.avg})
            self.last.update(step=done, loss=round(self.avg, 5))

    def evaluated(self, done: int, result: dict, row: dict) -> None:
        """Record an evaluation (``row``: its ``log.jsonl`` fields)."""
        write_json_line(self.path, {"stage": "eval", "step": done, **row})
        self.last["eval"] = result


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
