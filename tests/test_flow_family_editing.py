"""img2img, inpaint and LoRA on SD3 and FLUX.1 through our loop: parity with diffusers'
``StableDiffusion3Img2ImgPipeline`` / ``FluxImg2ImgPipeline``, ``StableDiffusion3InpaintPipeline``
/ ``FluxInpaintPipeline`` and ``load_lora_weights`` on tiny random models, and the LoRA tag
against the same weights merged.

The tiny models are those of ``tests/test_flow_families.py`` (bundled ``tiny-sd3`` /
``tiny-flux`` configs, a toy T5 tokenizer), saved as diffusers folders into a temporary models
folder and loaded through the registry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity import assert_close_scaled
from PIL import Image
from test_flow_families import NEGATIVE, PROMPT, SIZE, tiny

from danqing import GenerationRequest
from danqing.errors import IncompatibleModel, InvalidRequest

STEPS = 4


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from danqing import Settings, Studio
    from danqing.models.loader import save_diffusers_folder

    root = tmp_path_factory.mktemp("flow-edit-models")
    for sub in ("checkpoints", "vae", "lora", "embeddings", "controlnet"):
        (root / sub).mkdir()
    save_diffusers_folder(tiny("sd3", 31), root / "checkpoints" / "tiny-sd3")
    save_diffusers_folder(tiny("flux", 33), root / "checkpoints" / "tiny-flux")
    home = tmp_path_factory.mktemp("flow-edit-home")
    return Studio(Settings(home=home, models_dir=root, device="cpu", dtype="fp32"))


def picture() -> Image.Image:
    """A smooth colour picture (gradients and a disc), SIZE x SIZE."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    disc = ((x - 0.4) ** 2 + (y - 0.6) ** 2 < 0.08).astype(np.float64)
    rgb = np.stack([x, y * (1 - disc) + disc, 1 - x * y], -1)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8))


def block_mask() -> Image.Image:
    """White (repaint) on a block aligned to the 16-pixel grid, black elsewhere."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[16:48, 32:64] = 255
    return Image.fromarray(m)


def _pipe(comps, kind: str, scheduler):
    import diffusers

    name = {("sd3", "img2img"): "StableDiffusion3Img2ImgPipeline", ("sd3", "inpaint"): "StableDiffusion3InpaintPipeline",
            ("flux", "img2img"): "FluxImg2ImgPipeline", ("flux", "inpaint"): "FluxInpaintPipeline",
            ("sd3", "txt2img"): "StableDiffusion3Pipeline", ("flux", "txt2img"): "FluxPipeline"}[comps.family, kind]
    parts = dict(transformer=comps.unet, scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder,
                 tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2)
    if comps.family == "sd3":
        parts.update(text_encoder_3=comps.text_encoder_3, tokenizer_3=comps.tokenizer_3)
    pipe = getattr(diffusers, name)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(comps, request, kind: str, **extra):
    """diffusers' pipeline on the same modules, scheduler config, seeds and prompts; final latents."""
    from danqing.sampling.samplers import make_scheduler

    scheduler = make_scheduler(comps.scheduler_config, request.sampler, request.schedule, shift=request.shift)
    pipe = _pipe(comps, kind, scheduler)
    generator = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.batch_size)]
    common = dict(prompt=request.prompt, num_inference_steps=request.steps, height=request.height,
                  width=request.width, generator=generator, output_type="latent",
                  num_images_per_prompt=request.batch_size, **extra)
    if kind != "txt2img":
        common["strength"] = request.denoising_strength
    with torch.no_grad():
        if comps.family == "sd3":
            return pipe(negative_prompt=request.negative_prompt, guidance_scale=request.cfg_scale, **common).images
        out = pipe(guidance_scale=request.distilled_cfg_scale, **common).images
    return pipe._unpack_latents(out, request.height, request.width, pipe.vae_scale_factor)


# -- img2img and inpaint -----------------------------------------------------------------------------
@pytest.mark.parametrize("family, strength", [("sd3", 0.6), ("flux", 0.6), ("flux", 0.75)])
def test_img2img_matches_diffusers(studio, family, strength):
    """strength 0.6 of 4 steps starts at step int(4 - 2.4) = 1, as the flow pipelines do (the
    UNet pipelines' rule, 4 - int(2.4) = 2, would be a step off and fail)."""
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE if family == "sd3" else "", sampler="Euler",
                                steps=STEPS, seed=4321, width=SIZE, height=SIZE, batch_size=2,
                                cfg_scale=4.0 if family == "sd3" else 1.0, denoising_strength=strength)
    init = picture()
    result = studio.generate(request.replace(model=f"tiny-{family}"), init_image=init)
    comps = studio.models.load(f"tiny-{family}").components
    ref = _reference(comps, result.request, "img2img", image=[init] * request.batch_size)  # one per generator
    assert_close_scaled(result.latents[0], ref, what=f"{family} img2img")
    assert float((result.latents[0] - ref).abs().max()) < 1e-4
    # the init picture is used: txt2img from the same seed lands elsewhere
    plain = studio.generate(request.replace(model=f"tiny-{family}", denoising_strength=0.75))
    assert float((plain.latents[0] - result.latents[0]).abs().max()) > 1e-2


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_inpaint_matches_diffusers_and_keeps_the_unmasked_pixels(studio, family):
    request = GenerationRequest(prompt=PROMPT, sampler="Euler", steps=STEPS, seed=99, width=SIZE, height=SIZE,
                                cfg_scale=1.0, denoising_strength=0.8, mask_blur=0)
    init, mask = picture(), block_mask()
    result = studio.generate(request.replace(model=f"tiny-{family}"), init_image=init, mask_image=mask)
    comps = studio.models.load(f"tiny-{family}").components
    ref = _reference(comps, result.request, "inpaint", image=init, mask_image=mask)
    assert_close_scaled(result.latents[0], ref, what=f"{family} inpaint")
    assert float((result.latents[0] - ref).abs().max()) < 1e-4
    out, before = np.asarray(result.images[0]).astype(int), np.asarray(init).astype(int)
    keep = np.asarray(mask) == 0
    assert (out[keep] == before[keep]).all()  # A1111's overlay: outside the mask, the init picture
    assert np.abs(out[~keep] - before[~keep]).mean() > 1.0  # inside, repainted


def test_flux_img2img_infotext_recreates(studio, tmp_path):
    """``generate --from``: the infotext of a FLUX img2img names its init picture and re-creates it."""
    from danqing.outputs.metadata import request_from_infotext

    picture().save(tmp_path / "init.png")
    request = GenerationRequest(prompt=PROMPT, sampler="Euler", steps=3, seed=5, width=SIZE, height=SIZE,
                                cfg_scale=1.0, denoising_strength=0.5, shift=2.0, model="tiny-flux",
                                init_image=str(tmp_path / "init.png"))
    result = studio.generate(request)
    text = result.infotexts[0]
    assert "Denoising strength: 0.5" in text and "Distilled CFG Scale: 3.5" in text and "Init image:" in text
    again = studio.generate(request_from_infotext(text))
    assert again.images[0].tobytes() == result.images[0].tobytes()
