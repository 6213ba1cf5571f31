"""Per-frame ControlNet for video: our loop with a motion UNet and ControlNet residuals against
diffusers' ``AnimateDiffControlNetPipeline``; each context window with its own frames' maps;
per-frame mode with ControlNets; and the bundled danqing-tiny with its canny ControlNet following
a control clip frame by frame (``danqing video --control canny:CLIP.mp4``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_video import pipeline_latents

from danqing.conditioning.control import ControlDenoise, PreparedControl, image_tensor
from danqing.models.families import build_components
from danqing.models.motion import motion_unet
from danqing.passes.video import run_video
from danqing.request_video import VideoRequest
from danqing.sampling.noise import make_generators
from danqing.sampling.samplers import make_scheduler
from danqing.sampling.video import ContextDenoise, VideoControlDenoise, video_noise

ADAPTER = dict(block_out_channels=(32, 64, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
               motion_norm_num_groups=8, motion_max_seq_length=16)
SIZE = 64


def tiny_adapter(seed: int = 0, still: bool = False):
    """A random ``MotionAdapter`` for danqing-tiny; ``still``: its output projections at zero,
    so the motion UNet draws every frame as the still UNet does."""
    from diffusers import MotionAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = MotionAdapter(**ADAPTER).eval()
    if still:
        for name, module in adapter.named_modules():
            if name.endswith("proj_out"):
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
    return adapter


@pytest.fixture(scope="module")
def comps():
    return build_components("danqing-tiny", seed=1)


@pytest.fixture(scope="module")
def controlnet(comps):
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = ControlNetModel.from_unet(comps.unet, conditioning_embedding_out_channels=(16, 32, 64)).eval()
        for p in model.parameters():  # ControlNet's zero convolutions made non-zero, so its residuals count
            if p.dim() == 4 and p.shape[-1] == 1:
                p.data.normal_(0, 0.05)
        model.controlnet_cond_embedding.conv_out.weight.data.normal_(0, 0.05)  # and so does the map
    return model


def moving_maps(frames: int) -> list[Image.Image]:
    """Edge-like maps of a white square crossing a black picture to the right, one per frame."""
    out = []
    for f in range(frames):
        a = np.zeros((SIZE, SIZE, 3), np.uint8)
        x = 6 + 10 * f
        a[24:40, x:x + 16] = 255
        out.append(Image.fromarray(a))
    return out


def request(**changes) -> VideoRequest:
    fields = dict(prompt="a red circle", negative_prompt="blurry", steps=3, seed=7, width=SIZE, height=SIZE,
                  frames=4, cfg_scale=6.0, sampler="DPM++ 2M")
    return VideoRequest.create(**{**fields, **changes})


def control_of(model, maps: list[Image.Image], weight: float = 1.0) -> ControlDenoise:
    return ControlDenoise([PreparedControl(model, "controlnet", torch.cat([image_tensor(m) for m in maps]), weight)])


# -- parity with diffusers' AnimateDiffControlNetPipeline ------------------------------------------
@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_loop_with_per_frame_controlnet_matches_animatediff_controlnet_pipeline(comps, controlnet, weight):
    from diffusers import AnimateDiffControlNetPipeline

    adapter = tiny_adapter()
    unet = motion_unet(comps.unet, adapter)
    req = request()
    maps = moving_maps(req.frames)
    with torch.no_grad():
        ours = run_video(comps, unet, req, device="cpu", dtype=torch.float32,
                         denoise_fn=VideoControlDenoise(control_of(controlnet, maps, weight))).latents[0]
        plain = run_video(comps, unet, req, device="cpu", dtype=torch.float32).latents[0]
    gens = make_generators([req.seed])
    noise = video_noise(tuple(ours.shape[1:]), gens)
    pipe = AnimateDiffControlNetPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        motion_adapter=adapter, controlnet=controlnet,
        scheduler=make_scheduler(comps.scheduler_config, req.sampler, req.schedule, seed=req.seed))
    ref = pipeline_latents(pipe, req, gens, noise, conditioning_frames=maps, controlnet_conditioning_scale=weight)
    assert ours.shape == ref.shape == (1, 4, req.frames, 16, 16)
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - plain).abs().max().item() > 1e-2  # the ControlNet acts


def test_each_context_window_gets_its_own_frames_maps(comps, controlnet):
    """With a motion module that keeps the frames apart, a 6-frame clip in windows of 4 equals
    the clip in one window: each window's frames took their own maps (misplaced maps would not)."""
    unet = motion_unet(comps.unet, tiny_adapter(still=True))
    req = request(frames=6)
    maps = moving_maps(6)
    with torch.no_grad():
        whole = run_video(comps, unet, req, device="cpu", dtype=torch.float32,
                          denoise_fn=VideoControlDenoise(control_of(controlnet, maps))).latents[0]
        windows = run_video(comps, unet, req, device="cpu", dtype=torch.float32,
                            denoise_fn=ContextDenoise(4, 2, VideoControlDenoise(control_of(controlnet, maps)))
                            ).latents[0]
        reversed_maps = run_video(comps, unet, req, device="cpu", dtype=torch.float32,
                                  denoise_fn=ContextDenoise(4, 2, VideoControlDenoise(control_of(controlnet,
                                                                                                 maps[::-1])))
                                  ).latents[0]
    assert (whole - windows).abs().max().item() < 1e-4
    assert (whole - reversed_maps).abs().max().item() > 1e-2


