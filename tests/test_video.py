"""Video: our loop over (B, C, F, h, w) latents with an AnimateDiff motion UNet against
diffusers' ``AnimateDiffPipeline``; motion modules from folders and original single files;
MP4/GIF/WebP/PNG frames with their parameters; the ``danqing video`` command and its bad input.

The checkpoint is danqing-tiny's architecture with random weights (3 blocks of 32/64/64
channels, one layer each); a random ``MotionAdapter`` of the same blocks fits it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from parity import assert_close_scaled

from danqing.errors import InvalidRequest
from danqing.models.families import build_components
from danqing.models.motion import adapter_to_original, check_fits, load_motion_adapter, motion_unet, original_config
from danqing.models.registry import ModelEntry
from danqing.outputs.video import probe_video, read_frames, read_video_parameters, save_video
from danqing.passes.video import run_video
from danqing.request_video import VideoRequest
from danqing.sampling.loop import STOP
from danqing.sampling.noise import initial_noise, make_generators
from danqing.sampling.samplers import make_scheduler
from danqing.sampling.video import ContextDenoise, context_windows, video_noise

ADAPTER = dict(block_out_channels=(32, 64, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
               motion_norm_num_groups=8, motion_max_seq_length=16)
SIZE = 64
PROMPT = "a red circle moving to the right"


def tiny_adapter(seed: int = 0, **changes):
    from diffusers import MotionAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MotionAdapter(**{**ADAPTER, **changes}).eval()


@pytest.fixture(scope="module")
def comps():
    return build_components("danqing-tiny", seed=1)


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter()


@pytest.fixture(scope="module")
def unet(comps, adapter):
    return motion_unet(comps.unet, adapter)


@pytest.fixture(scope="module")
def video_home(tmp_path_factory, adapter):
    """A danqing home whose models folder holds a motion module (a diffusers folder) that fits
    the bundled danqing-tiny (its trained weights; the module random)."""
    home = tmp_path_factory.mktemp("video-home")
    adapter.save_pretrained(home / "models" / "motion" / "tiny-mm")
    adapter.save_pretrained(home / "models" / "elsewhere" / "mm")  # a real module outside models/motion/
    return home


def pipeline_latents(pipe, req: VideoRequest, gens, noise, **extra) -> torch.Tensor:
    """A diffusers video pipeline's final latents for ``req``, from the given noise and generators."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(req.prompt, negative_prompt=req.negative_prompt, num_frames=req.frames, height=req.height,
                    width=req.width, num_inference_steps=req.steps, guidance_scale=req.cfg_scale, generator=gens,
                    latents=noise, output_type="latent", **extra).frames


def request(**changes) -> VideoRequest:
    fields = dict(prompt=PROMPT, negative_prompt="blurry", steps=3, seed=7, width=SIZE, height=SIZE, frames=4,
                  cfg_scale=6.0)
    return VideoRequest.create(**{**fields, **changes})


# -- must-show 1: parity with diffusers' AnimateDiffPipeline -----------------------------------
@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_loop_matches_animatediff_pipeline(comps, adapter, unet, sampler):
    from diffusers import AnimateDiffPipeline

    req = request(sampler=sampler)
    with torch.no_grad():
        ours = run_video(comps, unet, req, device="cpu", dtype=torch.float32).latents[0]
    # the same per-frame noise, and the generator advanced past it, as ours is (ancestral steps)
    gens = make_generators([req.seed])
    noise = video_noise(tuple(ours.shape[1:]), gens)
    pipe = AnimateDiffPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=unet,
                               motion_adapter=adapter,
                               scheduler=make_scheduler(comps.scheduler_config, req.sampler, req.schedule, seed=req.seed))
    ref = pipeline_latents(pipe, req, gens, noise)
    assert ours.shape == ref.shape == (1, 4, req.frames, 16, 16)
    assert (ours - ref).abs().max().item() < 1e-4
    assert_close_scaled(ours, ref, what=sampler)
    # the motion modules act: the frames of the clip differ from each other
    assert (ours[:, :, 0] - ours[:, :, 1]).abs().max() > 1e-2


