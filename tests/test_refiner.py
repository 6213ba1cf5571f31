"""SDXL refiner hand-off: the base model stops at ``refiner_switch_at`` and the refiner (OpenCLIP
bigG only, aesthetic-score time ids) finishes -- the same latents as diffusers' base pipeline
with ``denoising_end`` followed by its XL img2img pipeline with ``denoising_start``."""

from __future__ import annotations

import pytest
import torch
from parity import assert_close_scaled

from danqing import GenerationRequest
from danqing.errors import InvalidRequest
from danqing.models.families import build_components
from danqing.outputs.metadata import request_from_infotext, request_infotext
from danqing.sampling.samplers import make_scheduler
from danqing.studio import check_refiner, run_refiner, run_sampling

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def refiner():
    return build_components("tiny-sdxl-refiner", seed=2)


def _reference(base, ref, req):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    sched = lambda: make_scheduler(base.scheduler_config, req.sampler, req.schedule, seed=req.seed)  # noqa: E731
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                     tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                     scheduler=sched(), force_zeros_for_empty_prompt=True)
    pipe2 = StableDiffusionXLImg2ImgPipeline(vae=ref.vae, text_encoder=None, text_encoder_2=ref.text_encoder_2,
                                             tokenizer=None, tokenizer_2=ref.tokenizer_2, unet=ref.unet,
                                             scheduler=sched(), requires_aesthetics_score=True,
                                             force_zeros_for_empty_prompt=False)
    for p in (pipe, pipe2):
        p.set_progress_bar_config(disable=True)
    kw = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
              guidance_scale=req.cfg_scale, output_type="latent")
    with torch.no_grad():
        lat = pipe(**kw, height=req.height, width=req.width, denoising_end=req.refiner_switch_at,
                   generator=[torch.Generator("cpu").manual_seed(req.seed)]).images
        return lat, pipe2(**kw, image=lat, denoising_start=req.refiner_switch_at,
                          generator=[torch.Generator("cpu").manual_seed(req.seed)]).images


@pytest.mark.parametrize("sampler,switch", [("Euler", 0.8), ("DPM++ 2M", 0.6), ("Euler a", 0.75), ("Heun", 0.7)])
def test_base_to_refiner_hand_off_matches_diffusers(tiny_components, refiner, sampler, switch):
    base = tiny_components["tiny-sdxl"]
    req = GenerationRequest(prompt="a red circle", negative_prompt="blurry", sampler=sampler, steps=10, seed=3,
                            subseed=0, width=64, height=64, refiner_checkpoint="tiny-sdxl-refiner",
                            refiner_switch_at=switch)
    handed, _, _, _ = run_sampling(base, req, device=CPU, dtype=F32, denoising_end=switch)
    ours, _ = run_refiner(refiner, req, handed, device=CPU, dtype=F32)
    ref_handed, ref_out = _reference(base, refiner, req)
    assert_close_scaled(handed[0], ref_handed)  # relative to the latents' scale (tests/parity.py)
    assert_close_scaled(ours[0], ref_out)
    # the refiner did work: the result is not the hand-off
    assert (ours[0] - handed[0]).abs().max().item() > 1e-2


def test_refiner_folder_round_trip_and_checks(tmp_path, refiner):
    from danqing.models.loader import describe_checkpoint, load_diffusers_folder, save_diffusers_folder
    from danqing.models.registry import ModelEntry

    path = save_diffusers_folder(refiner, tmp_path / "refiner")
    assert not (path / "text_encoder").exists()
    back = load_diffusers_folder(path)
    assert back.family == "sdxl-refiner" and back.text_encoder is None and back.unet.config.in_channels == 4
    assert describe_checkpoint(ModelEntry("refiner", path, "checkpoint", "diffusers")) == "sdxl-refiner"
    check_refiner("sdxl", "sdxl-refiner", "r")
    check_refiner("sd1", "sd2", "r")
    with pytest.raises(InvalidRequest, match="same latent space"):
        check_refiner("sd1", "sdxl-refiner", "r")
    with pytest.raises(InvalidRequest, match="refiner_switch_at"):
        GenerationRequest.create(prompt="x", refiner_checkpoint="r", refiner_switch_at=1.0)
    with pytest.raises(InvalidRequest, match="enable_hr"):
        GenerationRequest.create(prompt="x", refiner_checkpoint="r", enable_hr=True)
    req = GenerationRequest.create(prompt="x", refiner_checkpoint="my-refiner", refiner_switch_at=0.7, seed=1)
    text = request_infotext(req, seed=1, subseed=0, model_name="m", model_hash="0" * 64,
                            refiner=("my-refiner", "abcdef0123456789"))
    assert "Refiner: my-refiner [abcdef0123], Refiner switch at: 0.7" in text
    back_req = request_from_infotext(text)
    assert back_req.refiner_checkpoint == "my-refiner" and back_req.refiner_switch_at == 0.7


