"""Prompt travel (``conditioning/travel.py``): keyframe lines parsed as AnimateDiff users write
them, each frame conditioned on the interpolation of the keyframes around it, through the
motion UNet, sliding context windows and the CLI; and the bundled motion module following a
held-out clip's direction when its prompt travels between the still world's positions."""

from __future__ import annotations

import pytest
import torch
from parity import assert_close_scaled

from danqing.conditioning.travel import frame_weights, parse_travel
from danqing.errors import InvalidRequest
from danqing.models.families import build_components
from danqing.models.motion import motion_unet
from danqing.passes.video import run_video
from danqing.request_video import VideoRequest
from danqing.sampling.video import ContextDenoise

RUN = dict(device="cpu", dtype=torch.float32)


def test_keyframe_lines_between_a_head_and_a_tail():
    prompt = "a red circle,\nplain white background\n0: on the left\n  15 : on the right,\nbest quality"
    assert parse_travel(prompt, 16) == [
        (0, "a red circle, plain white background, on the left, best quality"),
        (15, "a red circle, plain white background, on the right, best quality")]
    assert parse_travel("8: a blue star\n0: a red circle", 16) == [(0, "a red circle"), (8, "a blue star")]
    assert parse_travel("a red circle moving to the right", 16) is None
    assert parse_travel("a [red:blue:5] circle, (star:1.2)", 16) is None  # A1111 syntax is not a keyframe


@pytest.mark.parametrize("prompt, message", [
    ("0: a red circle\n16: a blue star", "keyframe 16 is past the clip's last frame (15); keyframes are 0-15"),
    ("0: a red circle\n0: a blue star", "keyframe 0 is given twice"),
    ("0: a red circle\nbest quality\n8: a blue star", "'best quality' stands between keyframe lines"),
])
def test_a_keyframe_the_clip_cannot_hold_is_one_line(prompt, message):
    with pytest.raises(InvalidRequest) as err:
        parse_travel(prompt, 16)
    assert err.value.field == "prompt" and message in str(err.value)


def test_frames_interpolate_between_keyframes_and_hold_outside_them():
    w = frame_weights([2, 6, 8], 10)
    assert w[:3] == [(0, 0, 0.0)] * 3  # held before the first keyframe
    assert w[4] == (0, 1, 0.5) and w[6] == (0, 1, 1.0) and w[7] == (1, 2, 0.5)
    assert w[8:] == [(2, 2, 0.0)] * 2  # and after the last


def test_a_straight_motion_is_rewritten_as_travel_between_positions():
    from danqing.synthetic.motion import travel_prompt

    assert travel_prompt("a red circle moving to the right") == (
        "0: a large red circle on the left\n15: a large red circle on the right")
    assert travel_prompt("a red circle moving to the right", size=None) == (
        "0: a red circle on the left\n15: a red circle on the right")
    assert travel_prompt("一个红色的圆形向上移动", 8) == "0: 一个大红色的圆形在下方\n7: 一个大红色的圆形在上方"
    assert travel_prompt("红色的圆形向上移动", 8, size="small") == "0: 小红色的圆形在下方\n7: 小红色的圆形在上方"
    assert travel_prompt("an orange star moving left", 8) == "0: a large orange star on the right\n7: a large orange star on the left"
    assert travel_prompt("a small blue star falling, on a white background") == (
        "0: a small blue star at the top, on a white background\n15: a small blue star at the bottom, on a white background")
    assert travel_prompt("a red circle") is None and travel_prompt("moving left") is None
    # each keyframe is a still-world caption the evaluator reads as the object at that place
    from danqing.synthetic.captions import parse_prompt

    frames = parse_travel(travel_prompt("a green cross moves to the left"), 16)
    assert [parse_prompt(text).position for _, text in frames] == ["right", "left"]


@pytest.fixture(scope="module")
def comps():
    return build_components("danqing-tiny", seed=1)


