"""instruct-pix2pix: the edit pairs and their judge, widening a UNet, and training end to end
(the bundled instruct model's held-out score is in tests/test_bundled_instruct.py)."""

from __future__ import annotations

import dataclasses
import json

import torch
from parity import assert_close_scaled

from danqing.synthetic.edits import edit_pairs, heldout_edits, judge_edit
from danqing.synthetic.render import render


def test_edit_pairs_are_deterministic_and_the_judge_tells_right_from_wrong():
    assert edit_pairs(3, 20, ("en", "zh")) == edit_pairs(3, 20, ("en", "zh"))
    pairs = heldout_edits(60)
    assert {p.kind for p in pairs} == {"recolour", "add", "remove"}
    train_texts = {(p.before, p.instruction) for p in edit_pairs(0, 2000)}
    assert not any((p.before, p.instruction) in train_texts for p in pairs)  # held out: new scenes
    truth = [judge_edit(p, render(p.before), render(p.after)) for p in pairs]
    nothing = [judge_edit(p, render(p.before), render(p.before)) for p in pairs]
    assert all(r["ok"] for r in truth)
    assert not any(r["ok"] for r in nothing) and all(r["kept"] for r in nothing)
    # an edit that moves an untouched object is caught
    moved = [p for p in pairs if p.kind == "recolour" and len(p.before.objects) == 2][0]
    other = [o for o in moved.after.objects if o.shape != moved.target[0]][0]
    shifted = dataclasses.replace(moved.after, objects=tuple(
        dataclasses.replace(o, x=o.x + 0.12) if o is other else o for o in moved.after.objects))
    assert judge_edit(moved, render(moved.before), render(shifted)) == {"done": True, "kept": False, "ok": False}


def test_widened_unet_is_the_text_to_image_unet_before_training(tiny_components):
    from danqing.training.instruct import widen_conv_in

    unet = tiny_components["tiny-sd1"].unet
    wide = widen_conv_in(unet)
    assert wide.config.in_channels == 8
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
    picture = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = unet(x, 10, ctx).sample
        b = wide(torch.cat([x, picture], 1), 10, ctx).sample
    assert_close_scaled(b, a, rtol=1e-6)  # zero weights on the new channels (tests/parity.py)


def test_training_runs_exports_and_the_export_loads_as_an_instruct_model(tmp_path):
    from danqing.models.loader import load_diffusers_folder
    from danqing.training.config import InstructTrainConfig
    from danqing.training.instruct import judge_model, train_instruct

    cfg = InstructTrainConfig.model_validate({
        "data": {"n_pairs": 64}, "unet": {"steps": 6, "batch_size": 8, "warmup_steps": 1},
        "instruct": {"eval_pairs": 2}, "run": {"output_dir": str(tmp_path / "run"), "log_every": 3,
                                               "eval_every": 6, "eval_steps": 2}})
    lines: list[str] = []
    summary = train_instruct(cfg, log=lines.append)
    assert summary["steps"] == 6 and summary["eval"]["n"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["pairs"] == 64
    comps = load_diffusers_folder(tmp_path / "run" / "model")
    assert comps.unet.config.in_channels == 8
    # the exported model runs as an instruct model through img2img
    res = judge_model(comps, heldout_edits(1), steps=2)
    assert res["n"] == 1 and 0 <= res["ok"] <= 1
    assert any(line.startswith("instruct step 6/6") for line in lines)


def test_resumed_training_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    """A run stopped at a checkpoint and resumed (accelerate state with the EMA weights, per-step
    generators seeded with (seed, step)) exports exactly the weights of a run that never stopped."""
    from safetensors.torch import load_file

    from danqing.training.config import InstructTrainConfig
    from danqing.training.instruct import train_instruct

    def cfg(out, steps):
        return InstructTrainConfig.model_validate({
            "data": {"n_pairs": 16}, "unet": {"steps": steps, "batch_size": 4, "warmup_steps": 1},
            "instruct": {"eval_pairs": 0}, "run": {"output_dir": str(out), "log_every": 1, "checkpoint_every": 2}})

    train_instruct(cfg(tmp_path / "straight", 4), log=lambda s: None)
    train_instruct(cfg(tmp_path / "part", 2), log=lambda s: None)
    halfway = load_file(tmp_path / "part" / "model.safetensors")
    lines: list[str] = []
    summary = train_instruct(cfg(tmp_path / "part", 4), resume=True, log=lines.append)
    assert summary["steps"] == 4 and any("resumed from" in s and "at step 2" in s for s in lines)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(halfway[k], b[k]) for k in b)  # the resumed steps did train