def test_identity_motion_module_gives_each_seed_its_picture(comps):
    """With its output projections zeroed, a motion module adds nothing: frame 0 of a clip is
    then txt2img's picture of the same seed (frame 0's noise is the picture's)."""
    from danqing.passes.txt2img import run_txt2img
    from danqing.request import GenerationRequest

    adapter = tiny_adapter(seed=5)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "proj_out" in name:
                p.zero_()
        req = request(sampler="DPM++ 2M", frames=3, prompt="[a red circle:a blue star:2]", cfg_scale=1.0)
        clip = run_video(comps, motion_unet(comps.unet, adapter), req, device="cpu", dtype=torch.float32).latents[0]
        still = {k: v for k, v in req.model_dump().items() if k in GenerationRequest.model_fields}
        picture = run_txt2img(comps, GenerationRequest.create(**still), device="cpu", dtype=torch.float32).latents[0]
    assert_close_scaled(clip[:, :, 0], picture)
    assert (clip[:, :, 1] - picture).abs().max() > 1e-2  # frame 1 has its own noise


@pytest.mark.parametrize("frames,length,overlap,starts", [
    (8, 16, 4, [0]), (16, 16, 4, [0]), (20, 16, 4, [0, 4]), (40, 16, 4, [0, 12, 24]), (10, 4, 1, [0, 3, 6]),
    (11, 4, 2, [0, 2, 4, 6, 7]),
])
def test_context_windows_cover_the_clip_with_their_overlap(frames, length, overlap, starts):
    windows = context_windows(frames, length, overlap)
    assert [w[0] for w in windows] == starts
    assert all(w == list(range(w[0], w[0] + min(length, frames))) for w in windows)
    assert sorted({f for w in windows for f in w}) == list(range(frames))
    assert all(len(set(a) & set(b)) >= overlap for a, b in zip(windows, windows[1:]))


def test_sliding_context_changes_nothing_for_frames_the_module_keeps_apart(comps, unet):
    """Windows only matter through the motion layers: with them zeroed (identity), a long clip
    in windows is the clip at once; with them acting, the windows change the result."""
    req = request(sampler="DPM++ 2M", frames=5, steps=2, cfg_scale=1.0)
    identity = tiny_adapter(seed=5)
    with torch.no_grad():
        for name, p in identity.named_parameters():
            if "proj_out" in name:
                p.zero_()
        plain_unet = motion_unet(comps.unet, identity)
        run = dict(device="cpu", dtype=torch.float32)
        whole = run_video(comps, plain_unet, req, **run).latents[0]
        windowed = run_video(comps, plain_unet, req, denoise_fn=ContextDenoise(4, 2), **run).latents[0]
        assert_close_scaled(windowed, whole)
        acting = run_video(comps, unet, req, **run).latents[0]
        acting_windowed = run_video(comps, unet, req, denoise_fn=ContextDenoise(4, 2), **run).latents[0]
    assert (acting_windowed - acting).abs().max() > 1e-3


def test_per_frame_noise_is_reproducible_from_the_seed():
    short = video_noise((4, 3, 8, 8), make_generators([5]))
    long = video_noise((4, 6, 8, 8), make_generators([5]))
    assert torch.equal(long[:, :, :3], short)  # a longer clip starts as the shorter one
    assert torch.equal(short[:, :, 0], initial_noise((4, 8, 8), make_generators([5])))  # frame 0 = the picture's noise
    two = video_noise((4, 3, 8, 8), make_generators([5, 6]))
    assert torch.equal(two[:1], short) and not torch.equal(two[1], two[0])


def test_callbacks_see_every_step_and_stop_interrupts(comps, unet):
    seen = []

    def on_step(info):
        seen.append((info.step, info.total, tuple(info.latents.shape), info.preview().size))
        return STOP if info.step == 2 else None

    with torch.no_grad():
        out = run_video(comps, unet, request(steps=3, batch_count=2, cfg_scale=1.0), device="cpu", dtype=torch.float32,
                        on_step=on_step)
    assert out.interrupted and len(out.latents) == 1
    assert seen == [(1, 3, (1, 4, 4, 16, 16), (16, 16)), (2, 3, (1, 4, 4, 16, 16), (16, 16))]


# -- motion modules: folders, original single files, fit ---------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_original_layout_file_loads_to_the_same_weights(tmp_path, suffix):
    from safetensors.torch import save_file

    adapter = tiny_adapter(seed=3, motion_max_seq_length=24)
    sd = adapter_to_original(adapter)
    assert any(k.endswith("temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe") for k in sd)
    assert not any(".attn1." in k or ".norm1." in k for k in sd)
    path = tmp_path / f"mm_sd_v15_tiny{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    config = original_config(sd, path)
    assert config == {"block_out_channels": [32, 64, 64], "motion_layers_per_block": 1,
                      "motion_transformer_layers_per_block": 1, "use_motion_mid_block": True,
                      "motion_max_seq_length": 24}
    loaded = load_motion_adapter(ModelEntry(path.stem, path, "motion", suffix.lstrip(".")))
    want, got = adapter.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_motion_module_of_another_family_is_refused(comps):
    other = tiny_adapter(block_out_channels=(32, 64), motion_norm_num_groups=8)
    with pytest.raises(InvalidRequest, match=r"does not fit checkpoint 'tiny-video' \(blocks of \[32, 64, 64\]"):
        check_fits(other, dict(comps.unet.config), motion_name="mm-2blocks", model_name="tiny-video")


