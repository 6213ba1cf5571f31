"""DeepFloyd IF (stage I + stage II) through our loop: parity with diffusers' ``IFPipeline`` and
``IFSuperResolutionPipeline`` on tiny random models, loaded from diffusers folders.

The tiny UNets follow diffusers' own IF test configs (simple cross-attention blocks, text
embedding added to the time embedding; stage II: the noise level as a timestep class label);
the T5 encoder is tiny and its tokenizer the toy one of ``tests/test_flow_families.py``.
"""

from __future__ import annotations

import pytest
import torch
from parity import assert_close_scaled
from test_flow_families import NEGATIVE, PROMPT, t5_tokenizer

from danqing import GenerationRequest
from danqing.errors import CorruptModel

LOW, HIGH, STEPS = 64, 256, 3  # IF's own sizes: 64 -> 256


def _unet(stage: int):
    from diffusers import UNet2DConditionModel

    # Stage II runs at 256x256 pixels: two plain levels first keep its attention at 32x32 tokens
    # (at 128x128 tokens one test took minutes on a 2-core CPU).
    levels = ([32, 64], ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"], 32) if stage == 1 else \
        ([16, 16, 32, 64], ["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"], 8)
    channels, down, groups = levels
    up = ["SimpleCrossAttnUpBlock2D"] + ["ResnetUpsampleBlock2D"] * (len(down) - 1)
    common = dict(sample_size=LOW if stage == 1 else HIGH, layers_per_block=1, block_out_channels=channels,
                  down_block_types=down, mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=up,
                  norm_num_groups=groups, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32,
                  attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
                  cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu")
    if stage == 1:
        return UNet2DConditionModel(in_channels=3, **common)
    return UNet2DConditionModel(in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1.414,
                                time_embedding_act_fn="gelu", time_embedding_dim=32, **common)


def _ddpm(**extra):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                         beta_end=0.02, **extra)


def _pipelines():
    from diffusers import IFPipeline, IFSuperResolutionPipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                      dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0,
                                      eos_token_id=1)).eval()
    tokenizer = t5_tokenizer()
    learned = dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                   prediction_type="epsilon", variance_type="learned_range")
    first = IFPipeline(tokenizer=tokenizer, text_encoder=encoder, unet=_unet(1).eval(), scheduler=_ddpm(**learned),
                       safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    second = IFSuperResolutionPipeline(tokenizer=tokenizer, text_encoder=encoder, unet=_unet(2).eval(),
                                       scheduler=_ddpm(**learned), image_noising_scheduler=_ddpm(),
                                       safety_checker=None, feature_extractor=None, watermarker=None,
                                       requires_safety_checker=False)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    return first, second


@pytest.fixture(scope="module")
def if_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("if-models")
    first, second = _pipelines()
    first.save_pretrained(root / "IF-I-tiny")
    second.save_pretrained(root / "IF-II-tiny")
    return root / "IF-I-tiny", root / "IF-II-tiny"


def test_if_cascade_matches_diffusers(if_folders):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    from danqing.models.cascade_models import load_if_folder
    from danqing.sampling.cascade import run_if

    stage_1, stage_2 = (load_if_folder(p) for p in if_folders)
    assert (stage_1.kind, stage_2.kind) == ("if-i", "if-ii") and stage_2.noising_config is not None
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=6.0, seed=17,
                                width=LOW, height=LOW, batch_size=2)
    ours = run_if(stage_1, request, stage_2=stage_2, upscale_steps=STEPS, upscale_cfg_scale=3.0, noise_level=100)

    B = request.batch_size
    gens = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(B)]  # one per image, both stages
    words = dict(prompt=[PROMPT] * B, negative_prompt=[NEGATIVE] * B, num_inference_steps=STEPS, generator=gens,
                 output_type="pt", clean_caption=False)
    first = IFPipeline.from_pretrained(if_folders[0], local_files_only=True)
    second = IFSuperResolutionPipeline.from_pretrained(if_folders[1], local_files_only=True)
    with torch.no_grad():
        low = first(guidance_scale=6.0, height=LOW, width=LOW, **words).images
        high = second(image=low, guidance_scale=3.0, height=HIGH, width=HIGH, noise_level=100, **words).images
    assert_close_scaled(ours.low, low, what="IF stage I")
    assert float((ours.low - low).abs().max()) < 1e-4
    assert_close_scaled(ours.high, high, what="IF stage II")
    assert float((ours.high - high).abs().max()) < 1e-4
    assert [im.size for im in ours.images] == [(HIGH, HIGH)] * B


def test_if_folder_without_tokenizer_is_named(if_folders, tmp_path):
    import shutil

    from danqing.models.cascade_models import load_if_folder
    from danqing.models.loader import load_diffusers_folder

    with pytest.raises(CorruptModel, match=r"IF-I-tiny: a DeepFloyd IF stage \(if-i\).*run_if"):
        load_diffusers_folder(if_folders[0])  # not a checkpoint yet: one line, not a half-loaded model

    copy = shutil.copytree(if_folders[0], tmp_path / "IF-I-no-tok")
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(CorruptModel, match=r"T5 tokenizer.*IF-I-no-tok/tokenizer/"):
        load_if_folder(copy)