def test_guidance_end_counts_steps_not_windows(comps, controlnet):
    """guidance_end = 0.5 stops the ControlNet after half the steps, however many context
    windows each step runs (the evaluation is counted once per step)."""
    unet = motion_unet(comps.unet, tiny_adapter(still=True))
    req = request(frames=6, steps=4)
    maps = moving_maps(6)

    def half(maps):
        c = control_of(controlnet, maps)
        c.units[0] = PreparedControl(c.units[0].model, "controlnet", c.units[0].image, 1.0, 0.0, 0.5)
        return c

    with torch.no_grad():
        whole = run_video(comps, unet, req, device="cpu", dtype=torch.float32,
                          denoise_fn=VideoControlDenoise(half(maps))).latents[0]
        windows = run_video(comps, unet, req, device="cpu", dtype=torch.float32,
                            denoise_fn=ContextDenoise(4, 2, VideoControlDenoise(half(maps)))).latents[0]
    assert (whole - windows).abs().max().item() < 1e-4


def test_per_frame_mode_runs_each_frame_with_its_map_as_a_picture(comps, controlnet):
    """Per-frame mode (no motion module) with a ControlNet: frame f of the clip is the picture
    txt2img would make from frame f's noise and map (the ControlNet's own denoise)."""
    from danqing.conditioning.schedule import ConditioningContext, build_conditioning
    from danqing.sampling.loop import sample

    req = request(frames=3)
    maps = moving_maps(3)
    with torch.no_grad():
        clip = run_video(comps, comps.unet, req, device="cpu", dtype=torch.float32,
                         denoise_fn=VideoControlDenoise(control_of(controlnet, maps), per_frame=True)).latents[0]
    noise = video_noise(tuple(clip.shape[1:]), make_generators([req.seed]))
    cond = build_conditioning(ConditioningContext().text_encoder(comps, req.clip_skip), req, batch=1)
    for f in range(3):
        sched = make_scheduler(comps.scheduler_config, req.sampler, req.schedule, seed=req.seed)
        with torch.no_grad():
            one = sample(comps.unet, sched, noise[:, :, f], cond, steps=req.steps, cfg_scale=req.cfg_scale,
                         generators=make_generators([req.seed]), denoise_fn=control_of(controlnet, [maps[f]]))
        # one picture against the same picture inside a batch of frames: the same sums in another
        # GEMM order (measured up to 1.06e-4 on a 2-core machine), so a bound of 5e-4
        assert (one.latents - clip[:, :, f]).abs().max().item() < 5e-4, f


# -- the bundled danqing-tiny with its canny ControlNet, following a control clip ------------------
@pytest.fixture(scope="module")
def still_home(tmp_path_factory):
    """A danqing home whose models/motion/ holds a motion module that leaves the frames apart
    (output projections at zero): what moves the object is then the ControlNet alone."""
    home = tmp_path_factory.mktemp("video-control-home")
    tiny_adapter(still=True).save_pretrained(home / "models" / "motion" / "still-mm")
    return home


