"""Latent and phased consistency distillation (``danqing train distill``): the objectives' pieces
against diffusers' LCM and DDIM schedulers, a short run on a tiny model, and ``danqing eval shapes``
with a sampler and LoRAs (how the distilled LoRA is measured; docs/training.md has the runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from danqing.errors import InvalidRequest
from danqing.training import config as C
from danqing.training.distill import boundary_scalings, ddim_step, pcd_loss, phase_edges, solver_timesteps

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


def test_the_phases_are_the_steps_of_ddim_on_the_simple_schedule():
    """Each phase ends where DDIM on the Simple (trailing) schedule steps next, the last at its
    final jump, for the sampler danqing builds (``make_scheduler``), so every step of the sampler
    is the jump the student learnt."""
    import json

    from danqing.sampling.samplers import make_scheduler

    cfg = json.loads((TINY / "scheduler_config.json").read_text())
    for n in (2, 4, 8):
        sched = make_scheduler(cfg, "DDIM", "Simple")
        sched.set_timesteps(n)
        assert sched.timesteps[0] == 999 and sched.timesteps[1:].tolist() == phase_edges(1000, n)[:-1].tolist(), n
        assert phase_edges(1000, n)[-1] == -1 and not sched.config.set_alpha_to_one  # the last: alphas_cumprod[0]
    assert phase_edges(1000, 4).tolist() == [749, 499, 249, -1]


class _Exact:
    """An epsilon model that knows the one data point ``z``: its noise prediction is exact, so its
    DDIM jumps stay on the trajectory (``wrong`` adds a timestep-dependent error)."""

    def __init__(self, z, a, wrong=0.0):
        self.z, self.a, self.wrong = z, a, wrong

    def __call__(self, x, t, encoder_hidden_states=None):
        from types import SimpleNamespace

        a = self.a[t.clamp(min=0)].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.z[:1]) / (1 - a).sqrt()
        return SimpleNamespace(sample=eps + self.wrong * t.view(-1, 1, 1, 1) / 1000)


def test_the_phased_objective_is_zero_on_the_trajectory_only():
    from contextlib import nullcontext

    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(TINY)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g).expand(64, -1, -1, -1)
    ctx = torch.zeros(64, 77, 8)
    a = sched.alphas_cumprod
    kw = dict(teacher=nullcontext, guidance=3.0, edges=phase_edges(1000, 4), final_alpha=float(a[0]))
    exact = pcd_loss(_Exact(z, a), sched, z, ctx, ctx, torch.Generator().manual_seed(1), **kw)
    wrong = pcd_loss(_Exact(z, a, wrong=0.2), sched, z, ctx, ctx, torch.Generator().manual_seed(1), **kw)
    assert float(exact.max()) < 1e-4 and float(wrong.mean()) > 1e-3


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


@pytest.mark.parametrize("method, usage", [("lcm", "sampler LCM, 4 steps, CFG 1"),
                                           ("pcd", "sampler DDIM, schedule Simple, 4 steps, CFG 1")])
def test_a_short_run_writes_a_lora_for_its_sampler(settings, tmp_path, method, usage):
    from safetensors import safe_open

    from danqing import GenerationRequest, Studio
    from danqing.training.finetune import train_distill

    lines: list[str] = []
    summary = train_distill(_lcm_cfg(tmp_path / "run", distill={"method": method}), resume=False, log=lines.append,
                            settings=settings)
    assert summary["steps"] == 3 and np.isfinite(summary["loss"])
    assert any("teacher CFG 7" in line for line in lines)
    (path,) = map(Path, summary["files"])
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_training_method"] == method and meta["danqing.usage"] == usage
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


def test_the_bundled_4_step_lora_scores_within_003_of_the_20_step_model(tmp_path):
    """The shipped danqing-tiny-pcd LoRA (configs/train/distill-danqing-tiny-pcd.toml): 4 steps of
    DDIM on the Simple schedule at CFG 1 against danqing-tiny's 20 DPM++ 2M steps at CFG 7, on
    the 200 held-out prompts in English and in Chinese (seeds 1000+); its header says how to use it."""
    from safetensors import safe_open

    from danqing import Settings, Studio
    from danqing.models.registry import bundled_lora_entries
    from danqing.synthetic.evaluate import evaluate_studio
    from danqing.synthetic.scenes import eval_scenes

    (entry,) = [e for e in bundled_lora_entries() if e.name == "danqing-tiny-pcd"]
    with safe_open(str(entry.path), "pt") as f:
        assert f.metadata()["danqing.usage"] == "sampler DDIM, schedule Simple, 4 steps, CFG 1"
    studio = Studio(Settings(home=tmp_path, device="cpu", dtype="fp32"))
    scenes = eval_scenes(200)
    for lang in ("en", "zh"):
        slow, _ = evaluate_studio(studio, scenes, lang=lang, model="danqing-tiny")
        fast, _ = evaluate_studio(studio, scenes, lang=lang, model="danqing-tiny", steps=4, cfg_scale=1.0,
                                  sampler="DDIM", schedule="Simple", suffix=" <lora:danqing-tiny-pcd:1>")
        print(f"{lang}: 20 steps {slow['object']}, 4 steps {fast['object']}")
        assert fast["object"] >= slow["object"] - 0.03, (lang, slow, fast)
