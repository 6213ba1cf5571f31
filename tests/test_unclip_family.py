"""unCLIP families through our loop: Stable unCLIP image variations, parity with diffusers'
``StableUnCLIPImg2ImgPipeline`` on a tiny random model saved as a diffusers folder.

The tiny model is the bundled tiny-sd2 (text encoder, tokenizer, VAE) with a UNet whose class
embedding is a projection of [image embedding; noise-level embedding], a tiny CLIP vision
encoder and a random embedding normaliser.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity import assert_close_scaled
from PIL import Image

from danqing import GenerationRequest
from danqing.errors import CorruptModel

PROMPT, NEGATIVE, SIZE, STEPS, EMBED = "a red circle", "blurry", 64, 3, 32


def _picture() -> Image.Image:
    y, x = np.mgrid[0:48, 0:40]
    return Image.fromarray(np.stack([x * 6, y * 5, (x * y) % 255], -1).astype(np.uint8))


def _pipeline():
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from danqing.models.families import build_components, load_family_config
    from danqing.sampling.samplers import make_scheduler

    comps = build_components("tiny-sd2", seed=3)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**load_family_config("tiny-sd2")["unet"], class_embed_type="projection",
                                projection_class_embeddings_input_dim=2 * EMBED).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=EMBED, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=4, intermediate_size=37)).eval()
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMBED)
    with torch.no_grad():
        normalizer.mean.copy_(torch.randn(1, EMBED) * 0.1)
        normalizer.std.copy_(torch.rand(1, EMBED) + 0.5)
    scheduler = make_scheduler(comps.scheduler_config, "DDIM", "Automatic", seed=17)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=encoder, image_normalizer=normalizer, image_noising_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, unet=unet, scheduler=scheduler, vae=comps.vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def unclip_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("unclip") / "unclip-tiny"
    _pipeline().save_pretrained(path)
    return path


def test_stable_unclip_variations_match_diffusers(unclip_folder):
    from diffusers import StableUnCLIPImg2ImgPipeline

    from danqing.models.unclip_models import load_unclip_folder
    from danqing.sampling.unclip import run_unclip

    model = load_unclip_folder(unclip_folder)
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="DDIM", steps=STEPS, cfg_scale=6.0,
                                seed=17, width=SIZE, height=SIZE)
    ours = run_unclip(model, _picture(), request, noise_level=200)

    ref = StableUnCLIPImg2ImgPipeline.from_pretrained(unclip_folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    words = dict(image=_picture(), prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                 guidance_scale=6.0, height=SIZE, width=SIZE, noise_level=200)
    seen = {}
    with torch.no_grad():  # one run: its last step's latents (the callback) and its pixels
        pixels = ref(generator=torch.Generator("cpu").manual_seed(17), output_type="np",
                     callback=lambda i, t, x: seen.update(latents=x.clone()), **words).images
    latents = seen["latents"]
    diff = float((ours.latents - latents).abs().max())
    print(f"stable unCLIP latents max|diff| = {diff:.3g}")
    assert_close_scaled(ours.latents, latents, what="Stable unCLIP latents")
    assert diff < 1e-4
    mine = np.asarray(ours.images[0], np.float64)
    assert np.abs(mine - pixels[0] * 255).max() <= 1.0  # uint8 rounding of floats equal to 1e-4
    # the noise level matters: a different level gives a different picture
    other = run_unclip(model, _picture(), request, noise_level=900)
    assert float((other.latents - ours.latents).abs().max()) > 1e-3


def test_unclip_folder_is_told_and_incomplete_named(unclip_folder, tmp_path):
    import shutil

    from danqing.models.unclip_models import load_unclip_folder, unclip_kind_of_folder

    assert unclip_kind_of_folder(unclip_folder) == "unclip"
    copy = shutil.copytree(unclip_folder, tmp_path / "unclip-no-encoder")
    shutil.rmtree(copy / "image_encoder")
    with pytest.raises(CorruptModel, match=r"unclip-no-encoder: the Stable unCLIP folder has no image_encoder/"):
        load_unclip_folder(copy)
