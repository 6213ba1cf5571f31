"""What the trainers' runs share: the optimiser step, EMA weights for evaluation, the step log,
resumable checkpoints, and the rows of a batch each process trains on.

Checkpoints: ``<run>/checkpoints/step-N/`` holds accelerate's
``save_state`` (models, optimiser, LR schedule, objects registered for checkpointing such as
the EMA weights, RNG states) and ``step.json``, written last, so a folder without it is an
unfinished checkpoint that ``latest_checkpoint`` skips.

With every random draw of step ``s`` taken from a generator seeded with (seed, s), a run resumed
from ``step-N`` continues bit for bit as the uninterrupted run would have.

Several processes (``danqing train ... --num-processes N``: ``accelerate launch``, DDP): every
process draws the whole batch of a step from the step's generator (``batch_size`` is the global
batch), keeps its own rows (``process_rows``) and computes the mean loss over them; DDP averages
the gradients of the equal shards, which is the gradient of the whole batch's mean loss. So N
processes take the same steps as one process at the same global batch (up to float summation
order), only the main process writes files, and a checkpoint written by N processes resumes in
any other number.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from danqing.errors import InvalidRequest
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


def process_rows(batch: int, index: int, count: int) -> slice:
    """The rows of a global batch that process ``index`` of ``count`` trains on.

    Raises:
        InvalidRequest: ``batch`` does not split evenly over ``count`` processes (one line).
    """
    if batch % count:
        raise InvalidRequest("train.batch_size", f"{batch} does not split over {count} processes: "
                                                 f"use a multiple of {count}")
    per = batch // count
    return slice(index * per, (index + 1) * per)


def my_rows(accelerator, batch: int) -> slice:
    """This process's rows of a global batch of ``batch`` (all of them in a one-process run)."""
    return process_rows(batch, accelerator.process_index, accelerator.num_processes)


def mean_over_processes(accelerator, value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the processes (the whole batch's loss); ``value`` itself in a
    one-process run (no collective, no device sync)."""
    return accelerator.reduce(value, "mean") if accelerator.num_processes > 1 else value


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds in any process (``flag`` itself in a one-process run)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")[0] > 0)


def write_json_line(path: Path, row: dict) -> None:
    """Append ``row`` to the run's JSON-lines log."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` of ``run_dir`` (one with ``step.json``), or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [p for p in ckpts if (p / "step.json").is_file()]
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: Path, keep: int = 1) -> None:
    """Remove all but the ``keep`` newest complete checkpoints of ``run_dir`` (a run that only
    needs to resume keeps one; a LoRA's checkpoint holds its whole base model)."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in [p for p in ckpts if (p / "step.json").is_file()][:-keep or None]:
        shutil.rmtree(old, ignore_errors=True)


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
        self.main = accelerator.is_main_process  # the other processes of a multi-process run write nothing
        if not self.main:
            self.log = quiet

    def done(self, done: int, loss: torch.Tensor) -> bool:
        """Record step ``done`` (1-based) with this process's ``loss`` (averaged over the
        processes); True when it is the last one."""
        value = float(mean_over_processes(self.accelerator, loss.detach().float()))
        late = self.deadline is not None and time.perf_counter() > self.deadline
        self.out_of_time = any_process(self.accelerator, late)  # every process stops at the same step
        final = done == self.total or self.out_of_time
        self.avg = value if self.avg is None else 0.98 * self.avg + 0.02 * value
        if done % self.cfg.log_every == 0 or final:
            rate = (done - self.start) / (time.perf_counter() - self.t0)
            self.log(f"{self.stage} step {done}/{self.total} loss {self.avg:.4f} {rate:.2f} it/s "
                     f"eta {(self.total - done) / max(rate, 1e-9) / 60:.1f} min")
            if self.main:
                write_json_line(self.path, {"stage": self.stage, "step": done, "loss": self.avg})
            self.last.update(step=done, loss=round(self.avg, 5))
        if done % self.cfg.checkpoint_every == 0 or final:
            save_checkpoint(self.accelerator, self.run_dir, done)
        return final

    def evaluated(self, done: int, result: dict, row: dict) -> None:
        """Record an evaluation (``row``: its ``log.jsonl`` fields); the main process evaluates."""
        write_json_line(self.path, {"stage": "eval", "step": done, **row})
        self.last["eval"] = result

    def stopping(self) -> bool:
        """Whether the time cap ended the run at the last recorded step (said in the log)."""
        if self.out_of_time:
            self.log(f"run.max_minutes={self.cfg.max_minutes} reached at step {self.last['step']}; stopping there")
        return self.out_of_time


def quiet(line: str) -> None:
    """The log of the processes other than the main one."""


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


def export_run(run_dir: Path, summary: dict, save: Callable[[Path], None], log: Log, folder: str = "model") -> Path:
    """A run's result: ``run_dir/folder`` written afresh by ``save(path)``, then ``summary.json``."""
    out = Path(run_dir) / folder
    shutil.rmtree(out, ignore_errors=True)
    save(out)
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    log(f"done: {out}")
    return out

