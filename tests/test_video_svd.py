"""Stable Video Diffusion image-to-video through our loop against diffusers'
``StableVideoDiffusionPipeline`` (must-show 1, SVD part): tiny random components (diffusers'
own test configuration), fp32, the same seed and scheduler; the final latents agree."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from danqing.passes.video import run_svd


def tiny_svd():
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNetSpatioTemporalConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
            num_attention_heads=8, projection_class_embeddings_input_dim=96, addition_time_embed_dim=32)
        torch.manual_seed(0)
        vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                           down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                                           latent_channels=4)
        torch.manual_seed(0)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=224,
            intermediate_size=37, patch_size=14))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    return SimpleNamespace(unet=unet.eval(), vae=vae.eval(), image_encoder=encoder.eval(),
                           feature_extractor=CLIPImageProcessor(crop_size=32, size=32), scheduler=scheduler)


def test_svd_through_our_loop_matches_the_pipeline():
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline

    parts = tiny_svd()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    kw = dict(frames=3, fps=7, motion_bucket_id=127, noise_aug_strength=0.02, steps=3, min_guidance=1.0,
              max_guidance=2.5)
    fresh = lambda: EulerDiscreteScheduler.from_config(parts.scheduler.config)  # noqa: E731
    ours = run_svd(parts, image, fresh(), seed=4, **kw).latents
    pipe = StableVideoDiffusionPipeline(vae=parts.vae, image_encoder=parts.image_encoder, unet=parts.unet,
                                        scheduler=fresh(), feature_extractor=parts.feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(image, height=32, width=32, num_frames=3, num_inference_steps=3, min_guidance_scale=1.0,
                   max_guidance_scale=2.5, fps=7, motion_bucket_id=127, noise_aug_strength=0.02,
                   generator=torch.Generator().manual_seed(4), output_type="latent").frames
    assert ours.shape == ref.shape == (1, 3, 4, 16, 16)  # (B, F, C, h, w): this VAE halves the sides
    assert (ours - ref).abs().max().item() < 1e-4
    # the frame-wise ramp acts: with one guidance scale for every frame the result differs
    flat = run_svd(parts, image, fresh(), seed=4, **{**kw, "min_guidance": 2.5}).latents
    assert (flat[:, 1:] - ours[:, 1:]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def svd_home(tmp_path_factory):
    """A danqing home whose checkpoints folder holds a Stable Video Diffusion folder (the tiny
    random parts saved as diffusers' ``StableVideoDiffusionPipeline`` writes them)."""
    from diffusers import StableVideoDiffusionPipeline

    parts = tiny_svd()
    home = tmp_path_factory.mktemp("svd-home")
    StableVideoDiffusionPipeline(vae=parts.vae, image_encoder=parts.image_encoder, unet=parts.unet,
                                 scheduler=parts.scheduler, feature_extractor=parts.feature_extractor,
                                 ).save_pretrained(home / "models" / "checkpoints" / "svd-tiny")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(home / "start.png")
    return home


SVD_FIELDS = dict(model="svd-tiny", sampler="Euler", width=64, height=64, frames=3, fps=7, steps=3, seed=4,
                  cfg_scale=2.5)


def test_an_svd_folder_runs_image_to_video_as_the_pipeline_does(svd_home, tmp_path):
    from diffusers import EulerDiscreteScheduler

    from danqing import Settings, Studio
    from danqing.outputs.video import probe_video, read_video_parameters
    from danqing.request_video import VideoRequest
    from danqing.video.studio import VideoStudio, request_from_parameters

    videos = VideoStudio(Studio(Settings(home=svd_home, device="cpu", dtype="fp32")))
    steps = []
    req = VideoRequest.create(init_image=str(svd_home / "start.png"), **SVD_FIELDS)
    result = videos.generate(req, on_step=lambda info: steps.append(info.latents.shape), out=tmp_path / "c.mp4")
    parts = tiny_svd()
    expected = run_svd(parts, Image.open(svd_home / "start.png"), EulerDiscreteScheduler.from_config(parts.scheduler.config),
                       frames=3, fps=7, steps=3, seed=4, max_guidance=2.5).latents
    assert (result.latents[0] - expected).abs().max().item() < 1e-5  # and run_svd is the pipeline's (above)
    assert len(result.clips[0]) == 3 and result.clips[0][0].size == (64, 64)
    assert steps == [(1, 4, 3, 32, 32)] * 3  # (B, C, F, h, w), as every video pass reports
    info = probe_video(tmp_path / "c.mp4")
    assert (info.frames, info.width, info.height) == (3, 64, 64)
    again = videos.generate(request_from_parameters(read_video_parameters(tmp_path / "c.mp4")))
    assert torch.equal(again.latents[0], result.latents[0])


@pytest.mark.parametrize("changes, field, message", [
    ({"model": "danqing-tiny"}, "init_image", "needs a Stable Video Diffusion model"),
    ({"sampler": "DPM++ 2M"}, "sampler", "use Euler"),
    ({"prompt": "a red circle"}, "prompt", "the picture alone conditions it"),
    ({"motion_module": "mm"}, "motion_module", "moves its frames itself"),
])
def test_what_image_to_video_cannot_take_is_refused(svd_home, changes, field, message):
    from danqing import Settings, Studio
    from danqing.errors import InvalidRequest
    from danqing.request_video import VideoRequest
    from danqing.video.studio import VideoStudio

    videos = VideoStudio(Studio(Settings(home=svd_home, device="cpu", dtype="fp32")))
    with pytest.raises(InvalidRequest) as err:
        videos.generate(VideoRequest.create(**{**SVD_FIELDS, "init_image": str(svd_home / "start.png"), **changes}))
    assert err.value.field == field and message in str(err.value)


def test_an_svd_model_draws_no_picture_and_svd_fields_need_a_picture(svd_home):
    from danqing import GenerationRequest, Settings, Studio
    from danqing.errors import CorruptModel, InvalidRequest
    from danqing.request_video import VideoRequest

    with pytest.raises(CorruptModel, match="danqing video --init-image"):
        Studio(Settings(home=svd_home, device="cpu", dtype="fp32")).generate(
            GenerationRequest(prompt="x", model="svd-tiny", width=64, height=64, steps=1))
    with pytest.raises(InvalidRequest, match="motion_bucket_id: conditions Stable Video Diffusion"):
        VideoRequest.create(prompt="x", motion_bucket_id=200)


# -- image-to-video over HTTP ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def svd_client(svd_home):
    from fastapi.testclient import TestClient
    from server_helpers import make_app

    from danqing import Settings, Studio

    studio = Studio(Settings(home=svd_home / "studio", models_dir=svd_home / "models", device="cpu", dtype="fp32"))
    with TestClient(make_app(svd_home / "server", studio=studio)) as c:
        yield c


def picture_b64(path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def test_image_to_video_job_over_http_is_the_library_clip(svd_client, svd_home, tmp_path):
    """``POST /api/v1/video/jobs`` with the picture as base64 ``init_image``: the job runs the
    SVD folder as ``danqing video --init-image`` does (the same frames), the upload kept under
    the server's inputs as a PNG and named in the clip's parameters."""
    import json

    from danqing import Settings, Studio
    from danqing.outputs.video import read_frames, read_video_parameters
    from danqing.request_video import VideoRequest
    from danqing.video.studio import VideoStudio

    r = svd_client.post("/api/v1/video/jobs", json={"request": SVD_FIELDS, "init_image": picture_b64(svd_home / "start.png")})
    assert r.status_code == 202, r.text
    job = svd_client.get(f"/api/v1/jobs/{r.json()['id']}/wait", params={"timeout": 120}).json()
    assert job["status"] == "done" and job["kind"] == "img2video", job
    path = job["result"]["videos"][0]["path"]
    assert "/img2video/" in path
    ran = json.loads(read_video_parameters(path))["request"]
    assert ran["init_image"].endswith("-init.png") and "init-images" in ran["init_image"]
    videos = VideoStudio(Studio(Settings(home=svd_home, device="cpu", dtype="fp32")))
    local = videos.generate(VideoRequest.create(init_image=str(svd_home / "start.png"), **SVD_FIELDS),
                            out=tmp_path / "local.mp4")
    assert all(np.array_equal(a, b) for a, b in zip(read_frames(path), read_frames(local.paths[0])))
    assert len(read_frames(path)) == SVD_FIELDS["frames"]


@pytest.mark.parametrize("changes, field, detail", [
    ({"model": "danqing-tiny"}, "init_image", "image-to-video needs a Stable Video Diffusion model"),
    ({"prompt": "a red circle"}, "request.prompt", "the picture alone conditions it"),
    ({"sampler": "DPM++ 2M"}, "request.sampler", "use Euler"),
])
def test_bad_image_to_video_jobs_are_one_422_and_keep_nothing(svd_client, svd_home, changes, field, detail):
    inputs = svd_home / "server" / "outputs" / "init-images"
    kept = sorted(inputs.rglob("*"))
    r = svd_client.post("/api/v1/video/jobs", json={"request": {**SVD_FIELDS, **changes},
                                                    "init_image": picture_b64(svd_home / "start.png")})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and detail in r.json()["detail"], r.json()
    assert sorted(inputs.rglob("*")) == kept
