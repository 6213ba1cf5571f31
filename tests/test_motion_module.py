"""danqing-tiny-motion: the moving shapes world (held-out combinations, captions), the trajectory
scorer on rendered clips, the trainer (a module that starts as the still model, learns, and is
written as a MotionAdapter folder that loads), the bundled module on held-out clips, and
``danqing eval motion``."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from danqing.cli import app
from danqing.models.motion import load_motion_adapter
from danqing.models.registry import ModelEntry
from danqing.synthetic.motion import (DIRECTIONS, OPPOSITE, heldout_clips, held_out_direction, motion_caption,
                                      training_clips, training_pairs)
from danqing.synthetic.render import render
from danqing.synthetic.scenes import heldout_pairs
from danqing.synthetic.trajectory import score_clip, summarise_clips
from danqing.training.config_companions import MotionTrainConfig

def _frames(clip):
    return [render(s) for s in clip.scenes()]


def test_held_out_clips_are_combinations_no_training_clip_has():
    trained = {(c.colour, c.shape, c.direction) for c in training_clips(3000)}
    held = heldout_clips(50)
    assert not {(c.colour, c.shape, c.direction) for c in held} & trained
    assert {c.direction for c in held} == set(DIRECTIONS)
    assert all(c.direction == held_out_direction(c.colour, c.shape) for c in held)
    # every (colour, shape) of training moves in exactly three directions; the still world's
    # held-out pairs never move
    assert {(c.colour, c.shape) for c in training_clips(3000)}.isdisjoint(heldout_pairs())
    per_pair = {}
    for c, s, d in trained:
        per_pair.setdefault((c, s), set()).add(d)
    assert max(len(v) for v in per_pair.values()) == 3


def test_contrast_pairs_are_mirrored_twins_of_training_combinations():
    clips = training_pairs(400)
    assert len(clips) == 400
    held = {(c.colour, c.shape, c.direction) for c in heldout_clips(200)}
    assert not {(c.colour, c.shape, c.direction) for c in clips} & held
    for a, b in zip(clips[::2], clips[1::2]):
        assert b.direction == OPPOSITE[a.direction] and (a.colour, a.shape, a.size, a.background, a.style, a.seed) == \
            (b.colour, b.shape, b.size, b.background, b.style, b.seed)
        # the twin's path is the clip's mirrored across the picture's middle along the motion's axis
        axis = 0 if a.direction in ("right", "left") else 1
        for p, q in ((a.start, b.start), (a.end, b.end)):
            assert abs(p[axis] + q[axis] - 1) < 1e-3 and p[1 - axis] == q[1 - axis]
    right = summarise_clips([score_clip(_frames(c), c.colour, c.shape, c.direction) for c in clips[1:9:2]])
    assert right["direction"] == 1.0


def test_a_contrast_pair_batch_holds_twins_side_by_side():
    from danqing.training.motion import batch_indices

    g = torch.Generator().manual_seed(0)
    idx, per_draw = batch_indices(10, 4, True, g)
    assert per_draw == 2 and idx.tolist()[1::2] == [i + 1 for i in idx.tolist()[::2]] and all(i % 2 == 0 for i in idx[::2])
    idx, per_draw = batch_indices(10, 4, False, g)
    assert per_draw == 1 and idx.shape == (4,)
    with pytest.raises(ValueError, match="even batch_size"):
        MotionTrainConfig.model_validate({"train": {"mirror_pairs": True, "batch_size": 3}})


def test_captions_name_the_object_and_its_motion_in_both_languages():
    clip = replace(training_clips(1)[0], colour="red", shape="circle", direction="right")
    assert motion_caption(clip, "en") == "a red circle moving to the right"
    assert motion_caption(clip, "zh") == "一个红色的圆形向右移动"
    rng = random.Random(0)
    for _ in range(20):
        text = motion_caption(clip, "en", rng)
        assert "red" in text and "circle" in text and "right" in text
        assert "右" in motion_caption(clip, "zh", rng)


def test_rendered_clips_move_the_asked_way_and_keep_their_object():
    clips = heldout_clips(12)
    right = summarise_clips([score_clip(_frames(c), c.colour, c.shape, c.direction) for c in clips])
    assert right["direction"] == 1.0 and right["identity"] == 1.0 and right["object"] == 1.0
    assert 0.02 < right["speed"] < 0.05  # about half the picture over 16 frames
    assert right["axis"] == 1.0
    backwards = [score_clip(_frames(c)[::-1], c.colour, c.shape, c.direction) for c in clips]
    assert not any(s.direction for s in backwards) and all(s.axis for s in backwards)
    # a smooth clip moves a few hundredths of the picture per frame; the same frames shuffled jump
    assert right["jump"] < 0.06
    order = [0, 15, 1, 14, 2, 13, 3, 12, 4, 11, 5, 10, 6, 9, 7, 8]
    shuffled = [score_clip([_frames(c)[i] for i in order], c.colour, c.shape, c.direction) for c in clips]
    assert min(s.jump for s in shuffled) > 0.3


def test_a_still_or_changing_object_is_caught():
    clip = heldout_clips(1)[0]
    frames = _frames(clip)
    still = score_clip([frames[0]] * clip.frames, clip.colour, clip.shape, clip.direction)
    assert not still.direction and not still.axis and still.identity and abs(still.speed) < 1e-6
    other = "blue" if clip.colour != "blue" else "red"
    changed = frames[:8] + _frames(replace(clip, colour=other))[8:]
    assert not score_clip(changed, clip.colour, clip.shape, clip.direction).identity


def test_a_share_of_each_batch_is_drawn_at_high_noise():
    from danqing.training.motion import draw_timesteps

    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_timesteps(1000, 4, 0.5, g) for _ in range(500)])
    assert (draws[:, :2] >= 700).all() and (draws[:, 2:] < 700).float().mean() > 0.6
    g.manual_seed(0)
    plain = torch.stack([draw_timesteps(1000, 4, 0.0, g) for _ in range(500)])
    g.manual_seed(0)
    assert torch.equal(plain, torch.stack([torch.randint(1000, (4,), generator=g) for _ in range(500)]))


SHORT = {"data": {"n_clips": 12, "frames": 8, "captions_per_clip": 2}, "model": {"text_lora_rank": 2},
         "train": {"steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1},
         "output": {"eval_every": 6, "eval_clips": 1, "eval_steps": 2, "log_every": 3}}


def test_a_short_run_starts_from_the_still_model_learns_and_writes_a_motion_adapter_and_lora(tmp_path):
    from danqing.customise.lora import read_network, resolve
    from danqing.training.motion import add_text_lora, motion_unet_for_training, new_adapter, train_motion
    from danqing.training.runs import load_float32

    cfg = MotionTrainConfig.model_validate({**SHORT, "output": {**SHORT["output"], "output_dir": str(tmp_path / "run")}})
    # at the start the motion UNet is the still UNet, frame by frame
    comps, _, _ = load_float32("danqing-tiny")
    unet, params = motion_unet_for_training(comps, new_adapter(comps.unet, cfg.model, 0))
    params += add_text_lora(unet, 2)
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in unet.parameters()) == len(params)
    x, ctx = torch.randn(1, 4, 8, 8, 8), torch.randn(8, 77, comps.unet.config.cross_attention_dim)
    with torch.no_grad():
        motion = unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample
        still = comps.unet(x[0].permute(1, 0, 2, 3), 500, encoder_hidden_states=ctx).sample
    assert (motion[0].permute(1, 0, 2, 3) - still).abs().max() < 1e-5

    lines = []
    summary = train_motion(cfg, log=lines.append)
    assert summary["steps"] == 6 and {"direction_en", "identity_zh", "object_en"} <= summary.keys()
    folder = tmp_path / "run" / "model"
    adapter = load_motion_adapter(ModelEntry("run", folder, "motion", "diffusers"))
    trained = {k: v for k, v in adapter.state_dict().items() if k.endswith("proj_out.weight")}
    assert trained and any(v.abs().max() > 0 for v in trained.values())  # the zero projections moved
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and any(line.startswith("step 6/6") for line in lines)
    # the cross-attention LoRA is a kohya file every module of which fits the still model's
    modules, _ = read_network(tmp_path / "run" / "danqing-tiny-motion.safetensors")
    resolved = resolve("danqing-tiny-motion", "0" * 64, modules, comps, "danqing-tiny")
    assert len(resolved.targets) == len(modules) and all(".attn2." in mod for _, mod in resolved.targets)


@pytest.fixture(scope="module")
def motion_home(tmp_path_factory):
    """A danqing home with a motion module and its cross-attention LoRA from a short run installed
    (models/motion/short, models/lora/short.safetensors)."""
    from danqing.training.motion import train_motion

    home = tmp_path_factory.mktemp("motion-home")
    run = home / "run"
    cfg = MotionTrainConfig.model_validate({**SHORT, "model": {"text_lora_rank": 2, "name": "short"},
                                            "train": {**SHORT["train"], "steps": 2},
                                            "output": {**SHORT["output"], "eval_every": 100, "output_dir": str(run)}})
    train_motion(cfg, log=lambda line: None)
    (home / "models" / "motion").mkdir(parents=True)
    (run / "model").rename(home / "models" / "motion" / "short")
    (home / "models" / "lora").mkdir(parents=True)
    (run / "short.safetensors").rename(home / "models" / "lora" / "short.safetensors")
    return home


def test_cli_eval_motion_judges_held_out_clips_and_refuses_bad_input(motion_home, tmp_path, capsys):
    runner = CliRunner()
    result = runner.invoke(app, ["--home", str(motion_home), "--device", "cpu", "eval", "motion", "--n", "2",
                                 "--steps", "2", "--lora", "short", "--out", str(tmp_path / "gifs"),
                                 "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    summary = report["summary"]
    assert summary["n"] == 2 and summary["motion"] == "short" and summary["lora"] == ["short"]
    assert {"direction", "identity", "object", "speed"} <= summary.keys()
    assert [c["prompt"] for c in report["clips"]] == [motion_caption(c) + " <lora:short:1>" for c in heldout_clips(2)]
    assert len(list((tmp_path / "gifs").glob("*.gif"))) == 2
    # another kind: its held-out clips, judged by the change score
    from danqing.synthetic.motion import heldout_kind_clips

    result = runner.invoke(app, ["--home", str(motion_home), "--device", "cpu", "eval", "motion", "--n", "1",
                                 "--steps", "2", "--kind", "grow", "--json", str(tmp_path / "g.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["summary"]["kind"] == "grow" and {"done", "kept", "object"} <= report["summary"].keys()
    assert report["clips"][0]["prompt"] == motion_caption(heldout_kind_clips(1, "grow")[0])
    from danqing.cli import main

    for args, message in [(["--n", "0"], "n: must be 1-500, got 0"), (["--lang", "fr"], "lang: must be one of en, zh"),
                          (["--motion", "nope"], "unknown motion module 'nope'"),
                          (["--kind", "spin"], "kind: must be one of line, arc, grow, shrink, recolour")]:
        with pytest.raises(SystemExit) as exc:
            main(["--home", str(motion_home), "eval", "motion", "--n", "1", *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_loss_weight_lifts_high_noise_clips_to_their_picture_error_up_to_its_cap():
    from diffusers import DDPMScheduler

    from danqing.training.motion import loss_weights

    a = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    t = torch.tensor([0, 300, 600, 700, 999])
    assert torch.equal(loss_weights(a, t, 1.0), torch.ones(5))                # 1: the plain objective
    w = loss_weights(a, t, 20.0)
    snr = a[t] / (1 - a[t])
    assert w[0] == 1 and w[1] == 1                                             # SNR > 1: unchanged
    assert torch.allclose(w[2:4], 1 / snr[2:4])                                # x0's error: epsilon's / SNR
    assert w[4] == 20                                                          # capped


# -- the bundled module --------------------------------------------------------------------------
def test_bundled_module_moves_held_out_objects_along_the_asked_axis(tmp_path):
    """danqing-tiny-motion (bundled, the default when models/motion/ is empty) with its
    cross-attention LoRA, on the first 8 held-out clips (16 frames, 20 steps DPM++ 2M, CFG 7,
    seeds 6000+): every object travels along the asked axis (measured on the 50-clip set: 0.96
    of clips in English), the asked way in at least half (measured: 5 of these 8, 0.50 of the
    50; the issue's bar is 0.80, not met), and each frame is a good picture of the object."""
    from pathlib import Path

    from danqing import Settings, Studio
    from danqing.request_video import VideoRequest
    from danqing.video.studio import VideoStudio

    bundled = Path(__file__).resolve().parents[1] / "danqing" / "data" / "models"
    assert (bundled / "danqing-tiny-motion" / "diffusion_pytorch_model.safetensors").stat().st_size <= 10 * 2**20
    videos = VideoStudio(Studio(Settings(home=tmp_path, device="cpu", dtype="fp32")))
    scores = []
    for i, clip in enumerate(heldout_clips(8)):
        req = VideoRequest(prompt=motion_caption(clip, "en") + " <lora:danqing-tiny-motion:1>", frames=16, width=64,
                           height=64, steps=20, seed=6000 + i, sampler="DPM++ 2M", cfg_scale=7.0, model="danqing-tiny")
        result = videos.generate(req)
        assert result.request.motion_module == "danqing-tiny-motion"
        scores.append((clip, score_clip(result.clips[0], clip.colour, clip.shape, clip.direction)))
    assert all(s.axis for _, s in scores), [s for _, s in scores]
    assert sum(s.direction for _, s in scores) >= 4, [s for _, s in scores]
    assert sum(s.object for _, s in scores) / len(scores) >= 0.85


def test_a_run_resumes_from_a_trained_module_and_lora_in_contrast_pairs(tmp_path):
    """A run resumed from another's module and LoRA starts where that one ended (its first
    step's weights are the files'), and trains on mirrored twins."""
    from safetensors.torch import load_file

    from danqing.training.motion import train_motion

    first = MotionTrainConfig.model_validate({**SHORT, "output": {**SHORT["output"], "output_dir": str(tmp_path / "a")}})
    train_motion(first, log=lambda _: None)
    a = tmp_path / "a"
    resumed = {**SHORT, "model": {**SHORT["model"], "resume_from": str(a / "model"),
                                  "resume_lora": str(a / "danqing-tiny-motion.safetensors")},
               "train": {**SHORT["train"], "mirror_pairs": True, "lr": 1e-12, "steps": 2},
               "output": {**SHORT["output"], "eval_every": 2, "output_dir": str(tmp_path / "b")}}
    lines = []
    train_motion(MotionTrainConfig.model_validate(resumed), log=lines.append)
    assert any("motion layers from" in x for x in lines) and any("LoRA from" in x for x in lines)
    b = tmp_path / "b"
    for old, new in ((a / "model" / "diffusion_pytorch_model.safetensors", b / "model" / "diffusion_pytorch_model.safetensors"),
                     (a / "danqing-tiny-motion.safetensors", b / "danqing-tiny-motion.safetensors")):
        x, y = load_file(str(old)), load_file(str(new))
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)
    with pytest.raises(Exception, match="neither a path nor a bundled name"):
        bad = {**resumed, "model": {**resumed["model"], "resume_from": "no-such-module"}}
        train_motion(MotionTrainConfig.model_validate(bad), log=lambda _: None)


