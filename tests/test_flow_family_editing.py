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
@pytest.mark.parametrize("family, strength", [("sd3", 0.6), ("flux", 0.6)])
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


# -- LoRA: <lora:name:w> on the transformer ----------------------------------------------------------
RANK = 4


def _random_lora(comps, seed: int, pattern: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA (``transformer.<module>.lora_A/B.weight``) of rank 4 on every
    transformer Linear whose name ends with one of ``pattern``; factors large enough to move
    the picture (no alpha: scale 1, as diffusers/peft read it)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in comps.unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(pattern):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, mod.in_features, generator=g) * 0.2
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, RANK, generator=g) * 0.2
    return sd


def _lora_reference(comps, request, path, weight: float):
    """diffusers' pipeline with ``load_lora_weights`` (peft) on a copy of the transformer, scaled
    by ``joint_attention_kwargs={"scale": weight}``."""
    import copy
    import dataclasses

    from danqing.conditioning.prompt_parser import strip_extra_networks

    prompt = strip_extra_networks(request.prompt)[0]
    copied = dataclasses.replace(comps, unet=copy.deepcopy(comps.unet))
    from danqing.sampling.samplers import make_scheduler

    pipe = _pipe(copied, "txt2img", make_scheduler(comps.scheduler_config, request.sampler, request.schedule))
    pipe.load_lora_weights(str(path))
    generator = [torch.Generator("cpu").manual_seed(request.seed)]
    common = dict(prompt=prompt, num_inference_steps=request.steps, height=request.height, width=request.width,
                  generator=generator, output_type="latent", joint_attention_kwargs={"scale": weight})
    with torch.no_grad():
        if comps.family == "sd3":
            return pipe(negative_prompt=request.negative_prompt, guidance_scale=request.cfg_scale, **common).images
        out = pipe(guidance_scale=request.distilled_cfg_scale, **common).images
    return pipe._unpack_latents(out, request.height, request.width, pipe.vae_scale_factor)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_diffusers_format_lora_matches_load_lora_weights(studio, family):
    from safetensors.torch import save_file

    comps = studio.models.load(f"tiny-{family}").components
    before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    path = studio.registry.folder("lora") / f"{family}-attn.safetensors"
    save_file(_random_lora(comps, 7, ("to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "ff.net.0.proj")), str(path))
    request = GenerationRequest(prompt=f"{PROMPT} <lora:{family}-attn:0.7>", sampler="Euler", steps=3, seed=12,
                                width=SIZE, height=SIZE, cfg_scale=1.0, model=f"tiny-{family}")
    result = studio.generate(request)
    assert "Lora hashes:" in result.infotexts[0]
    ref = _lora_reference(comps, result.request, path, 0.7)
    assert_close_scaled(result.latents[0], ref, what=f"{family} LoRA")
    plain = studio.generate(request.replace(prompt=PROMPT))
    assert float((plain.latents[0] - result.latents[0]).abs().max()) > 1e-2  # the LoRA is applied
    # patched for the request only: the transformer is bit-identical afterwards
    assert all(torch.equal(v, comps.unet.state_dict()[k]) for k, v in before.items())


def test_lora_tag_equals_the_weights_merged(studio):
    """``<lora:x:0.6>`` draws what the checkpoint with W + 0.6 B A merged draws (merged here by
    hand, saved as another model)."""
    import copy
    import dataclasses

    from safetensors.torch import save_file

    from danqing.models.loader import save_diffusers_folder

    comps = studio.models.load("tiny-flux").components
    sd = _random_lora(comps, 8, ("attn.to_q", "attn.to_v", "attn.to_add_out", "norm1.linear", "proj_out"))
    save_file(sd, str(studio.registry.folder("lora") / "flux-merge.safetensors"))
    merged = copy.deepcopy(comps.unet)
    with torch.no_grad():
        for key, a in sd.items():
            if key.endswith("lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                b = sd[key.replace("lora_A", "lora_B")]
                merged.get_submodule(name).weight += 0.6 * (b @ a)
    save_diffusers_folder(dataclasses.replace(comps, unet=merged),
                          studio.registry.folder("checkpoint") / "tiny-flux-merged")
    request = GenerationRequest(prompt=PROMPT, sampler="Euler", steps=3, seed=3, width=SIZE, height=SIZE,
                                cfg_scale=1.0)
    tagged = studio.generate(request.replace(prompt=f"{PROMPT} <lora:flux-merge:0.6>", model="tiny-flux"))
    baked = studio.generate(request.replace(model="tiny-flux-merged"))
    assert_close_scaled(tagged.latents[0], baked.latents[0], rtol=1e-5, what="tag vs merged")


def _to_kohya(sd: dict[str, torch.Tensor], config: dict, alpha: float) -> dict[str, torch.Tensor]:
    """The diffusers-format LoRA ``sd`` in sd-scripts' FLUX layout: original module names, the
    q/k/v (and single blocks' q/k/v/mlp) parts stacked into one up over one shared down, the
    AdaLN output halves swapped; ``alpha`` stored (the ups scaled by rank / alpha to keep dW)."""
    from danqing.models.flow_files import flux_rules

    out = {}
    for orig, diff, how, full in flux_rules(config):
        if full or f"transformer.{diff[0]}.lora_A.weight" not in sd:
            continue
        downs = [sd[f"transformer.{d}.lora_A.weight"] for d in diff]
        assert all(torch.equal(downs[0], d) for d in downs)  # one shared down per fused module
        up = torch.cat([sd[f"transformer.{d}.lora_B.weight"] for d in diff]) * (RANK / alpha)
        if how == "swap":
            up = torch.cat(up.chunk(2)[::-1])
        key = "lora_unet_" + orig.replace(".", "_")
        out.update({f"{key}.lora_down.weight": downs[0].clone(), f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(alpha)})
    return out


def test_kohya_flux_lora_reads_as_its_diffusers_twin_and_matches_diffusers(studio):
    """An sd-scripts FLUX LoRA (``lora_unet_double_blocks_0_img_attn_qkv``: fused q/k/v over one
    down, ``single_blocks_0_linear1``: q/k/v/mlp, ``final_layer_adaLN_modulation_1``: halves
    swapped) draws what its diffusers-format twin draws; on the double blocks (diffusers'
    converter splits linear1 at the released width only) it matches ``load_lora_weights``."""
    from safetensors.torch import save_file

    comps = studio.models.load("tiny-flux").components
    config = dict(comps.unet.config)
    g = torch.Generator().manual_seed(9)
    twin = {}
    for name, mod in comps.unet.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        twin[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, RANK, generator=g) * 0.2
    downs: dict[int, torch.Tensor] = {}  # the fused modules share one down (by input width)
    for key in [k for k in twin]:
        mod = comps.unet.get_submodule(key.removeprefix("transformer.").removesuffix(".lora_B.weight"))
        twin[key.replace("lora_B", "lora_A")] = downs.setdefault(
            mod.in_features, torch.randn(RANK, mod.in_features, generator=g) * 0.2)
    kohya = _to_kohya(twin, config, alpha=2.0)
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya
    folder = studio.registry.folder("lora")
    save_file(kohya, str(folder / "flux-kohya.safetensors"))
    save_file({k: v.clone() for k, v in twin.items()}, str(folder / "flux-twin.safetensors"))
    request = GenerationRequest(prompt=PROMPT, sampler="Euler", steps=3, seed=21, width=SIZE, height=SIZE,
                                cfg_scale=1.0, model="tiny-flux")
    a = studio.generate(request.replace(prompt=f"{PROMPT} <lora:flux-kohya:0.8>"))
    b = studio.generate(request.replace(prompt=f"{PROMPT} <lora:flux-twin:0.8>"))
    assert_close_scaled(a.latents[0], b.latents[0], rtol=1e-5, what="kohya vs diffusers layout")
    plain = studio.generate(request)
    assert float((plain.latents[0] - a.latents[0]).abs().max()) > 1e-2
    double = {k: v for k, v in kohya.items() if "double_blocks" in k}
    save_file(double, str(folder / "flux-kohya-double.safetensors"))
    ours = studio.generate(request.replace(prompt=f"{PROMPT} <lora:flux-kohya-double:0.8>"))
    ref = _lora_reference(comps, ours.request, folder / "flux-kohya-double.safetensors", 0.8)
    assert_close_scaled(ours.latents[0], ref, what="kohya FLUX LoRA vs load_lora_weights")


def test_lora_for_another_family_is_one_line(studio):
    from safetensors.torch import save_file

    flux = studio.models.load("tiny-flux").components
    save_file(_random_lora(flux, 1, ("attn.to_q",)), str(studio.registry.folder("lora") / "flux-only.safetensors"))
    with pytest.raises((IncompatibleModel, InvalidRequest)) as err:
        studio.generate(GenerationRequest(prompt=f"{PROMPT} <lora:flux-only:1>", steps=2, seed=1, width=SIZE,
                                          height=SIZE, model="tiny-sd3"))
    assert "flux-only" in str(err.value) and "the LoRA is for flux" in str(err.value) and "\n" not in str(err.value)