def control_clip(path, direction: str, frames: int = 8):
    """A rendered clip of the moving shapes world (a red circle going ``direction``) as a file."""
    from danqing.outputs.video import save_video
    from danqing.synthetic.motion import MotionClip
    from danqing.synthetic.render import render

    start, end = {"right": ((0.25, 0.5), (0.75, 0.5)), "left": ((0.75, 0.5), (0.25, 0.5))}[direction]
    clip = MotionClip("red", "circle", "large", direction, start, end, frames=frames)
    save_video([render(s, SIZE) for s in clip.scenes()], path, 8, "{}")
    return path


def run_cli(capsys, home, *args):
    from danqing.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--home", str(home), "--device", "cpu", "--dtype", "fp32", *args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("direction", ["right", "left"])
def test_cli_video_follows_a_control_clip_frame_by_frame(still_home, tmp_path, capsys, direction):
    """``danqing video "a red circle" --control canny:CLIP --control-preprocess``: every frame's
    object sits where the control clip's is, so the clip moves the control clip's way (the
    trajectory scorer), which the same request without the ControlNet does not; the clip's
    parameters name the unit and its ControlNet's hash, and ``--from`` re-creates it."""
    from danqing.outputs.video import read_frames, read_video_parameters
    from danqing.synthetic.trajectory import score_clip

    clip = control_clip(tmp_path / f"{direction}.mp4", direction)
    args = ["video", "a red circle", "--frames", "8", "--width", "64", "--height", "64", "--steps", "12",
            "--seed", "5", "--motion", "still-mm", "-q"]
    for extra, name in ((["--control", f"canny:{clip}", "--control-preprocess"], "c.mp4"), ([], "plain.mp4")):
        code, _, err = run_cli(capsys, still_home, *args, *extra, "--out", str(tmp_path / name))
        assert code in (0, None), err
    frames = [Image.fromarray(a) for a in read_frames(tmp_path / "c.mp4")]
    plain = [Image.fromarray(a) for a in read_frames(tmp_path / "plain.mp4")]
    got = score_clip(frames, "red", "circle", direction)
    assert got.direction and got.identity and got.object >= 0.85, got
    assert not score_clip(plain, "red", "circle", direction).direction
    params = json.loads(read_video_parameters(tmp_path / "c.mp4"))
    assert params["request"]["controlnet"][0]["model"] == "danqing-tiny-canny"
    assert params["request"]["controlnet"][0]["module"] == "canny"
    assert len(params["controlnet_hashes"]) == 1
    code, _, err = run_cli(capsys, still_home, "video", "--from", str(tmp_path / "c.mp4"), "--out",
                           str(tmp_path / "again.mp4"), "-q")
    assert code in (0, None), err
    again = read_frames(tmp_path / "again.mp4")
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(again, frames))


def test_bad_control_for_video_is_one_line_and_writes_nothing(still_home, tmp_path, capsys):
    """A control clip shorter than the video, a ControlNet with image-to-video, a T2I-Adapter on
    a motion module: one line each, exit 2, no file."""
    from danqing.errors import InvalidRequest

    short = control_clip(tmp_path / "short.gif", "right", frames=4)
    args = ["video", "a red circle", "--frames", "8", "--width", "64", "--height", "64", "--steps", "2",
            "--motion", "still-mm", "-q", "--out", str(tmp_path / "x.mp4")]
    code, out, err = run_cli(capsys, still_home, *args, "--control", f"canny:{short}", "--control-preprocess")
    assert code == 2 and "control clip" in err and "has 4 frames; the video asks for 8" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.mp4").exists()
    Image.new("RGB", (64, 64), "white").save(tmp_path / "start.png")
    with pytest.raises(InvalidRequest, match=r"^controlnet: image-to-video .* takes no ControlNet"):
        request(prompt="", negative_prompt="", init_image=str(tmp_path / "start.png"), sampler="Euler",
                controlnet=({"model": "danqing-tiny-canny", "image": str(tmp_path / "start.png")},))


def test_t2i_adapter_on_a_motion_unet_is_refused_before_sampling():
    from danqing.errors import InvalidRequest

    t2i = ControlDenoise([PreparedControl(object(), "t2i", torch.zeros(1, 3, 64, 64))])
    with pytest.raises(InvalidRequest, match="^controlnet: T2I-Adapters work on video in per-frame mode only"):
        VideoControlDenoise(t2i)
    assert VideoControlDenoise(t2i, per_frame=True).per_frame  # a picture UNet takes its features