def test_a_motion_lora_run_trains_only_a_lora_on_the_frozen_module_and_writes_a_motion_lora(tmp_path):
    """``model.motion_lora_rank``: the bundled module stays as it is, its cross-attention LoRA is
    folded in (the same outputs as that LoRA applied through peft), and the run writes a file
    every layer of which is one of the module's temporal attention projections (a motion LoRA
    that ``<lora:NAME:1>`` resolves against the bundled module)."""
    from danqing.customise.lora import read_network
    from danqing.customise.motion_lora import resolve_motion
    from danqing.models.motion import is_motion_network
    from danqing.models.registry import bundled_motion_entries
    from danqing.training.motion import (add_text_lora, merge_text_lora, motion_unet_for_training, new_adapter,
                                         resume_adapter, resume_text_lora, train_motion)
    from danqing.training.runs import load_float32

    cfg = MotionTrainConfig.model_validate({"model": {"text_lora_rank": 8, "resume_from": "danqing-tiny-motion",
                                                      "resume_lora": "danqing-tiny-motion"}})
    comps, _, _ = load_float32("danqing-tiny")
    outs = []
    for fold in (True, False):
        adapter = new_adapter(comps.unet, cfg.model, 0)
        resume_adapter(adapter, "danqing-tiny-motion")
        unet, _ = motion_unet_for_training(comps, adapter)
        if fold:
            assert merge_text_lora(unet, comps, "danqing-tiny-motion") == 28  # 7 transformers x 4 projections
        else:
            add_text_lora(unet, 8)
            resume_text_lora(unet, comps, "danqing-tiny-motion")
        torch.manual_seed(0)
        x, ctx = torch.randn(1, 4, 4, 8, 8), torch.randn(4, 77, comps.unet.config.cross_attention_dim)
        with torch.no_grad():
            outs.append(unet(x, torch.tensor([700]), encoder_hidden_states=ctx).sample)
    assert (outs[0] - outs[1]).abs().max() < 1e-4

    run = {**SHORT, "data": {**SHORT["data"], "directions": ["right"]},
           "model": {"motion_lora_rank": 2, "resume_from": "danqing-tiny-motion", "resume_lora": "danqing-tiny-motion",
                     "name": "right"},
           "output": {**SHORT["output"], "output_dir": str(tmp_path / "run")}}
    lines = []
    train_motion(MotionTrainConfig.model_validate(run), log=lines.append)
    assert any("folded in: 28 layers" in x for x in lines) and not (tmp_path / "run" / "model").exists()
    modules, meta = read_network(tmp_path / "run" / "right.safetensors")
    assert is_motion_network(modules) and len(modules) == 10 * 4 and "danqing-tiny-motion" in meta["danqing_use"]
    bundled = next(e for e in bundled_motion_entries() if e.name == "danqing-tiny-motion")
    motion = new_adapter(comps.unet, cfg.model, 0)
    resume_adapter(motion, str(bundled.path))
    unet, _ = motion_unet_for_training(comps, motion)
    assert len(resolve_motion("right", "0" * 64, modules, unet, "danqing-tiny-motion").targets) == 40  # 10 motion layers x 4
    with pytest.raises(ValueError, match="resume_from"):
        MotionTrainConfig.model_validate({"model": {"motion_lora_rank": 2}})