def test_studio_runs_base_then_refiner(tmp_path, tiny_components, refiner):
    from danqing import Settings, Studio
    from danqing.models.loader import save_diffusers_folder

    for name, comps in (("tiny-sdxl", tiny_components["tiny-sdxl"]), ("tiny-sdxl-refiner", refiner),
                        ("tiny-sd1", tiny_components["tiny-sd1"])):
        save_diffusers_folder(comps, tmp_path / "models" / "checkpoints" / name)
    studio = Studio(Settings(home=tmp_path, models_dir=tmp_path / "models", device="cpu", dtype="fp32"))
    req = GenerationRequest.create(model="tiny-sdxl", prompt="a red circle", steps=6, seed=4, width=64, height=64,
                                   sampler="Euler", refiner_checkpoint="tiny-sdxl-refiner")
    res = studio.generate(req)
    assert res.images[0].size == (64, 64)
    assert "Refiner: tiny-sdxl-refiner [" in res.infotexts[0]
    with pytest.raises(InvalidRequest, match="same latent space"):
        studio.generate(req.replace(model="tiny-sd1"))


def test_single_file_refiner_loads_and_hands_off_like_its_folder(tmp_path, tiny_components, refiner):
    """A refiner written as one LDM-layout file (OpenCLIP bigG under conditioner.embedders.0)
    loads back bit for bit, diffusers' own single-file loader reads the same weights from it, and
    the hand-off gives the same image as the diffusers folder it came from."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from safetensors import safe_open

    from danqing import Settings, Studio
    from danqing.models.families import load_family_config
    from danqing.models.loader import describe_checkpoint, save_diffusers_folder
    from danqing.models.registry import ModelEntry
    from danqing.models.single_file import export_ldm_state_dict, load_single_file, save_single_file

    ckpts = tmp_path / "models" / "checkpoints"
    save_diffusers_folder(tiny_components["tiny-sdxl"], ckpts / "tiny-sdxl")
    folder = save_diffusers_folder(refiner, ckpts / "refiner-folder")
    path = save_single_file(refiner, ckpts / "refiner-file.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("conditioner.embedders.0.model.transformer.resblocks.") for k in keys)
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner"
    assert describe_checkpoint(ModelEntry("refiner-file", path, "checkpoint", "safetensors")) == "sdxl-refiner"

    back = load_single_file(path)
    assert back.family == "sdxl-refiner" and back.text_encoder is None and back.tokenizer is None
    for part in ("unet", "vae", "text_encoder_2"):
        mine, theirs = getattr(refiner, part).state_dict(), getattr(back, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), part
    # a file as shared online: no danqing header, configs given (a full-size one uses the bundled ones)
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file(export_ldm_state_dict(refiner), str(bare))
    assert torch.equal(load_single_file(bare, configs=load_family_config("tiny-sdxl-refiner")).unet.conv_in.weight,
                       refiner.unet.conv_in.weight)

    # diffusers' own reader of LDM single files, offline with the local folder as config
    pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder_2"):
        mine, theirs = getattr(refiner, part).state_dict(), getattr(pipe, part).state_dict()
        theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()} if part == "text_encoder_2" else theirs
        mine = {k.removeprefix("text_model."): v for k, v in mine.items()}
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), part

    studio = Studio(Settings(home=tmp_path, models_dir=tmp_path / "models", device="cpu", dtype="fp32"))
    req = GenerationRequest.create(model="tiny-sdxl", prompt="a red circle", negative_prompt="blurry", steps=6, seed=4,
                                   width=64, height=64, sampler="Euler", refiner_checkpoint="refiner-folder",
                                   refiner_switch_at=0.6)
    from_folder = studio.generate(req)
    from_file = studio.generate(req.replace(refiner_checkpoint="refiner-file"))
    # the same weights; float rounding of differently laid-out tensors only (measured 7.6e-6 on latents of ~30)
    assert_close_scaled(from_file.latents[0], from_folder.latents[0])
    import numpy as np

    assert np.abs(np.asarray(from_folder.images[0], int) - np.asarray(from_file.images[0], int)).max() <= 1
    assert "Refiner: refiner-file [" in from_file.infotexts[0]
