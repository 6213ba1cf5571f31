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

import torch

from danqing.models.loader import load_components
from danqing.models.registry import Registry
from danqing.settings import Settings

Log = Callable[[str], None]


def start_run(output_dir: str | Path, *, resume: bool, num_threads: int = 0, create: bool = True) -> Path:
    """A run's folder (created when ``create``); its checkpoints removed unless ``resume`` (a
    fresh start must not later resume from an older run's). ``num_threads``: torch's CPU
    threads (0 = its default)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    run_dir = Path(output_dir)
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        clear_checkpoints(run_dir)
    return run_dir


def load_float32(name: str, settings=None, *, frozen: bool = True):
    """(Components on the CPU in float32 and eval mode, registry entry, Registry) of checkpoint
    ``name`` in the models folder of ``settings`` (default: from the environment); ``frozen``:
    no parameter requires gradients."""
    registry = Registry((settings or Settings.from_env()).models_dir)
    entry = registry.find("checkpoint", name)
    comps = load_components(entry)
    for m in comps.modules().values():
        m.to(torch.float32).eval()
        if frozen:
            m.requires_grad_(False)
    return comps, entry, registry


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
    """The bookkeeping after each step of a trainer whose state lives in one Accelerator: the
    running mean of the loss; every ``run_cfg.log_every`` steps (and at the last) a log line
    with it/s and the time left and a ``log.jsonl`` row; a checkpoint every
    ``run_cfg.checkpoint_every`` steps and at the last; the ``run_cfg.max_minutes`` time cap.
    ``last``: the newest logged step and loss, and the newest evaluation."""

    def __init__(self, stage: str, total: int, start: int, log: Log, run_dir: Path, run_cfg, accelerator):
        self.stage, self.total, self.start, self.log = stage, total, start, log
        self.run_dir, self.cfg, self.accelerator = Path(run_dir), run_cfg, accelerator
        self.path = self.run_dir / "log.jsonl"
        self.t0, self.avg, self.out_of_time = time.perf_counter(), None, False
        self.deadline = self.t0 + run_cfg.max_minutes * 60 if run_cfg.max_minutes else None
        self.last: dict = {"step": start, "loss": None, "eval": None}

    def done(self, done: int, value: float) -> bool:
        """Record step ``done`` (1-based) with loss ``value``; True when it is the last one."""
        self.out_of_time = self.deadline is not None and time.perf_counter() > self.deadline
        final = done == self.total or self.out_of_time
        self.avg = value if self.avg is None else 0.98 * self.avg + 0.02 * value
        if done % self.cfg.log_every == 0 or final:
            rate = (done - self.start) / (time.perf_counter() - self.t0)
            self.log(f"{self.stage} step {done}/{self.total} loss {self.avg:.4f} {rate:.2f} it/s "
                     f"eta {(self.total - done) / max(rate, 1e-9) / 60:.1f} min")
            write_json_line(self.path, {"stage": self.stage, "step": done, "loss": self.avg})
            self.last.update(step=done, loss=round(self.avg, 5))
        if done % self.cfg.checkpoint_every == 0 or final:
            save_checkpoint(self.accelerator, self.run_dir, done)
        return final

    def evaluated(self, done: int, result: dict, row: dict) -> None:
        """Record an evaluation (``row``: its ``log.jsonl`` fields)."""
        write_json_line(self.path, {"stage": "eval", "step": done, **row})
        self.last["eval"] = result

    def stopping(self) -> bool:
        """Whether the time cap ended the run at the last recorded step (said in the log)."""
        if self.out_of_time:
            self.log(f"run.max_minutes={self.cfg.max_minutes} reached at step {self.last['step']}; stopping there")
        return self.out_of_time


def save_checkpoint(accelerator, run_dir: Path, step: int, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-<step>``; ``extra(folder)`` adds files before ``step.json``
    marks it complete. With several processes every one calls it (accelerate writes each
    process's random state); the main process writes the rest."""
    ckpt = Path(run_dir) / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(ckpt))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(ckpt)
        (ckpt / "step.json").write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
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
