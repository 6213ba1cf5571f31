"""Studio.generate: seeds, batches, variations, prompt editing, callbacks and interrupt."""

from __future__ import annotations

import numpy as np
import torch
from parity import assert_close_scaled

from danqing import STOP, GenerationRequest

BASE = dict(prompt="a red circle", negative_prompt="blurry", steps=5, width=64, height=64, model="tiny-sd1")


def _arr(img):
    return np.asarray(img, dtype=np.int16)


def test_same_request_same_image(studio):
    a = studio.generate(GenerationRequest(**BASE, seed=42))
    b = studio.generate(GenerationRequest(**BASE, seed=42))
    assert torch.equal(a.latents[0], b.latents[0])
    c = studio.generate(GenerationRequest(**BASE, seed=43))
    assert not torch.equal(a.latents[0], c.latents[0])


def test_random_seed_is_reported_and_reproduces(studio):
    r = studio.generate(GenerationRequest(**BASE, seed=-1))
    assert r.request.seed >= 0 and r.seeds == [r.request.seed]
    again = studio.generate(GenerationRequest(**BASE, seed=r.request.seed))
    assert torch.equal(r.latents[0], again.latents[0])


def test_batch_uses_seed_plus_i_and_matches_single_images(studio):
    r = studio.generate(GenerationRequest(**BASE, seed=100, batch_size=2, batch_count=2, sampler="Euler a"))
    assert r.seeds == [100, 101, 102, 103]
    assert len(r.images) == 4 and len(r.infotexts) == 4
    assert "Seed: 103," in r.infotexts[3]
    single = studio.generate(GenerationRequest(**BASE, seed=101, sampler="Euler a"))
    # Image i of a batch is the image of seed + i (up to batched-matmul rounding).
    assert_close_scaled(r.latents[0][1], single.latents[0][0])  # relative bound: tests/parity.py


def test_variation_seed(studio):
    base = studio.generate(GenerationRequest(**BASE, seed=5))
    zero = studio.generate(GenerationRequest(**BASE, seed=5, subseed=9, subseed_strength=0.0))
    var = studio.generate(GenerationRequest(**BASE, seed=5, subseed=9, subseed_strength=0.3))
    full = studio.generate(GenerationRequest(**BASE, seed=9, subseed=5, subseed_strength=0.0))
    full_var = studio.generate(GenerationRequest(**BASE, seed=5, subseed=9, subseed_strength=1.0))
    assert torch.equal(base.latents[0], zero.latents[0])
    assert not torch.equal(base.latents[0], var.latents[0])
    assert_close_scaled(full_var.latents[0], full.latents[0])
    assert "Variation seed: 9, Variation seed strength: 0.3" in var.infotexts[0]


def test_on_step_reports_every_step_with_preview(studio):
    seen = []

    def on_step(info):
        seen.append((info.step, info.total))
        img = info.preview()
        assert img.size == (32, 32) and img.mode == "RGB"

    studio.generate(GenerationRequest(**BASE, seed=1, sampler="Heun"), on_step=on_step)
    assert seen == [(i, 5) for i in range(1, 6)]


def test_stop_interrupts_cleanly(studio):
    calls = []

    def on_step(info):
        calls.append(info.step)
        return STOP if info.step == 2 else None

    r = studio.generate(GenerationRequest(**BASE, seed=1, batch_count=3), on_step=on_step)
    assert calls == [1, 2] and r.interrupted
    assert len(r.images) == 1 and len(r.seeds) == 1
    # The next request runs normally: nothing left over on shared objects.
    fresh = studio.generate(GenerationRequest(**BASE, seed=1))
    again = studio.generate(GenerationRequest(**BASE, seed=1))
    assert not fresh.interrupted and torch.equal(fresh.latents[0], again.latents[0])


def test_skip_ends_one_batch_and_goes_on(studio):
    from danqing import SKIP

    calls = []

    def on_step(info):
        calls.append((info.batch_index, info.step))
        return SKIP if (info.batch_index, info.step) == (0, 2) else None

    req = GenerationRequest(**BASE, seed=1, batch_count=3)
    r = studio.generate(req, on_step=on_step)
    full = studio.generate(req)
    assert not r.interrupted and len(r.images) == 3
    assert calls[:3] == [(0, 1), (0, 2), (1, 1)] and len(calls) == 2 + 2 * BASE["steps"]
    assert not torch.equal(r.latents[0], full.latents[0])  # cut short
    assert torch.equal(r.latents[1], full.latents[1]) and torch.equal(r.latents[2], full.latents[2])


def test_prompt_editing_changes_conditioning_midway(studio):
    steps = dict(BASE, steps=6, sampler="Euler", seed=3)
    a = studio.generate(GenerationRequest(**{**steps, "prompt": "a red circle"}))
    b = studio.generate(GenerationRequest(**{**steps, "prompt": "a blue star"}))
    edit = studio.generate(GenerationRequest(**{**steps, "prompt": "[a red circle:a blue star:3]"}))
    edit_last = studio.generate(GenerationRequest(**{**steps, "prompt": "[a red circle:a blue star:6]"}))
    assert not torch.equal(edit.latents[0], a.latents[0]) and not torch.equal(edit.latents[0], b.latents[0])
    # Switching after the last step never uses the second prompt.
    assert torch.equal(edit_last.latents[0], a.latents[0])


def test_long_prompt_and_weights_change_the_image(studio):
    plain = studio.generate(GenerationRequest(**{**BASE, "seed": 4, "prompt": "a red circle"}))
    weighted = studio.generate(GenerationRequest(**{**BASE, "seed": 4, "prompt": "a (red:1.4) circle"}))
    long = studio.generate(GenerationRequest(**{**BASE, "seed": 4, "prompt": ", ".join(["a red circle"] * 40)}))
    assert not torch.equal(plain.latents[0], weighted.latents[0])
    assert long.latents[0].shape == plain.latents[0].shape


def test_save_writes_png_with_infotext(studio, tmp_path):
    from danqing.outputs.store import read_infotext

    r = studio.generate(GenerationRequest(**BASE, seed=12), save=True, out_dir=tmp_path)
    (path,) = r.paths
    assert path.name == "00000-12.png"
    text = read_infotext(path)
    assert text == r.infotexts[0]
    assert text.startswith("a red circle\nNegative prompt: blurry\nSteps: 5, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 12, Size: 64x64, Model hash: ")
    assert list(tmp_path.iterdir()) == [path]


def test_sd2_and_sdxl_run(studio):
    for model in ("tiny-sd2", "tiny-sdxl"):
        r = studio.generate(GenerationRequest(**{**BASE, "model": model, "seed": 1}))
        assert r.images[0].size == (64, 64)


def test_default_model_is_the_bundled_one(tmp_path):
    from danqing import Settings, Studio

    studio = Studio(Settings(home=tmp_path, device="cpu"))
    r = studio.generate(GenerationRequest(prompt="a cat", steps=2, width=64, height=64, seed=1))
    assert r.request.model == "danqing-tiny"
    assert "Model: danqing-tiny," in r.infotexts[0]
    r = studio.generate(GenerationRequest(prompt="a cat", steps=2, width=64, height=64, seed=1, model="danqing-tiny-random"))
    assert "Model: danqing-tiny-random" in r.infotexts[0]