@pytest.mark.parametrize("kind", ["arc", "grow", "shrink", "recolour"])
def test_clips_of_the_other_kinds_are_judged_done_and_their_reversals_not(kind):
    """Arcs, growing, shrinking and recolouring objects: rendered clips of held-out combinations
    score done, kept and object 1.0; played backwards the change is not the asked one (an arc
    goes the other way, growing is shrinking, the colours swap ends)."""
    from danqing.synthetic.motion import held_out_change, heldout_kind_clips
    from danqing.synthetic.trajectory import score_change, summarise_changes

    clips = heldout_kind_clips(6, kind)
    assert all(c.kind == kind and held_out_change(c.colour, c.shape) == kind for c in clips)
    right = summarise_changes([score_change(_frames(c), c) for c in clips])
    assert right == {"clips": 6, "done": 1.0, "kept": 1.0, "object": 1.0}
    assert not any(score_change(_frames(c)[::-1], c).done for c in clips)
    if kind == "arc":  # a straight line along the same way is no arc
        line = replace(clips[0], kind="line")
        assert score_clip(_frames(line), line.colour, line.shape, line.direction).direction
        assert not score_change(_frames(line), clips[0]).done
    if kind in ("grow", "shrink"):  # an object that keeps its size neither grows nor shrinks
        assert not score_change([_frames(clips[0])[0]] * 16, clips[0]).done


