"""Video-to-video: a clip's frames img2img'd through our loop with a motion module against
diffusers' ``AnimateDiffVideoToVideoPipeline``; cross-frame attention; the restyling remedies
measured on a rendered clip (must-show 3: flow-compensated flicker against naive per-frame
img2img, the asked colour kept by the evaluator).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_video import ADAPTER, SIZE, request, tiny_adapter  # noqa: F401 -- shared tiny configs

from danqing.models.families import build_components
from danqing.models.motion import motion_unet
from danqing.passes.video import clip_pixels, encode_clip, run_video
from danqing.sampling.noise import make_generators
from danqing.sampling.samplers import make_scheduler
from danqing.sampling.video import CrossFrameAttention, cross_frame_attention, frames_denoise, spatial_self_attentions
from danqing.video.flow import clip_flows, flow_blend, warping_error


def moving_clip(frames: int, size: int = SIZE, colour=(200, 30, 30)) -> list[Image.Image]:
    """A disc moving right over a textured background, ``frames`` RGB pictures."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for f in range(frames):
        bg = (120 + 60 * np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None]).repeat(3, 2)
        cx = size * (0.3 + 0.4 * f / max(frames - 1, 1))
        disc = (xx - cx) ** 2 + (yy - size / 2) ** 2 < (size / 6) ** 2
        bg[disc] = colour
        out.append(Image.fromarray(bg.clip(0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def comps():
    return build_components("danqing-tiny", seed=1)


@pytest.mark.parametrize("sampler,strength", [("Euler a", 0.6), ("DPM++ 2M", 0.5)])
def test_video2video_matches_animatediff_video2video_pipeline(comps, sampler, strength):
    from diffusers import AnimateDiffVideoToVideoPipeline

    adapter = tiny_adapter()
    unet = motion_unet(comps.unet, adapter)
    frames = moving_clip(3)
    req = request(sampler=sampler, steps=3, frames=3, denoising_strength=strength, init_video="clip.mp4")
    with torch.no_grad():
        ours = run_video(comps, unet, req, device="cpu", dtype=torch.float32, init_frames=frames).latents[0]
    pipe = AnimateDiffVideoToVideoPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=unet, motion_adapter=adapter,
        scheduler=make_scheduler(comps.scheduler_config, req.sampler, req.schedule, seed=req.seed))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(video=[frames], prompt=req.prompt, negative_prompt=req.negative_prompt, height=SIZE, width=SIZE,
                   num_inference_steps=req.steps, guidance_scale=req.cfg_scale, strength=strength,
                   generator=make_generators([req.seed]), output_type="latent").frames
    assert ours.shape == ref.shape == (1, 4, 3, 16, 16)
    assert (ours - ref).abs().max().item() < 1e-4
    if sampler == "Euler a":  # it starts from the clip: nearer the clip's latents than text-to-video
        with torch.no_grad():
            t2v = run_video(comps, unet, req.replace(init_video=None), device="cpu", dtype=torch.float32).latents[0]
        clip_lat = encode_clip(comps.vae, clip_pixels(frames), make_generators([0])[0])
        assert (ours - clip_lat).abs().mean() < (t2v - clip_lat).abs().mean()


def test_cross_frame_attention_reads_the_first_and_previous_frames(comps):
    """Frame 0 is unchanged (it attends to itself); a later frame changes when an earlier one
    does and not when a later one does; the UNet's own processors come back afterwards."""
    unet = comps.unet
    names = spatial_self_attentions(unet)
    assert names and all("attn1" in n for n in names)
    before = dict(unet.attn_processors)
    x = torch.randn(1, 4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    from danqing.sampling.loop import Conditioning

    cond = Conditioning(ctx, None)
    t = torch.tensor(500)
    with torch.no_grad():
        plain = frames_denoise(unet, x, t, cond, 1.0, False)
        with cross_frame_attention(unet, 4):
            assert all(isinstance(unet.attn_processors[n], CrossFrameAttention) for n in names)
            cross = frames_denoise(unet, x, t, cond, 1.0, False)
            x2 = x.clone()
            x2[:, :, 3] += 1.0  # the last frame changed
            later = frames_denoise(unet, x2, t, cond, 1.0, False)
            x3 = x.clone()
            x3[:, :, 1] += 1.0  # frame 1 changed: frame 2 reads it as its previous frame
            earlier = frames_denoise(unet, x3, t, cond, 1.0, False)
    assert dict(unet.attn_processors) == before
    assert torch.allclose(cross[:, :, 0], plain[:, :, 0], atol=1e-5)
    assert (cross[:, :, 1:] - plain[:, :, 1:]).abs().max() > 1e-3
    assert torch.allclose(later[:, :, :3], cross[:, :, :3], atol=1e-5)
    assert (earlier[:, :, 2] - cross[:, :, 2]).abs().max() > 1e-3


def test_flow_blend_evens_out_flicker_along_the_motion():
    """A clip moving 1 pixel a frame: its own warping error is near 0; noise added frame by frame
    (flicker) raises it; blending along the flow lowers it again; strength 0 changes nothing."""
    clip = moving_clip(8)
    flows = clip_flows(clip)
    assert warping_error(clip, flows) < 0.01
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray((np.asarray(f, np.float32) + rng.normal(0, 12, (SIZE, SIZE, 3))).clip(0, 255)
                             .astype(np.uint8)) for f in clip]
    blended = flow_blend(noisy, flows, 0.5)
    assert warping_error(noisy, flows) > 0.03
    assert warping_error(blended, flows) < 0.6 * warping_error(noisy, flows)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(flow_blend(noisy, flows, 0.0), noisy))