# -- requests and files ------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("frames", 0, "frames: must be between 1 and 128, got 0"),
    ("frames", 500, "frames: must be between 1 and 128, got 500"),
    ("fps", 0, "fps: must be between 1 and 60 frames per second, got 0"),
    ("enable_hr", True, "enable_hr: is not available for video yet"),
])
def test_video_request_bad_input_is_one_line(field, value, message):
    with pytest.raises(InvalidRequest) as exc:
        request(**{field: value})
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_video_request_round_trips_through_json():
    req = request(frames=12, fps=24, motion_module="tiny-mm")
    assert VideoRequest.from_json(req.to_json()) == req


def test_gif_webp_and_png_frames_hold_the_clip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(5)]
    text = json.dumps({"request": {"frames": 5}})
    for suffix in (".gif", ".webp"):
        path = tmp_path / f"clip{suffix}"
        written = save_video(frames, path, 10, text)
        assert written == [path, tmp_path / f"clip{suffix}.json"]
        info = probe_video(path)
        assert (info.frames, info.width, info.height, info.fps) == (5, 48, 32, 10.0)
        assert read_video_parameters(path) == text
    # WebP is written lossless: the frames come back exactly
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(read_frames(tmp_path / "clip.webp"), frames))
    written = save_video(frames, tmp_path / "f.png", 10, text)
    assert [p.name for p in written] == [f"f-{i:03d}.png" for i in range(5)] + ["f.png.json"]
    assert Image.open(written[2]).info["parameters"] == text
    assert not list(tmp_path.glob(".*.tmp"))


def test_input_video_over_the_limits_is_refused(tmp_path, monkeypatch):
    import danqing.outputs.video as video

    frames = [np.full((16, 16, 3), i * 30, np.uint8) for i in range(6)]
    from PIL import Image

    path = tmp_path / "in.mp4"
    save_video([Image.fromarray(f) for f in frames], path, 8, "{}")
    monkeypatch.setattr(video, "MAX_INPUT_FRAMES", 4)
    with pytest.raises(InvalidRequest, match=r"frames 6 is over the limit of 4"):
        read_frames(path)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(InvalidRequest, match=r"cannot be decoded"):
        probe_video(tmp_path / "bad.mp4")


# -- the command ---------------------------------------------------------------------------
def run_cli(capsys, home, *args):
    from danqing.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--home", str(home), "--device", "cpu", "--dtype", "fp32", *args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cli_video_mp4_decodes_and_from_recreates_it(video_home, capsys, tmp_path):
    """Must-show 4: the MP4 decodes to the asked frame count, size and fps; ``danqing info``
    reads its parameters; ``--from`` on it re-creates identical frames."""
    clip = tmp_path / "clip.mp4"
    args = ["video", PROMPT, "--frames", "8", "--fps", "8", "--steps", "2", "--cfg", "1", "--seed", "11", "--width", "64",
            "--height", "64", "--model", "danqing-tiny", "-q"]
    code, out, err = run_cli(capsys, video_home, *args, "--out", str(clip))
    assert code in (0, None), err
    assert out.split() == [str(clip), str(clip) + ".json"]
    info = probe_video(clip)
    assert (info.frames, info.width, info.height, info.fps) == (8, 64, 64, 8.0)
    first = read_frames(clip)
    assert len(first) == 8 and first[0].shape == (64, 64, 3)

    code, out, _ = run_cli(capsys, video_home, "info", str(clip))
    params = json.loads(out)
    assert params["request"]["frames"] == 8 and params["request"]["seed"] == 11
    assert params["request"]["motion_module"] == "tiny-mm" and len(params["motion_module_hash"]) == 10
    assert json.loads((tmp_path / "clip.mp4.json").read_text()) == params

    again = tmp_path / "again.mp4"
    code, _, err = run_cli(capsys, video_home, "video", "--from", str(clip), "--out", str(again), "-q")
    assert code in (0, None), err
    assert all(np.array_equal(a, b) for a, b in zip(read_frames(again), first)) and len(read_frames(again)) == 8


