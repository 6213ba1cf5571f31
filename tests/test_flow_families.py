"""SD3 and FLUX.1 (flow matching) in our loop: parity with diffusers' pipelines, the folder and
single-file loaders, the request's family checks and the infotext's Forge keys.

Tiny random models (``tiny-sd3``, ``tiny-flux`` bundled configs) are saved as diffusers folders
into a temporary models folder and loaded through the registry as a user's models are. The T5
tokenizer is a toy one built here with the ``tokenizers`` library (no hub).
"""

from __future__ import annotations

import pytest
import torch
from parity import assert_close_scaled

from danqing import GenerationRequest
from danqing.errors import CorruptModel, InvalidRequest

SIZE = 64
STEPS = 4
PROMPT = "a red circle left of a blue star"
NEGATIVE = "blurry, noisy"
WORDS = "a red circle left of blue star blurry noisy , . the cat dog photo green".split()


def t5_tokenizer():
    """A toy T5 (SentencePiece-Unigram) tokenizer: <pad>=0, </s>=1, <unk>=2, whole words, letters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(WORDS)]
    vocab += [(c, -50.0) for c in "abcdefghijklmnopqrstuvwxyz,.\u2581"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def tiny(family: str, seed: int, *, t5: bool = True):
    from danqing.models.families import build_components

    comps = build_components(f"tiny-{family}", seed=seed)
    if family == "sd3":
        comps.tokenizer_3 = t5_tokenizer() if t5 else None
        if not t5:
            comps.text_encoder_3 = None
    else:
        comps.tokenizer_2 = t5_tokenizer()
    return comps


@pytest.fixture(scope="module")
def flow_studio(tmp_path_factory):
    from danqing import Settings, Studio
    from danqing.models.loader import save_diffusers_folder

    root = tmp_path_factory.mktemp("flow-models")
    for sub in ("checkpoints", "vae", "lora", "embeddings", "controlnet"):
        (root / sub).mkdir()
    save_diffusers_folder(tiny("sd3", 21), root / "checkpoints" / "tiny-sd3")
    save_diffusers_folder(tiny("sd3", 22, t5=False), root / "checkpoints" / "tiny-sd3-no-t5")
    save_diffusers_folder(tiny("flux", 23), root / "checkpoints" / "tiny-flux")
    home = tmp_path_factory.mktemp("flow-home")
    return Studio(Settings(home=home, models_dir=root, device="cpu", dtype="fp32"))


def _ours(studio, model, request):
    result = studio.generate(request.replace(model=model))
    return result, studio.models.load(model).components


def _reference(comps, request, output_type="latent"):
    """diffusers' own pipeline on the same modules, scheduler config, seed and prompts."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from danqing.sampling.samplers import make_scheduler

    scheduler = make_scheduler(comps.scheduler_config, request.sampler, request.schedule, shift=request.shift)
    generator = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.batch_size)]
    common = dict(prompt=request.prompt, num_inference_steps=request.steps, height=request.height,
                  width=request.width, generator=generator, output_type=output_type,
                  num_images_per_prompt=request.batch_size)
    if comps.family == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=comps.unet, scheduler=scheduler, vae=comps.vae,
                                        text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                        text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2,
                                        text_encoder_3=comps.text_encoder_3, tokenizer_3=comps.tokenizer_3)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(negative_prompt=request.negative_prompt, guidance_scale=request.cfg_scale, **common).images
    pipe = FluxPipeline(transformer=comps.unet, scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder,
                        tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(negative_prompt=request.negative_prompt or None, true_cfg_scale=request.cfg_scale,
                   guidance_scale=request.distilled_cfg_scale, **common).images
    if output_type != "latent":
        return out
    factor = pipe.vae_scale_factor
    return pipe._unpack_latents(out, request.height, request.width, factor)


# -- parity: our loop vs StableDiffusion3Pipeline / FluxPipeline ------------------------------------
@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-sd3-no-t5"])
def test_sd3_matches_diffusers(flow_studio, model):
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="Euler", steps=STEPS, seed=1234,
                                width=SIZE, height=SIZE, cfg_scale=5.0, batch_size=2)
    result, comps = _ours(flow_studio, model, request)
    assert comps.family == "sd3" and (comps.text_encoder_3 is None) == model.endswith("no-t5")
    ref = _reference(comps, result.request)
    assert_close_scaled(result.latents[0], ref, what=model)
    assert float((result.latents[0] - ref).abs().max()) < 1e-4


def test_sd3_shift_changes_schedule_like_diffusers(flow_studio):
    request = GenerationRequest(prompt=PROMPT, sampler="Euler", steps=STEPS, seed=5, width=SIZE, height=SIZE,
                                cfg_scale=1.0, shift=6.0)
    result, comps = _ours(flow_studio, "tiny-sd3", request)
    ref = _reference(comps, result.request)
    assert float((result.latents[0] - ref).abs().max()) < 1e-4
    plain, _ = _ours(flow_studio, "tiny-sd3", request.replace(shift=None))
    assert float((plain.latents[0] - result.latents[0]).abs().max()) > 1e-3  # the shift is not ignored


def test_flux_distilled_guidance_matches_diffusers(flow_studio):
    request = GenerationRequest(prompt=PROMPT, sampler="Euler", steps=STEPS, seed=77, width=SIZE, height=SIZE,
                                cfg_scale=1.0, distilled_cfg_scale=4.5)
    result, comps = _ours(flow_studio, "tiny-flux", request)
    assert comps.family == "flux" and comps.unet.config.guidance_embeds
    ref = _reference(comps, result.request)
    assert_close_scaled(result.latents[0], ref, what="flux")
    assert float((result.latents[0] - ref).abs().max()) < 1e-4
    # the guidance embedding is used: another scale gives another picture
    other, _ = _ours(flow_studio, "tiny-flux", request.replace(distilled_cfg_scale=1.0))
    assert float((other.latents[0] - result.latents[0]).abs().max()) > 1e-3


def test_flux_true_cfg_and_decoded_image_match_diffusers(flow_studio):
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="Euler", steps=STEPS, seed=8,
                                width=SIZE, height=SIZE, cfg_scale=2.0)
    result, comps = _ours(flow_studio, "tiny-flux", request)
    assert result.request.distilled_cfg_scale == 3.5  # FLUX's default, filled in for the infotext
    ref = _reference(comps, result.request, output_type="pt")
    from danqing.decode import decode_latents

    assert float((decode_latents(comps.vae, result.latents[0]) - ref).abs().max()) < 1e-4