def _adapter(zero: bool):
    from diffusers import MotionAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        adapter = MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=1,
                                motion_num_attention_heads=2, motion_norm_num_groups=8,
                                motion_max_seq_length=16).eval()
    if zero:  # output projections zeroed: the module adds nothing, each frame is its own picture
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                if "proj_out" in name:
                    p.zero_()
    return adapter


def _clip(comps, unet, prompt, frames=4, **extra):
    req = VideoRequest.create(prompt=prompt, negative_prompt="blurry", steps=3, seed=7, width=64, height=64,
                              frames=frames, cfg_scale=6.0, sampler="DPM++ 2M")
    with torch.no_grad():
        return run_video(comps, unet, req, **RUN, **extra).latents[0]


def test_each_frame_is_conditioned_on_its_keyframe(comps):
    """With an identity motion module every frame is drawn on its own: a keyframe's frame of
    the travelling clip is that frame of a clip of the keyframe's prompt."""
    unet = motion_unet(comps.unet, _adapter(zero=True))
    travel = _clip(comps, unet, "a small\n0: red circle\n3: blue star\non a white background")
    red = _clip(comps, unet, "a small, red circle, on a white background")
    blue = _clip(comps, unet, "a small, blue star, on a white background")
    assert_close_scaled(travel[:, :, 0], red[:, :, 0])
    assert_close_scaled(travel[:, :, 3], blue[:, :, 3])
    between = travel[:, :, 1]
    assert (between - red[:, :, 1]).abs().max() > 1e-3 and (between - blue[:, :, 1]).abs().max() > 1e-3


def test_per_frame_mode_draws_each_frame_from_its_keyframe(comps):
    """No motion module (``frames_denoise``): each frame is a picture of its own context."""
    from danqing.sampling.video import frames_denoise

    travel = _clip(comps, comps.unet, "0: a red circle\n3: a blue star", denoise_fn=frames_denoise)
    assert_close_scaled(travel[:, :, 3], _clip(comps, comps.unet, "a blue star", denoise_fn=frames_denoise)[:, :, 3])


def test_one_text_at_every_keyframe_is_the_plain_prompt_also_in_context_windows(comps):
    unet = motion_unet(comps.unet, _adapter(zero=False))
    plain = _clip(comps, unet, "a red circle", frames=5)
    assert_close_scaled(_clip(comps, unet, "0: a red circle\n4: a red circle", frames=5), plain)
    windows = ContextDenoise(4, 2)
    assert_close_scaled(_clip(comps, unet, "a red circle\n0:\n4:", frames=5, denoise_fn=windows),
                        _clip(comps, unet, "a red circle", frames=5, denoise_fn=windows))
    # the travelling clip differs from either end's, in windows as at once
    moving = _clip(comps, unet, "0: a red circle\n4: a blue star", frames=5, denoise_fn=windows)
    assert (moving - _clip(comps, unet, "a red circle", frames=5, denoise_fn=windows)).abs().max() > 1e-3


def test_keyframes_of_different_lengths_are_padded_to_one(comps):
    """A keyframe of two 75-token chunks and one of one: the shorter prompt and its negative
    get the empty prompt's chunk (A1111's padding), so every frame has one token length."""
    from danqing.conditioning.schedule import ConditioningContext, build_conditioning
    from danqing.conditioning.travel import build_travel

    long = ", ".join(["a red circle"] * 30)
    req = VideoRequest.create(prompt=f"0: {long}\n3: a blue star", negative_prompt="blurry", frames=4, cfg_scale=6.0)
    encoder = ConditioningContext().text_encoder(comps, req.clip_skip)
    travel = build_travel(encoder, req, parse_travel(req.prompt, 4), batch=1, build=build_conditioning)
    context = travel.at(0).context  # (2, F, T, D): [negative; prompt], frame by frame
    assert context.shape[:3] == (2, 4, 154)
    with torch.no_grad():
        star, empty = encoder.encode("a blue star").hidden, encoder.encode("").hidden
        blurry, empty_neg = encoder.encode("blurry", negative=True).hidden, encoder.encode("", negative=True).hidden
    assert torch.equal(context[1, 3], torch.cat([star, empty], dim=1)[0])
    assert torch.equal(context[0, 3], torch.cat([blurry, empty_neg], dim=1)[0])
    assert torch.equal(context[0, 0], context[0, 3])  # one negative for every frame


