"""Multi-process training of the base, ControlNet and instruct trainers (``danqing train
base|controlnet|instruct --num-processes 2``: ``accelerate launch``, DDP over gloo on the CPU):
two processes at global batch B take the same steps as one process at batch B, and a checkpoint
written by two processes resumes in one. Tiny models, a few steps each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import _toml  # the same small TOML writer

from danqing.training import config as C

STEPS, BATCH = 3, 4
# What "equal up to float summation order" means here. DDP averages two half-batch gradients, so
# the gradients differ from one process's in the last bits. Adam divides each gradient by its own
# running size: where a gradient is float noise (a bias before a GroupNorm, whose true gradient is
# zero) that noise becomes an update of up to lr, in either direction. Measured after 3 steps at
# lr 1e-3: mean |diff| of the weights 1.3e-7 (base UNet + text encoder), 1.7e-8 (ControlNet),
# 1.5e-7 (instruct UNet), against a mean move of 5e-4 per step (ratio < 1e-3); max |diff| 7.5e-4, in 0.25% of the
# UNet's elements and 0.003% of the ControlNet's; the logged losses agree to 2e-7 relative. A run
# whose processes drew other rows would differ by about one step's move everywhere.
MEAN_RATIO = 1e-2  # mean |diff| below 1/100 of the mean move of one step
LOSS_RTOL = 1e-5


def _close(got: dict, ref: dict, moved: dict) -> tuple[float, float]:
    """Assert ``got`` equals ``ref`` up to float summation order (see above); (mean, max) |diff|."""
    assert got.keys() == ref.keys() and got
    diff = torch.cat([(got[k] - ref[k]).abs().flatten() for k in ref])
    step = torch.cat([v.abs().flatten() for v in moved.values()])
    assert float(step.mean()) > 1e-5  # the weights did move
    assert float(diff.mean()) < MEAN_RATIO * float(step.mean())
    # no weight further off than the two runs' noise-driven Adam steps can take it: up to lr per
    # step each (measured here 1.09e-3 after 3 steps at lr 1e-3, on another machine 7.5e-4)
    assert float(diff.max()) <= STEPS * float(step.max())
    return float(diff.mean()), float(diff.max())


def _moved(run: Path) -> dict:
    """How far the last step moved each weight."""
    a, b = _weights(run, STEPS), _weights(run, 2)
    return {k: a[k] - b[k] for k in a}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _base(out: Path) -> dict:
    return {"data": {"n_images": 16, "size": 64, "captions_per_image": 1},
            "model": {"family": "tiny-sd1"},
            "vae": {"steps": 2, "batch_size": BATCH, "crop_steps": 2, "crop_batch_size": BATCH, "crop_size": 16,
                    "object_weight": 4.0},
            "unet": {"steps": STEPS, "batch_size": BATCH, "lr": 1e-3, "warmup_steps": 1},
            "run": {"output_dir": str(out), "log_every": 1, "checkpoint_every": 2, "sample_every": 1000,
                    "eval_every": 1000, "eval_prompts": 0, "eval_steps": 1, "num_threads": 1}}


def _control(out: Path) -> dict:
    return {"data": {"n_images": 8, "size": 32, "captions_per_image": 1},
            "controlnet": {"init_from": "tiny-sd1", "eval_maps": 0},
            "unet": {"steps": STEPS, "batch_size": BATCH, "warmup_steps": 1, "lr": 1e-3},
            "run": {"output_dir": str(out), "log_every": 1, "checkpoint_every": 2, "num_threads": 1}}


def _instruct(out: Path) -> dict:
    return {"data": {"n_pairs": 8, "size": 32}, "instruct": {"init_from": "tiny-sd1", "eval_pairs": 0},
            "unet": {"steps": STEPS, "batch_size": BATCH, "warmup_steps": 1, "lr": 1e-3},
            "run": {"output_dir": str(out), "log_every": 1, "checkpoint_every": 2, "num_threads": 1}}


def _train(kind: str, cfg: dict, resume: bool, log=lambda s: None) -> dict:
    if kind == "base":
        from danqing.training.base import train_base

        return train_base(C.BaseTrainConfig.model_validate(cfg), resume=resume, log=log)
    if kind == "controlnet":
        from danqing.training.controlnet import train_controlnet

        return train_controlnet(C.ControlTrainConfig.model_validate(cfg), resume=resume, log=log)
    from danqing.training.instruct import train_instruct

    return train_instruct(C.InstructTrainConfig.model_validate(cfg), resume=resume, log=log)


KINDS = {"base": _base, "controlnet": _control, "instruct": _instruct}


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The trained modules of a checkpoint (accelerate's model.safetensors, model_1.safetensors, ...)."""
    folder = run / "checkpoints" / f"step-{step}"
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def runs(models_dir, tmp_path_factory):
    """Per trainer: (one-process run folder, two-process run folder)."""
    old = os.environ.get("DANQING_MODELS")
    os.environ["DANQING_MODELS"] = str(models_dir)
    out = {}
    try:
        for kind, make in KINDS.items():
            home = tmp_path_factory.mktemp(kind)
            _train(kind, make(home / "one"), resume=False)
            cfg = _toml(make(home / "two"), home / "c.toml")
            env = {**os.environ, "DANQING_HOME": str(home), "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-m", "danqing.cli", "train", kind, "--config", str(cfg),
                                   "--num-processes", "2", "--fresh"], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            assert "training in 2 processes" in done.stderr
            assert done.stdout.count("summary:") == 1  # one voice: the other process writes and says nothing
            out[kind] = (home / "one", home / "two")
    finally:
        if old is None:
            os.environ.pop("DANQING_MODELS", None)
        else:
            os.environ["DANQING_MODELS"] = old
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_processes_train_as_one_at_the_same_global_batch(runs, kind):
    one, two = runs[kind]
    for step in (2, STEPS):
        assert sorted(p.name for p in (two / "checkpoints" / f"step-{step}").glob("random_states_*")) == \
            ["random_states_0.pkl", "random_states_1.pkl"]
    mean, top = _close(_weights(two, STEPS), _weights(one, STEPS), _moved(one))
    print(f"{kind}: 2 processes vs 1 at global batch {BATCH}, {STEPS} steps: |diff| mean {mean:.2e} max {top:.2e}")
    assert _losses(two) == pytest.approx(_losses(one), rel=LOSS_RTOL)  # every logged step, VAE stages included
    exported = {"base": "model.safetensors", "controlnet": "controlnet", "instruct": "model.safetensors"}[kind]
    assert (two / exported).exists() and (two / "summary.json").is_file()
    if kind == "base":  # the VAE stage (whole images, then weighted crops) trained in two processes too
        start, vae, end = (load_file(run / "diffusion_pytorch_model.safetensors")
                           for run in (one / "vae-full", two / "vae", one / "vae"))
        _close(vae, end, {k: end[k] - start[k] for k in end})


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_two_process_checkpoint_resumes_in_one(runs, kind, models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DANQING_MODELS", str(models_dir))
    one, two = runs[kind]
    run = tmp_path / "run"
    shutil.copytree(two, run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS}")  # as if the two-process run had stopped at step 2
    lines: list[str] = []
    _train(kind, KINDS[kind](run), resume=True, log=lines.append)
    assert any("resumed from" in line and "step-2" in line for line in lines), lines
    mean, top = _close(_weights(run, STEPS), _weights(one, STEPS), _moved(one))
    print(f"{kind}: 2-process checkpoint resumed in 1 process vs 1 process: |diff| mean {mean:.2e} max {top:.2e}")