def test_other_kinds_have_captions_and_training_clips_leave_each_pairs_held_out_change_out():
    from danqing.synthetic.motion import KINDS, held_out_change, kind_clip
    from danqing.synthetic.scenes import Scene

    rng = random.Random(0)
    grow = kind_clip(rng, "red", "circle", "grow")
    assert motion_caption(grow) == "a red circle growing" and motion_caption(grow, "zh") == "一个红色的圆形变大"
    turn = replace(kind_clip(rng, "red", "circle", "recolour"), colour_2="blue")
    assert motion_caption(turn) == "a red circle turning blue" and motion_caption(turn, "zh") == "一个红色的圆形变成蓝色"
    arc = kind_clip(rng, "red", "circle", "arc", direction="right")
    assert motion_caption(arc) == "a red circle moving to the right in an arc"
    assert motion_caption(arc, "zh") == "一个红色的圆形沿弧线向右移动"
    mixed = training_clips(600, kinds=KINDS)
    assert {c.kind for c in mixed} == set(KINDS)
    assert not any(c.kind != "line" and held_out_change(c.colour, c.shape) == c.kind for c in mixed)
    assert training_clips(50) == training_clips(50, kinds=("line",))  # the straight-line world is unchanged
    # a still scene serialises as before (no scale unless it is not 1)
    scene = training_clips(1)[0].scene_at(0)
    assert "scale" not in scene.to_dict()["objects"][0] and Scene.from_dict(scene.to_dict()) == scene
    assert Scene.from_dict(grow.scene_at(0).to_dict()) == grow.scene_at(0)


def test_the_shipped_motion_configs_load():
    from pathlib import Path

    from danqing.training.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    module = load_config(root / "danqing-tiny-motion.toml", {}, model=MotionTrainConfig)
    assert module.model.text_lora_rank == 8 and not module.model.motion_lora_rank
    lora = load_config(root / "danqing-tiny-motion-lora.toml", {}, model=MotionTrainConfig)
    assert lora.model.motion_lora_rank == 4 and lora.model.resume_from == "danqing-tiny-motion"
    travel = load_config(root / "danqing-tiny-motion-travel.toml", {}, model=MotionTrainConfig)
    assert travel.data.travel and not travel.model.text_lora_rank and travel.model.resume_from == "danqing-tiny-motion"
    with pytest.raises(Exception, match="straight lines"):
        MotionTrainConfig.model_validate({"data": {"travel": True, "kinds": ["line", "arc"]}})