def test_bundled_module_follows_a_travelling_prompt_on_held_out_clips(tmp_path):
    """danqing-tiny-motion without its LoRA, each held-out clip's prompt written as travel
    between the still world's positions (``synthetic.motion.travel_prompt``): the first 4 of
    the 50 held-out clips go the asked way (measured on all 50 in English: see docs/video.md),
    keep their object and move smoothly; the same prompt drawn frame by frame without the module
    reaches the ends too, but its object jumps (measured on 50: largest jump 0.05 against 0.52)."""
    from danqing import Settings, Studio
    from danqing.synthetic.motion import heldout_clips, motion_caption, travel_prompt
    from danqing.synthetic.trajectory import score_clip
    from danqing.video.studio import VideoStudio

    videos = VideoStudio(Studio(Settings(home=tmp_path, device="cpu", dtype="fp32")))
    for i, clip in enumerate(heldout_clips(4)):
        prompt = travel_prompt(motion_caption(clip, "en"))
        assert prompt.splitlines()[0].startswith("0: a ") and prompt.splitlines()[1].startswith("15: a ")
        req = VideoRequest(prompt=prompt, frames=16, width=64, height=64, steps=20, seed=6000 + i,
                           sampler="DPM++ 2M", cfg_scale=7.0, model="danqing-tiny")
        result = videos.generate(req)
        assert result.request.motion_module == "danqing-tiny-motion"
        score = score_clip(result.clips[0], clip.colour, clip.shape, clip.direction)
        assert score.direction and score.identity and score.object >= 0.85 and score.jump < 0.1, (prompt, score)
        if i == 0:
            alone = videos.generate(VideoRequest(prompt=prompt, frames=16, width=64, height=64, steps=20, seed=6000,
                                                 sampler="DPM++ 2M", cfg_scale=7.0, model="danqing-tiny",
                                                 motion=False)).clips[0]
            jumpy = score_clip(alone, clip.colour, clip.shape, clip.direction)
            assert jumpy.direction and jumpy.jump > 0.3, (prompt, jumpy)


def test_the_motion_trainer_conditions_travel_captions_as_generation_does():
    """``data.travel``: the trainer's per-frame contexts of a caption (``training.motion``) are
    the ones ``conditioning.travel`` gives the same caption rewritten by ``--travel`` at
    generation, frame for frame."""
    from danqing.conditioning.schedule import ConditioningContext, build_conditioning
    from danqing.conditioning.travel import build_travel
    from danqing.synthetic.motion import travel_prompt
    from danqing.training.motion import travel_context, travel_hidden
    from danqing.training.runs import load_float32

    comps = load_float32("danqing-tiny")[0]
    texts = ["a red circle moving to the right", "一个蓝色的星形向上移动"]
    hidden = travel_hidden(comps, texts, 16)
    assert hidden.shape[0] == 2 * len(texts) + 2
    trained = travel_context(hidden, torch.tensor([1, len(texts)]), 16).view(2, 16, 77, -1)
    req = VideoRequest.create(prompt=travel_prompt(texts[1], size=None), frames=16, cfg_scale=1.0)
    encoder = ConditioningContext().text_encoder(comps, req.clip_skip)
    made = build_travel(encoder, req, parse_travel(req.prompt, 16), batch=1, build=build_conditioning).at(0).context
    assert torch.allclose(trained[0], made[0], atol=1e-5)
    assert torch.equal(trained[1, 0], trained[1, 15]) and torch.equal(trained[1, 0], hidden[-1])  # dropped: empty
