"""Latent consistency distillation (``danqing train distill``): the objective's pieces against
diffusers' LCM and DDIM schedulers, a short run on a tiny model, and ``danqing eval shapes``
with a sampler and LoRAs (how the distilled LoRA is measured; docs/training.md has the runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from danqing.errors import InvalidRequest
from danqing.training import config as C
from danqing.training.distill import boundary_scalings, ddim_step, solver_timesteps

TINY = Path(__file__).resolve().parents[1] / "danqing/data/models/danqing-tiny/scheduler"


def test_the_parametrisation_and_timesteps_are_the_lcm_samplers():
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_pretrained(TINY)
    ts = solver_timesteps(1000, sched.config.original_inference_steps)
    assert ts[0] == 19 and ts[-1] == 999 and len(ts) == 50
    c_skip, c_out = boundary_scalings(ts, timestep_scaling=sched.config.timestep_scaling)
    for t, a, b in zip(ts.tolist(), c_skip.tolist(), c_out.tolist()):
        ref = sched.get_scalings_for_boundary_condition_discrete(t)
        assert a == pytest.approx(ref[0], rel=1e-5, abs=1e-9) and b == pytest.approx(ref[1], rel=1e-5)
    for n in (1, 2, 4, 8):  # every timestep the sampler visits is one the student was trained at
        sched.set_timesteps(n)
        assert set(sched.timesteps.tolist()) <= set(ts.tolist()), n


def test_the_teachers_step_is_a_ddim_step():
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_pretrained(TINY, timestep_spacing="trailing")
    ddim.set_timesteps(50)  # 999, 979, ..., 19: each step goes back k = 20, the last to the final alpha
    g = torch.Generator().manual_seed(0)
    a = ddim.alphas_cumprod
    for t in (999, 499, 19):
        x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        s = max(t - 20, 0)
        ours = ddim_step(x, eps, a[torch.tensor([t, t])], a[torch.tensor([s, s])])
        ref = ddim.step(eps, t, x, eta=0.0).prev_sample
        assert torch.allclose(ours, ref, atol=1e-5), t


@pytest.fixture()
def settings(models_dir, tmp_path):
    from danqing import Settings

    return Settings(home=tmp_path / "home", models_dir=models_dir, device="cpu", dtype="fp32")


def _lcm_cfg(out: Path, **sections):
    raw = {"model": {"base": "tiny-sd1"}, "data": {"source": "world:shapes", "n_images": 6, "resolution": 64},
           "network": {"rank": 4, "alpha": 4},
           "train": {"steps": 3, "batch_size": 2, "lr": 1e-2},
           "distill": {"solver_steps": 50},
           "output": {"output_dir": str(out), "name": "fast", "sample_every": 1000, "log_every": 1}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return C.DistillTrainConfig.model_validate(raw)


def test_a_short_lcm_run_writes_a_lora_for_the_lcm_sampler(settings, tmp_path):
    from safetensors import safe_open

    from danqing import GenerationRequest, Studio
    from danqing.training.finetune import train_distill

    lines: list[str] = []
    summary = train_distill(_lcm_cfg(tmp_path / "run"), resume=False, log=lines.append, settings=settings)
    assert summary["steps"] == 3 and np.isfinite(summary["loss"])
    assert any("teacher CFG 7" in line for line in lines)
    (path,) = map(Path, summary["files"])
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_training_method"] == "lcm" and meta["danqing.usage"] == "sampler LCM, 4 steps, CFG 1"
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # the text encoder stays as it was
    (settings.models_dir / "lora" / "fast.safetensors").write_bytes(path.read_bytes())
    try:
        studio = Studio(settings)
        base = dict(model="tiny-sd1", width=64, height=64, steps=4, seed=5, sampler="LCM", cfg_scale=1.0)
        plain = np.asarray(studio.generate(GenerationRequest.create(prompt="a red circle", **base)).images[0], float)
        fast = np.asarray(studio.generate(GenerationRequest.create(prompt="a red circle <lora:fast:1>", **base)).images[0],
                          float)
        assert np.abs(plain - fast).mean() > 0.5  # the tag loads and changes the picture
    finally:
        (settings.models_dir / "lora" / "fast.safetensors").unlink()


def test_lcm_distillation_refuses_what_it_cannot_do(settings, tmp_path):
    from danqing.training.finetune import train_distill

    with pytest.raises(InvalidRequest, match="train_text_encoder = false"):
        train_distill(_lcm_cfg(tmp_path / "a", network={"train_text_encoder": True}), resume=False, log=lambda s: None,
                  settings=settings)
    with pytest.raises(InvalidRequest, match="SD1/SD2 epsilon model; this one is sdxl"):
        train_distill(_lcm_cfg(tmp_path / "b", model={"base": "tiny-sdxl"}), resume=False, log=lambda s: None,
                  settings=settings)
    with pytest.raises(Exception, match="pair_relations"):
        C.DistillTrainConfig.model_validate({"data": {"pair_relations": ["inside"]}})


def test_eval_takes_a_sampler_and_loras_and_refuses_bad_ones(capsys, tmp_path):
    import json

    from danqing.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as exc:
            main(["--home", str(tmp_path / "home"), "eval", "shapes", "--n", "2", *args])
        return exc.value.code, capsys.readouterr()

    code, out = run("--sampler", "LCM", "--steps", "2", "--cfg", "1", "--lora", "heart:0.5", "--json", str(tmp_path / "s.json"))
    assert code in (0, None), out.err
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["n"] == 2
    code, out = run("--lora", "heart:abc")
    assert code == 2 and "--lora: 'heart:abc': the weight after ':' must be a number" in out.err
    code, out = run("--lora", "no-such-lora")
    assert code == 2 and "no-such-lora" in out.err
    code, out = run("--sampler", "Nope")
    assert code == 2 and "Nope" in out.err
