"""unCLIP families through our loop: Stable unCLIP image variations, parity with diffusers'
``StableUnCLIPImg2ImgPipeline`` on a tiny random model saved as a diffusers folder.

The tiny model is the bundled tiny-sd2 (text encoder, tokenizer, VAE) with a UNet whose class
embedding is a projection of [image embedding; noise-level embedding], a tiny CLIP vision
encoder and a random embedding normaliser.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from parity import assert_close_scaled
from PIL import Image

from danqing import GenerationRequest
from danqing.errors import CorruptModel

PROMPT, NEGATIVE, SIZE, STEPS, EMBED = "a red circle", "blurry", 64, 2, 32


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
    # the noise level is read: diffusers ran at 200 too; at 0 the class label is another
    from danqing.sampling.unclip import image_embedding, noised_embedding

    embeds = image_embedding(model, _picture())
    noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
    assert float((noised_embedding(model, embeds, noise, 0) - noised_embedding(model, embeds, noise, 200)).abs().max()) > 1e-2


def test_unclip_folder_is_told_and_incomplete_named(unclip_folder, tmp_path):
    import shutil

    from danqing.models.unclip_models import load_unclip_folder, unclip_kind_of_folder

    assert unclip_kind_of_folder(unclip_folder) == "unclip"
    copy = shutil.copytree(unclip_folder, tmp_path / "unclip-no-encoder")
    shutil.rmtree(copy / "image_encoder")
    with pytest.raises(CorruptModel, match=r"unclip-no-encoder: the Stable unCLIP folder has no image_encoder/"):
        load_unclip_folder(copy)


def _kandinsky_pipelines():
    from diffusers import (DDPMScheduler, KandinskyV22Pipeline, KandinskyV22PriorPipeline, PriorTransformer,
                           UnCLIPScheduler, UNet2DConditionModel, VQModel)
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from danqing.models.tokenizer import clip_tokenizer

    torch.manual_seed(1)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED, num_layers=1).eval()
    with torch.no_grad():  # the embedding's statistics (zeros and ones when built)
        prior.clip_mean.copy_(torch.randn(1, EMBED) * 0.1)
        prior.clip_std.copy_(torch.rand(1, EMBED) + 0.5)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, projection_dim=EMBED, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1)).eval()
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=EMBED, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=4, intermediate_size=37)).eval()
    first = KandinskyV22PriorPipeline(
        prior=prior, image_encoder=vision, text_encoder=text, tokenizer=clip_tokenizer("<|endoftext|>"),
        scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                  clip_sample=True, clip_sample_range=10.0),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        encoder_hid_dim=EMBED, encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None).eval()
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4).eval()
    second = KandinskyV22Pipeline(unet=unet, movq=movq, scheduler=DDPMScheduler(
        beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, prediction_type="epsilon"))
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    return first, second


@pytest.fixture(scope="module")
def kandinsky_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kandinsky")
    for pipe, name in zip(_kandinsky_pipelines(), ("k22-prior", "k22-decoder")):
        pipe.save_pretrained(root / name)
    return root / "k22-prior", root / "k22-decoder"


@pytest.fixture(scope="module")
def kandinsky(kandinsky_folders):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from danqing.models.unclip_models import load_kandinsky_decoder, load_kandinsky_prior

    ours = load_kandinsky_prior(kandinsky_folders[0]), load_kandinsky_decoder(kandinsky_folders[1])
    refs = (KandinskyV22PriorPipeline.from_pretrained(kandinsky_folders[0], local_files_only=True),
            KandinskyV22Pipeline.from_pretrained(kandinsky_folders[1], local_files_only=True))
    for pipe in refs:
        pipe.set_progress_bar_config(disable=True)
    return ours, refs


def _decode_ref(decoder, embeds, negative, seen_gen, **words):
    seen = {}

    def grab(pipe, i, t, kw):
        seen["latents"] = kw["latents"].clone()
        return kw

    with torch.no_grad():
        pixels = decoder(image_embeds=embeds, negative_image_embeds=negative, generator=seen_gen, output_type="np",
                         callback_on_step_end=grab, **words).images
    return seen["latents"], pixels


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_kandinsky_text_to_image_matches_diffusers(kandinsky, negative):
    from danqing.sampling.kandinsky import run_kandinsky

    (prior, decoder), (ref_prior, ref_decoder) = kandinsky
    request = GenerationRequest(prompt=PROMPT, negative_prompt=negative, steps=STEPS, cfg_scale=5.0, seed=17,
                                width=SIZE, height=SIZE)
    ours = run_kandinsky(prior, decoder, request, prior_steps=STEPS, prior_cfg_scale=3.0)

    gen = torch.Generator("cpu").manual_seed(17)  # one generator through both pipelines
    with torch.no_grad():
        out = ref_prior(PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS, guidance_scale=3.0,
                        generator=gen)
    assert float((ours.image_embeds - out.image_embeds).abs().max()) < 1e-4
    latents, pixels = _decode_ref(ref_decoder, out.image_embeds, out.negative_image_embeds, gen,
                                  num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE)
    diff = float((ours.latents - latents).abs().max())
    print(f"Kandinsky 2.2 (negative {negative!r}) latents max|diff| = {diff:.3g}")
    assert_close_scaled(ours.latents, latents, what="Kandinsky 2.2 latents")
    assert diff < 1e-4
    assert np.abs(np.asarray(ours.images[0], np.float64) - pixels[0] * 255).max() <= 1.0


def test_kandinsky_variations_match_diffusers(kandinsky):
    from danqing.sampling.kandinsky import run_kandinsky

    (prior, decoder), (ref_prior, ref_decoder) = kandinsky
    request = GenerationRequest(prompt="", steps=STEPS, cfg_scale=4.0, seed=5, width=SIZE, height=SIZE)
    ours = run_kandinsky(prior, decoder, request, picture=_picture())
    with torch.no_grad():
        out = ref_prior.interpolate([_picture()], [1.0], num_inference_steps=2,
                                    generator=torch.Generator("cpu").manual_seed(0))
    latents, pixels = _decode_ref(ref_decoder, out.image_embeds, out.negative_image_embeds,
                                  torch.Generator("cpu").manual_seed(5), num_inference_steps=STEPS,
                                  guidance_scale=4.0, height=SIZE, width=SIZE)
    diff = float((ours.latents - latents).abs().max())
    print(f"Kandinsky 2.2 variations latents max|diff| = {diff:.3g}")
    assert diff < 1e-4
    assert np.abs(np.asarray(ours.images[0], np.float64) - pixels[0] * 255).max() <= 1.0
    # another picture, another embedding, other latents
    other = run_kandinsky(prior, decoder, request, picture=_picture().transpose(Image.Transpose.ROTATE_90))
    assert float((other.latents - ours.latents).abs().max()) > 1e-3


@pytest.fixture(scope="module")
def unclip_home(tmp_path_factory, unclip_folder, kandinsky_folders):
    import shutil

    home = tmp_path_factory.mktemp("unclip-home")
    for folder in (unclip_folder, *kandinsky_folders):
        shutil.copytree(folder, home / "models" / "checkpoints" / folder.name)
    return home


def _cli(capsys, home, *args):
    from danqing.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--home", str(home), "--models-dir", str(home / "models"), "--device", "cpu", *args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cli_runs_unclip_families_and_refuses_what_they_do_not_take(capsys, unclip_home, kandinsky):
    from danqing.outputs.infotext import parse_infotext
    from danqing.outputs.store import read_infotext
    from danqing.sampling.kandinsky import run_kandinsky

    code, out, _ = _cli(capsys, unclip_home, "models")
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line.strip()}
    assert rows["unclip-tiny"] == "unclip" and rows["k22-prior"] == "kandinsky-prior"
    assert rows["k22-decoder"] == "kandinsky-decoder"

    # Kandinsky 2.2 text-to-image through `generate`: the picture of our loop, with its infotext
    picture = unclip_home / "k.png"
    code, out, err = _cli(capsys, unclip_home, "generate", PROMPT, "--model", "k22-decoder", "--prior", "k22-prior",
                          "--steps", "2", "--prior-steps", "2", "--cfg", "4", "--seed", "9", "--width", str(SIZE),
                          "--height", str(SIZE), "--out", str(picture))
    assert code in (0, None), err
    request = GenerationRequest(prompt=PROMPT, steps=2, cfg_scale=4.0, seed=9, width=SIZE, height=SIZE)
    (prior, decoder), _ = kandinsky
    expected = run_kandinsky(prior, decoder, request, prior_steps=2)
    assert np.array_equal(np.asarray(Image.open(picture)), np.asarray(expected.images[0]))
    prompt, _, params = parse_infotext(read_infotext(picture))
    assert (prompt, params["Family"], params["Seed"], params["Prior steps"]) == (PROMPT, "kandinsky-decoder", "9", "2")

    # Stable unCLIP variations of a picture, the noise level written down
    source = unclip_home / "source.png"
    _picture().save(source)
    code, out, err = _cli(capsys, unclip_home, "variations", str(source), "--model", "unclip-tiny", "--steps", "2",
                          "--noise-level", "100", "--width", str(SIZE), "--height", str(SIZE), "--seed", "3",
                          "--out", str(unclip_home / "v.png"))
    assert code in (0, None), err
    params = parse_infotext(read_infotext(unclip_home / "v.png"))[2]
    assert (params["Family"], params["Noise level"], params["Variation source"]) == ("unclip", "100", str(source.resolve()))

    # one line, exit 2, nothing written: options the family does not take, a picture it needs
    for args, words in (
        (["variations", str(source), "--model", "unclip-tiny", "--prior", "k22-prior"], "--prior is not an option of the unclip family's variations"),
        (["variations", str(source), "--model", "k22-decoder", "--prior", "k22-prior", "--noise-level", "5"],
         "--noise-level is not an option of the kandinsky-decoder"),
        (["generate", PROMPT, "--model", "unclip-tiny"], "makes variations of a picture"),
        (["generate", PROMPT, "--model", "unclip-tiny", "--prior-steps", "5"], "--prior-steps and --prior-cfg are the prior's"),
        (["generate", PROMPT, "--model", "unclip-tiny", "--prior", "unclip-tiny"], "unclip-tiny: not a kandinsky-prior folder"),
        (["generate", PROMPT, "--model", "k22-decoder", "--prior", "k22-prior", "--hires"], "enable_hr: not an option"),
        (["generate", PROMPT, "--model", "k22-decoder"], "needs its prior folder"),
        (["generate", PROMPT, "--model", "k22-prior"], "give the decoder folder as --model"),
    ):
        code, out, err = _cli(capsys, unclip_home, *args, "--out", str(unclip_home / "refused.png"))
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (unclip_home / "refused.png").exists()


def test_a_server_studio_reads_a_family_folder_once(unclip_home, monkeypatch):
    """Kandinsky's prior and decoder stay loaded between requests (ModelManager.load_folder): a
    second request reads nothing from disk and draws the same picture; a folder whose files
    change is read again."""
    import os

    from danqing import Settings, Studio
    from danqing.apps import families

    reads = []

    def counted(loader):
        def load(path):
            reads.append(Path(path).name)
            return loader(path)
        load.__qualname__ = loader.__qualname__
        return load

    monkeypatch.setattr(families, "load_kandinsky_prior", counted(families.load_kandinsky_prior))
    monkeypatch.setattr(families, "load_kandinsky_decoder", counted(families.load_kandinsky_decoder))
    studio = Studio(Settings(home=unclip_home, models_dir=unclip_home / "models", device="cpu", dtype="fp32"))
    request = GenerationRequest(prompt=PROMPT, model="k22-decoder", steps=2, cfg_scale=4.0, seed=9, width=SIZE,
                                height=SIZE)
    options = families.FamilyOptions(prior="k22-prior", prior_steps=2)
    first = families.run_family(studio, "kandinsky-decoder", request, options)
    second = families.run_family(studio, "kandinsky-decoder", request, options)
    assert sorted(reads) == ["k22-decoder", "k22-prior"]  # once each
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    config = unclip_home / "models" / "checkpoints" / "k22-decoder" / "model_index.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    families.run_family(studio, "kandinsky-decoder", request, options)
    assert sorted(reads) == ["k22-decoder", "k22-decoder", "k22-prior"]
