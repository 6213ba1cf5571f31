"""ModelScope / zeroscope text-to-video (``UNet3DConditionModel``) through danqing's own loop:
the final latents equal those of diffusers' ``TextToVideoSDPipeline`` for the same noise, seed
and scheduler (tiny random 3D UNet over danqing-tiny's text encoder and VAE, fp32)."""

from __future__ import annotations

import pytest
import torch

from danqing.models.families import build_components
from danqing.passes.video import run_video
from danqing.request_video import VideoRequest
from danqing.sampling.noise import make_generators
from danqing.sampling.samplers import make_scheduler
from danqing.sampling.video import text_video_denoise, video_noise


@pytest.fixture(scope="module")
def comps():
    return build_components("danqing-tiny", seed=1)


@pytest.fixture(scope="module")
def unet3d(comps):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(0)
    return UNet3DConditionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                                cross_attention_dim=comps.text_encoder.config.hidden_size,
                                attention_head_dim=8).eval().requires_grad_(False)


# ancestral samplers draw their step noise in the pipeline's (B * F, C, h, w) layout, which a
# (B, C, F, h, w) loop cannot match draw for draw: the deterministic ones are compared
@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DDIM", "Euler"])
def test_loop_matches_text_to_video_pipeline(comps, unet3d, sampler):
    from diffusers import TextToVideoSDPipeline

    req = VideoRequest.create(prompt="a red circle moving to the right", negative_prompt="blurry", steps=4, seed=3,
                              width=64, height=64, frames=6, cfg_scale=6.0, sampler=sampler)
    with torch.no_grad():
        ours = run_video(comps, unet3d, req, device="cpu", dtype=torch.float32,
                         denoise_fn=text_video_denoise).latents[0]
    gens = make_generators([req.seed])
    noise = video_noise(tuple(ours.shape[1:]), gens)
    pipe = TextToVideoSDPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                 unet=unet3d, scheduler=make_scheduler(comps.scheduler_config, req.sampler, req.schedule))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(req.prompt, negative_prompt=req.negative_prompt, num_frames=req.frames, height=64, width=64,
                   num_inference_steps=req.steps, guidance_scale=req.cfg_scale, generator=gens, latents=noise,
                   output_type="latent").frames
    assert ours.shape == ref.shape == (1, 4, req.frames, 16, 16)
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours[:, :, 0] - ours[:, :, 1]).abs().max() > 1e-3  # the frames differ: a clip, not one picture


@pytest.fixture(scope="module")
def t2v_home(tmp_path_factory, comps, unet3d):
    """A danqing home whose checkpoints folder holds a ModelScope-layout folder (diffusers'
    ``TextToVideoSDPipeline`` saved: danqing-tiny's text encoder, tokenizer and VAE, the tiny
    random 3D UNet)."""
    from diffusers import TextToVideoSDPipeline

    home = tmp_path_factory.mktemp("t2v-home")
    pipe = TextToVideoSDPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                 unet=unet3d, scheduler=make_scheduler(comps.scheduler_config, "DDIM", "Automatic"))
    pipe.save_pretrained(home / "models" / "checkpoints" / "t2v-tiny")
    return home


def test_a_text_to_video_folder_runs_through_the_video_studio_as_the_pipeline_does(t2v_home, unet3d, comps):
    from danqing import Settings, Studio
    from danqing.video.studio import VideoStudio

    videos = VideoStudio(Studio(Settings(home=t2v_home, device="cpu", dtype="fp32")))
    req = VideoRequest.create(prompt="a red circle moving to the right", steps=4, seed=3, width=64, height=64,
                              frames=6, cfg_scale=6.0, sampler="DPM++ 2M", model="t2v-tiny")
    result = videos.generate(req)
    with torch.no_grad():
        expected = run_video(comps, unet3d, req, device="cpu", dtype=torch.float32,
                             denoise_fn=text_video_denoise).latents[0]
    assert (result.latents[0] - expected).abs().max().item() < 1e-5
    assert len(result.clips[0]) == 6 and '"model": "t2v-tiny"' in result.parameters[0]


@pytest.mark.parametrize("changes, field", [({"motion_module": "mm"}, "motion_module"), ({"motion": False}, "motion"),
                                            ({"cross_frame_attention": True}, "cross_frame_attention"),
                                            ({"prompt": "0: a red circle\n3: a blue star"}, "prompt")])
def test_what_a_text_to_video_model_cannot_take_is_refused(t2v_home, changes, field):
    from danqing import Settings, Studio
    from danqing.errors import InvalidRequest
    from danqing.video.studio import VideoStudio

    videos = VideoStudio(Studio(Settings(home=t2v_home, device="cpu", dtype="fp32")))
    req = VideoRequest.create(**{"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "frames": 4,
                                 "model": "t2v-tiny", **changes})
    with pytest.raises(InvalidRequest) as err:
        videos.generate(req)
    assert err.value.field == field and "text-to-video model" in str(err.value)


def test_a_text_to_video_model_draws_no_picture(t2v_home, capsys, tmp_path, monkeypatch):
    from danqing.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["--home", str(t2v_home), "generate", "a red circle", "--model", "t2v-tiny", "--steps", "2",
              "--width", "64", "--height", "64", "--out", "x.png"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "text-to-video model" in err and "danqing video" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