def test_mp4_of_the_same_frames_is_the_same_file_whatever_the_heap_holds(tmp_path):
    """The same frames give the same MP4 bytes, even with the heap scribbled between encodes
    (x264's SIMD paths read memory they never wrote: with them, 20 encodes gave up to four
    different bitstreams)."""
    import ctypes
    import hashlib

    from PIL import Image

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    frames = [Image.fromarray(np.stack([(xx * 4 + 9 * i) % 256, (yy * 4) % 256, (xx + yy + 5 * i) % 256],
                                       -1).astype(np.uint8)) for i in range(8)]
    digests = set()
    for k in range(20):
        sizes = rng.integers(1_000, 200_000, 200)
        blocks = [libc.malloc(int(n)) for n in sizes]
        for block, size, fill in zip(blocks, sizes, rng.integers(1, 255, len(blocks))):
            ctypes.memset(block, int(fill), int(size))
        for block in blocks:
            libc.free(ctypes.c_void_p(block))
        save_video(frames, tmp_path / f"c{k}.mp4", 8, "{}")
        digests.add(hashlib.sha256((tmp_path / f"c{k}.mp4").read_bytes()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize("args,message", [
    (["--out", "clip.avi"], "cannot write a video as .avi; use one of .mp4 (MP4 (H.264)), .gif (GIF), .webp"),
    (["--frames", "0", "--out", "c.mp4"], "frames: must be between 1 and 128"),
    (["--fps", "61", "--out", "c.mp4"], "fps: must be between 1 and 60"),
    (["--frames", "20", "--context-overlap", "16", "--out", "c.mp4"],
     "context_overlap: must be less than motion module 'tiny-mm'\'s window of 16 frames, got 16"),
    (["--motion", "../elsewhere/mm", "--out", "c.mp4"], "unknown motion module '../elsewhere/mm': give the name of "
                                                         "a model installed in models/motion/ (names only, never "
                                                         "paths); installed: tiny-mm"),
    (["--motion", "ELSEWHERE", "--out", "c.mp4"], "unknown motion module"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(video_home, capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    args = [str(video_home / "models" / "elsewhere" / "mm") if a == "ELSEWHERE" else a for a in args]
    code, _, err = run_cli(capsys, video_home, "video", PROMPT, "--model", "danqing-tiny", "--width", "64",
                           "--height", "64", "--steps", "1", "-q", *args)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_cli_travel_keyframe_past_the_clip_is_one_line(video_home, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, video_home, "video", "a red circle\n0: on the left\n20: on the right", "--model",
                           "danqing-tiny", "--width", "64", "--height", "64", "--frames", "16", "--steps", "1", "-q",
                           "--out", "c.mp4")
    assert code == 2 and err.count("\n") == 1, err
    assert "prompt: prompt travel: keyframe 20 is past the clip's last frame (15); keyframes are 0-15" in err
    assert not list(tmp_path.iterdir())


def test_cli_travel_rewrites_a_straight_motion_and_refuses_other_prompts(video_home, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--model", "danqing-tiny", "--width", "64", "--height", "64", "--frames", "8", "--steps", "1", "-q",
            "--travel"]
    code, _, err = run_cli(capsys, video_home, "video", "a red circle", *base, "--out", "c.mp4")
    assert code == 2 and err.count("\n") == 1 and "--travel rewrites a straight motion" in err, err
    assert not list(tmp_path.iterdir())
    code, out, _ = run_cli(capsys, video_home, "video", "a red circle moving up", *base, "--out", "c.gif")
    assert code == 0
    sidecar = json.loads((tmp_path / "c.gif.json").read_text())
    assert sidecar["request"]["prompt"] == "0: a large red circle at the bottom\n7: a large red circle at the top"


def test_cli_from_a_file_without_parameters(video_home, capsys, tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"\0" * 64)
    code, _, err = run_cli(capsys, video_home, "video", "--from", str(tmp_path / "x.mp4"), "--out",
                           str(tmp_path / "y.mp4"))
    assert code == 2 and "cannot be decoded" in err and not (tmp_path / "y.mp4").exists()


# -- SDXL motion modules (AnimateDiff SDXL) -----------------------------------------------------
@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler a"])
def test_sdxl_motion_module_matches_animatediff_sdxl_pipeline(sampler):
    """An SDXL motion module (blocks of the SDXL UNet's channels, no mid-block module, as
    AnimateDiff's SDXL beta) on the tiny SDXL checkpoint: our loop with its added conditioning
    (pooled text, size and crop ids) equals diffusers' ``AnimateDiffSDXLPipeline``; a module of
    SD1.5's shape is refused on it."""
    from diffusers import AnimateDiffSDXLPipeline

    sdxl = build_components("tiny-sdxl", seed=2)
    adapter = tiny_adapter(block_out_channels=(32, 64), motion_norm_num_groups=8, use_motion_mid_block=False)
    check_fits(adapter, dict(sdxl.unet.config), motion_name="mm-sdxl", model_name="tiny-sdxl")
    unet = motion_unet(sdxl.unet, adapter)
    req = request(sampler=sampler)
    with torch.no_grad():
        ours = run_video(sdxl, unet, req, device="cpu", dtype=torch.float32).latents[0]
    gens = make_generators([req.seed])
    noise = video_noise(tuple(ours.shape[1:]), gens)
    pipe = AnimateDiffSDXLPipeline(  # given the motion UNet: its own from_unet2d leaves add_embedding random
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2, tokenizer=sdxl.tokenizer,
        tokenizer_2=sdxl.tokenizer_2, unet=unet, motion_adapter=adapter, force_zeros_for_empty_prompt=True,
        scheduler=make_scheduler(sdxl.scheduler_config, req.sampler, req.schedule, seed=req.seed))
    ref = pipeline_latents(pipe, req, gens, noise)
    assert ours.shape == ref.shape == (1, 4, req.frames, 32, 32)  # this tiny VAE halves the sides
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours[:, :, 0] - ours[:, :, 1]).abs().max() > 1e-2
    with pytest.raises(InvalidRequest, match=r"motion module 'mm-sd15' .* does not fit checkpoint 'tiny-sdxl'"):
        check_fits(tiny_adapter(), dict(sdxl.unet.config), motion_name="mm-sd15", model_name="tiny-sdxl")


def test_sdxl_motion_unet_with_a_still_module_is_the_picture_unet():
    """With its output projections at zero a motion module adds nothing, so the SDXL motion UNet
    must give every frame the picture UNet's prediction, added conditioning included (diffusers'
    ``from_unet2d`` alone leaves SDXL's ``add_embedding`` random; ``motion_unet`` copies it)."""
    sdxl = build_components("tiny-sdxl", seed=2)
    adapter = tiny_adapter(block_out_channels=(32, 64), motion_norm_num_groups=8, use_motion_mid_block=False)
    for name, module in adapter.named_modules():
        if name.endswith("proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    unet = motion_unet(sdxl.unet, adapter)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 3, 32, 32, generator=g), torch.randn(1, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        clip = unet(x, torch.tensor(500), encoder_hidden_states=ctx.repeat(3, 1, 1), added_cond_kwargs=added).sample
        for f in range(3):
            frame = sdxl.unet(x[:, :, f], torch.tensor(500), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            assert (clip[:, :, f] - frame).abs().max().item() < 1e-5, f


def test_a_request_naming_no_module_takes_the_only_installed_else_the_bundled_one(tmp_path, monkeypatch):
    from danqing import Settings, Studio
    from danqing.models import registry as registry_module
    from danqing.models.registry import ModelEntry
    from danqing.video import studio as video_studio
    from danqing.video.studio import VideoStudio

    tiny_adapter().save_pretrained(tmp_path / "package" / "danqing-tiny-motion")
    shipped = lambda: [ModelEntry("danqing-tiny-motion", tmp_path / "package" / "danqing-tiny-motion", "motion",  # noqa: E731
                                  "diffusers")]
    monkeypatch.setattr(video_studio, "bundled_motion_entries", shipped)
    monkeypatch.setitem(registry_module.BUNDLED_KINDS, "motion", shipped)
    videos = VideoStudio(Studio(Settings(home=tmp_path / "home", device="cpu", dtype="fp32")))
    assert videos._motion_name(None) == "danqing-tiny-motion"          # none installed: the bundled one
    tiny_adapter().save_pretrained(tmp_path / "home" / "models" / "motion" / "mine")
    assert videos._motion_name(None) == "mine"                         # the one installed wins
    tiny_adapter().save_pretrained(tmp_path / "home" / "models" / "motion" / "other")
    with pytest.raises(InvalidRequest, match="name the motion module to use; installed in models/motion/: "
                                             "mine, other, danqing-tiny-motion"):
        videos._motion_name(None)
    assert videos._motion_name("danqing-tiny-motion") == "danqing-tiny-motion"
