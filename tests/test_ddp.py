"""Multi-process training (``danqing train lora --num-processes 2``: ``accelerate launch``, DDP
over gloo on the CPU): two processes at global batch B take the same steps as one process at
batch B, and a checkpoint written by two processes resumes in one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from danqing.training import config as C

STEPS, BATCH = 3, 4
# Float summation order (DDP averages two half-batch gradients; Adam divides each gradient by its
# running size, so where a gradient is float noise that noise becomes an update of up to lr, in
# either direction; tests/test_ddp_trainers.py says more). Set against how far the weights move in
# one step (the step-2 to step-3 checkpoints of the one-process run: up to 1.0e-2 at lr 1e-2): the
# mean |diff| below 1/100 of the mean move (measured 1.5e-7 against 6.2e-3), and
# no weight further off than STEPS such steps (measured 2.3e-4, in 1 of 17,408 elements). A run
# whose processes drew other rows would differ by about one step's move everywhere.
MEAN_RATIO = 1e-2


def _cfg(out: Path, steps: int) -> dict:
    return {"model": {"base": "tiny-sd1"}, "data": {"source": "concept:heart", "n_images": 6, "resolution": 64},
            "network": {"rank": 4, "alpha": 2, "train_text_encoder": True},
            "train": {"steps": steps, "batch_size": BATCH, "lr": 1e-2, "lr_scheduler": "constant"},
            "output": {"output_dir": str(out), "name": "t", "checkpoint_every": 2, "sample_every": 1000,
                       "log_every": 1, "num_threads": 1}}


def _toml(cfg: dict, path: Path) -> Path:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {v!r}".replace("True", "true").replace("'", '"'))
    path.write_text("\n".join(lines) + "\n")
    return path


def _weights(run_dir: Path, step: int) -> list[torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step-{step}" / "trainable.pt", weights_only=True)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and a
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _one_step(run_dir: Path) -> list[torch.Tensor]:
    return [b - a for a, b in zip(_weights(run_dir, STEPS - 1), _weights(run_dir, STEPS))]


def _assert_same_run(got: list[torch.Tensor], ref: list[torch.Tensor], one_step: list[torch.Tensor]) -> str:
    """``got`` equals ``ref`` up to float summation order (above), against ``one_step``'s move."""
    assert len(got) == len(ref) == len(one_step) and ref
    diff = torch.cat([(x - y).abs().flatten() for x, y in zip(got, ref)])
    move = torch.cat([m.abs().flatten() for m in one_step])
    assert float(move.mean()) > 1e-6  # the weights did move
    assert float(diff.mean()) < MEAN_RATIO * float(move.mean()), (float(diff.mean()), float(move.mean()))
    assert float(diff.max()) <= STEPS * float(move.max()), (float(diff.max()), float(move.max()))
    return f"|diff| mean {float(diff.mean()):.2e} max {float(diff.max()):.2e}; one step's move mean {float(move.mean()):.2e}"


def _cli(models_dir: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DANQING_MODELS": str(models_dir), "DANQING_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "danqing.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def one_process(models_dir, tmp_path_factory):
    """The reference: one process, global batch BATCH, STEPS steps (in this process)."""
    from danqing import Settings
    from danqing.training.finetune import train_lora

    out = tmp_path_factory.mktemp("one") / "run"
    settings = Settings(home=out.parent, models_dir=models_dir, device="cpu", dtype="fp32")
    train_lora(C.LoraTrainConfig.model_validate(_cfg(out, STEPS)), resume=False, log=lambda s: None,
               settings=settings)
    return out


@pytest.fixture(scope="module")
def two_processes(models_dir, tmp_path_factory):
    """``danqing train lora --num-processes 2``: its run folder."""
    home = tmp_path_factory.mktemp("two")
    out = home / "run"
    done = _cli(models_dir, home, "train", "lora", "--config", str(_toml(_cfg(out, STEPS), home / "c.toml")),
                "--num-processes", "2", "--fresh")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training in 2 processes" in done.stderr
    assert done.stdout.count("summary:") == 1  # one voice: the other process writes and says nothing
    return out


def test_two_processes_train_as_one_at_the_same_global_batch(one_process, two_processes):
    out = two_processes
    assert (out / "t.safetensors").is_file()
    for step in (2, STEPS):
        assert sorted(p.name for p in (out / "checkpoints" / f"step-{step}").glob("random_states_*")) == \
            ["random_states_0.pkl", "random_states_1.pkl"]
    said = _assert_same_run(_weights(out, STEPS), _weights(one_process, STEPS), _one_step(one_process))
    print(f"2 processes vs 1 at global batch {BATCH}, LoRA weights after {STEPS} steps: {said}")
    assert _max_diff(_weights(out, STEPS), _weights(out, 2)) > 1e-4  # the weights did move


def test_a_two_process_checkpoint_resumes_in_one(models_dir, one_process, two_processes, tmp_path):
    import shutil

    from danqing import Settings
    from danqing.training.finetune import train_lora

    out = tmp_path / "run"
    shutil.copytree(two_processes, out)
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS}")  # as if the two-process run had stopped at step 2
    lines: list[str] = []
    train_lora(C.LoraTrainConfig.model_validate(_cfg(out, STEPS)), resume=True, log=lines.append,
               settings=Settings(home=tmp_path, models_dir=models_dir, device="cpu", dtype="fp32"))
    assert any("resumed from" in line and "step-2" in line for line in lines), lines
    _assert_same_run(_weights(out, STEPS), _weights(one_process, STEPS), _one_step(one_process))


def test_a_batch_that_does_not_split_is_one_clear_line():
    from danqing.errors import InvalidRequest
    from danqing.training.runs import process_rows

    assert [process_rows(4, i, 2) for i in (0, 1)] == [slice(0, 2), slice(2, 4)]
    with pytest.raises(InvalidRequest, match="3 does not split over 2 processes: use a multiple of 2"):
        process_rows(3, 0, 2)
