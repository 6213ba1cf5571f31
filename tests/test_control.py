"""ControlNet / T2I-Adapter: parity with diffusers' pipelines, multi-unit algebra, control modes,
loading (folders, single files), bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from parity import assert_close_scaled

from danqing import GenerationRequest
from danqing.conditioning.control import block_scales, control_keep, pixel_perfect_resolution
from danqing.errors import IncompatibleModel, InvalidRequest
from danqing.request import ControlUnit
from danqing.sampling.samplers import make_scheduler

SIZE = 64
STEPS = 6
PROMPT = "a red circle left of a blue star"
NEGATIVE = "blurry"


def hint_channels(vae) -> tuple[int, ...]:
    """The ControlNet hint encoder's channels for a VAE of downscale factor 2**k: k+1 levels."""
    k = len(vae.config.block_out_channels) - 1
    return tuple(16 * 2 ** i for i in range(k + 1))


def random_controlnet(comps, seed: int):
    """ControlNetModel.from_unet (the paper's trainable copy), zero convolutions made random so
    the control does something."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(comps.unet, conditioning_embedding_out_channels=hint_channels(comps.vae))
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.2)
    return cn.eval()


@pytest.fixture(scope="module")
def control_setup(studio, models_dir, tiny_components, tmp_path_factory):
    root = models_dir / "controlnet"
    comps = tiny_components["tiny-sd1"]
    for name, seed in (("tiny-cn-a", 10), ("tiny-cn-b", 11)):
        if not (root / name).exists():
            random_controlnet(comps, seed).save_pretrained(root / name)
    if not (root / "tiny-sdxl-cn").exists():
        random_controlnet(tiny_components["tiny-sdxl"], 12).save_pretrained(root / "tiny-sdxl-cn")
    d = tmp_path_factory.mktemp("control")
    rng = np.random.default_rng(0)
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[16:48, 8:30] = 255
    a[rng.random((SIZE, SIZE)) < 0.05] = 128
    Image.fromarray(a).save(d / "hint.png")
    Image.fromarray(255 - a).save(d / "hint2.png")
    return d


def _reference(studio, request, units, *, guess=False):
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline

    comps = studio.models.load("tiny-sd1").components
    nets = [studio.models.load_control(u.model).model for u in units]
    scheduler = make_scheduler(comps.scheduler_config, request.sampler, request.schedule, seed=request.seed)
    pipe = StableDiffusionControlNetPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        controlnet=nets[0] if len(nets) == 1 else MultiControlNetModel(nets), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = [Image.open(u.image).convert("RGB") for u in units]
    one = len(units) == 1
    with torch.no_grad():
        out = pipe(request.prompt, negative_prompt=request.negative_prompt, image=images[0] if one else images,
                   num_inference_steps=request.steps, guidance_scale=request.cfg_scale, height=SIZE, width=SIZE,
                   generator=[torch.Generator("cpu").manual_seed(request.seed)], output_type="latent",
                   controlnet_conditioning_scale=units[0].weight if one else [u.weight for u in units],
                   control_guidance_start=units[0].guidance_start if one else [u.guidance_start for u in units],
                   control_guidance_end=units[0].guidance_end if one else [u.guidance_end for u in units],
                   guess_mode=guess)
    return out.images


def _req(units, **kw):
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, model="tiny-sd1", sampler="DPM++ 2M", steps=STEPS,
                seed=42, width=SIZE, height=SIZE, cfg_scale=6.0, controlnet=tuple(units))
    return GenerationRequest(**{**base, **kw})


def test_pure_helpers():
    assert [control_keep(i, 10, 0.2, 0.8) for i in range(10)] == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    s = block_scales(13, "My prompt is more important", False)
    assert s[-1] == 1.0 and math.isclose(s[0], 0.825 ** 12)
    g = block_scales(13, "Balanced", True)
    assert torch.allclose(torch.tensor(g), torch.logspace(-1, 0, 13, dtype=torch.float64).float())
    assert block_scales(7, "Balanced", False) == [1.0] * 7
    # pixel perfect: a 1024x768 map for a 512x512 output lands at short side 512 ("crop"), 384 ("fill")
    assert pixel_perfect_resolution(1024, 768, 512, 512, "Crop and Resize") == 512
    assert pixel_perfect_resolution(1024, 768, 512, 512, "Resize and Fill") == 384


@pytest.mark.parametrize("weight,start,end", [(1.0, 0.0, 1.0), (0.6, 0.2, 0.7)])
def test_controlnet_matches_diffusers(studio, control_setup, weight, start, end):
    unit = ControlUnit(model="tiny-cn-a", image=str(control_setup / "hint.png"), weight=weight,
                       guidance_start=start, guidance_end=end)
    req = _req([unit])
    ours = studio.generate(req, save=False).latents[0]
    ref = _reference(studio, req, [unit])
    plain = studio.generate(req.replace(controlnet=()), save=False).latents[0]
    assert (ours - plain).abs().max() > 1e-2  # the control changes the picture
    assert_close_scaled(ours, ref)  # relative to the latents' scale (tests/parity.py)


def test_guess_mode_matches_diffusers(studio, control_setup):
    unit = ControlUnit(model="tiny-cn-a", image=str(control_setup / "hint.png"), guess_mode=True)
    req = _req([unit])
    assert_close_scaled(studio.generate(req, save=False).latents[0], _reference(studio, req, [unit], guess=True))


def test_multi_controlnet_matches_diffusers_and_weight_zero_is_single(studio, control_setup):
    a = ControlUnit(model="tiny-cn-a", image=str(control_setup / "hint.png"), weight=0.8)
    b = ControlUnit(model="tiny-cn-b", image=str(control_setup / "hint2.png"), weight=0.5, guidance_end=0.5)
    req = _req([a, b])
    ours = studio.generate(req, save=False).latents[0]
    assert_close_scaled(ours, _reference(studio, req, [a, b]))
    single = studio.generate(_req([a]), save=False).latents[0]
    zero = studio.generate(_req([a, b.model_copy(update={"weight": 0.0})]), save=False).latents[0]
    assert_close_scaled(zero, single, rtol=1e-6)  # a zero-weight unit adds zeros: summation order only
    assert (ours - single).abs().max() > 1e-3


def test_control_modes_differ_and_cfg_injection_leaves_uncond(studio, control_setup, monkeypatch):
    """'ControlNet is more important' = soft weights b**(K-k) on the conditional half only. With
    b = 10**(-1/K) that is exactly diffusers' guess mode (logspace(-1, 0)), so the two must agree."""
    from danqing.conditioning import control

    hint = str(control_setup / "hint.png")
    out = {}
    for mode in ("Balanced", "My prompt is more important", "ControlNet is more important"):
        out[mode] = studio.generate(_req([ControlUnit(model="tiny-cn-a", image=hint, control_mode=mode)]),
                                    save=False).latents[0]
    plain = studio.generate(_req([]), save=False).latents[0]
    d = {k: (v - plain).abs().mean().item() for k, v in out.items()}
    assert d["My prompt is more important"] < d["Balanced"]  # faded residuals
    n_res = len(studio.models.load("tiny-sd1").components.unet.down_blocks) * 2 + 1  # conv_in + resnets + downsamplers + mid
    monkeypatch.setattr(control, "SOFT_BASE", 10 ** (-1 / (n_res - 1)))
    req = _req([ControlUnit(model="tiny-cn-a", image=hint, control_mode="ControlNet is more important")])
    ours = studio.generate(req, save=False).latents[0]
    unit = ControlUnit(model="tiny-cn-a", image=hint)
    assert_close_scaled(ours, _reference(studio, req, [unit], guess=True))


def test_img2img_and_inpaint_take_control(studio, control_setup, tmp_path):
    hint = str(control_setup / "hint.png")
    init = tmp_path / "init.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[:, 32:] = 255
    Image.fromarray(m).save(mask)
    unit = ControlUnit(model="tiny-cn-a", image=hint)
    for extra in ({"init_image": str(init)}, {"init_image": str(init), "mask": str(mask)}):
        with_c = studio.generate(_req([unit], denoising_strength=0.8, **extra), save=False)
        without = studio.generate(_req([], denoising_strength=0.8, **extra), save=False)
        a = np.asarray(with_c.images[0], np.float32)
        b = np.asarray(without.images[0], np.float32)
        assert np.abs(a - b).max() > 2
        if "mask" in extra:  # outside the mask the picture is kept either way
            assert np.abs(a[:, :24] - b[:, :24]).max() <= 1


def test_single_file_controlnet_loads_like_its_folder(studio, control_setup, models_dir):
    from safetensors.torch import save_file

    from danqing.models.control import load_control_model
    from danqing.models.registry import Registry

    folder = models_dir / "controlnet" / "tiny-cn-a"
    net = studio.models.load_control("tiny-cn-a").model
    path = models_dir / "controlnet" / "tiny-cn-file.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"config": net.to_json_string()})
    loaded, kind = load_control_model(Registry(models_dir).find("controlnet", "tiny-cn-file"))
    assert kind == "controlnet"
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert (folder / "config.json").is_file()


def test_bad_input(studio, control_setup, tmp_path):
    hint = str(control_setup / "hint.png")
    with pytest.raises(IncompatibleModel, match=r"tiny-sdxl-cn.*sdxl.*tiny-sd1"):
        studio.generate(_req([ControlUnit(model="tiny-sdxl-cn", image=hint)]), save=False)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InvalidRequest, match="controlnet.image.*unreadable"):
        studio.generate(_req([ControlUnit(model="tiny-cn-a", image=str(bad))]), save=False)
    with pytest.raises(InvalidRequest, match=r"unknown preprocessor 'sobel'; available: none, invert, canny"):
        GenerationRequest.create(controlnet=[{"model": "tiny-cn-a", "image": hint, "module": "sobel"}])
    with pytest.raises(InvalidRequest, match="weight: must be between 0 and 2"):
        GenerationRequest.create(controlnet=[{"model": "tiny-cn-a", "image": hint, "weight": 3}])
    with pytest.raises(InvalidRequest, match="guidance_start"):
        GenerationRequest.create(controlnet=[{"model": "tiny-cn-a", "image": hint, "guidance_start": 0.9,
                                              "guidance_end": 0.1}])


def test_units_round_trip_through_infotext(tmp_path):
    from danqing.outputs.metadata import request_from_infotext, request_infotext

    weird = tmp_path / "a, b: c.png"
    units = (ControlUnit(model="cn/canny", image=str(weird), module="canny", weight=0.65, guidance_start=0.1,
                         guidance_end=0.9, control_mode="My prompt is more important", resize_mode="Resize and Fill",
                         pixel_perfect=True, threshold_a=80, threshold_b=160, guess_mode=True),
             ControlUnit(model="lineart", image="x.png"))
    req = GenerationRequest(prompt="p", seed=3, subseed=0, model="m", controlnet=units)
    text = request_infotext(req, seed=3, subseed=0, model_name="m", model_hash="0" * 64)
    assert 'ControlNet 0: "Module: canny, Model: cn/canny' in text
    back = request_from_infotext(text)
    assert back.controlnet == units
    # sd-webui-controlnet's own unit text (model title with its hash)
    a1111 = ('p\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, ControlNet 0: "Module: canny, '
             'Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512, '
             'Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, '
             'Control Mode: Balanced"')
    from danqing.errors import ImageError

    with pytest.raises(ImageError, match="controlnet.0.image"):  # no Image: an A1111 unit does not say which picture it used
        request_from_infotext(a1111)


def test_t2i_adapter_matches_diffusers(studio, control_setup, models_dir):
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    from danqing.models.families import components_from_configs, load_family_config
    from danqing.models.loader import save_diffusers_folder

    # SD1.5's first three down blocks have attention (the adapter feature is added before their
    # downsampler); tiny-sd1's first block has none, so the adapter test uses an all-attention copy.
    if not (models_dir / "checkpoints" / "tiny-sd1-attn").exists():
        cfg = load_family_config("tiny-sd1")
        cfg["unet"] = {**cfg["unet"], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}
        torch.manual_seed(4)
        save_diffusers_folder(components_from_configs("sd1", cfg), models_dir / "checkpoints" / "tiny-sd1-attn")
    comps = studio.models.load("tiny-sd1-attn").components
    path = models_dir / "controlnet" / "tiny-t2i"
    if not path.exists():
        torch.manual_seed(5)
        factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        T2IAdapter(in_channels=3, channels=list(comps.unet.config.block_out_channels), num_res_blocks=1,
                   downscale_factor=factor, adapter_type="full_adapter").save_pretrained(path)
    unit = ControlUnit(model="tiny-t2i", image=str(control_setup / "hint.png"), weight=0.8)
    req = _req([unit], model="tiny-sd1-attn")
    ours = studio.generate(req, save=False).latents[0]
    scheduler = make_scheduler(comps.scheduler_config, req.sampler, req.schedule, seed=req.seed)
    pipe = StableDiffusionAdapterPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                          unet=comps.unet, adapter=studio.models.load_control("tiny-t2i").model,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(req.prompt, negative_prompt=req.negative_prompt, image=Image.open(unit.image).convert("RGB"),
                   num_inference_steps=req.steps, guidance_scale=req.cfg_scale, height=SIZE, width=SIZE,
                   generator=[torch.Generator("cpu").manual_seed(req.seed)], output_type="latent",
                   adapter_conditioning_scale=0.8).images
    plain = studio.generate(req.replace(controlnet=()), save=False).latents[0]
    assert (ours - plain).abs().max() > 1e-2
    assert_close_scaled(ours, ref)


@pytest.mark.parametrize("prefix, suffix", [("", ".safetensors"), ("control_model.", ".safetensors"), ("", ".pth")])
def test_original_layout_single_file_loads_like_its_folder(tiny_components, tmp_path, prefix, suffix):
    """A ControlNet 1.1 (no prefix) / 1.0 ("control_model.") file in lllyasviel's layout, with
    SD's 8-level hint encoder, loads through diffusers' converter into the same weights."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from danqing.models.control import controlnet_to_ldm, load_control_model
    from danqing.models.registry import ModelEntry

    torch.manual_seed(7)
    net = ControlNetModel.from_unet(tiny_components["tiny-sd1"].unet)  # SD's hint channels (16, 32, 96, 256)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / f"control_tiny{suffix}"
    sd = {k: v.contiguous() for k, v in controlnet_to_ldm(net.state_dict(), dict(net.config), prefix).items()}
    assert any(k.startswith(prefix + "input_hint_block.14.") for k in sd)
    if suffix == ".pth":  # a pickle: read with torch.load(weights_only=True)
        torch.save({"state_dict": sd}, path)
    else:
        save_file(sd, str(path))
    (tmp_path / "control_tiny.json").write_text(net.to_json_string())  # tiny: no bundled family has its shape
    loaded, kind = load_control_model(ModelEntry("control_tiny", path, "controlnet", suffix.lstrip(".")))
    assert kind == "controlnet"
    ref = net.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_sdxl_controlnet_matches_diffusers(studio, control_setup):
    from diffusers import StableDiffusionXLControlNetPipeline

    unit = ControlUnit(model="tiny-sdxl-cn", image=str(control_setup / "hint.png"), weight=0.8)
    req = _req([unit], model="tiny-sdxl")
    ours = studio.generate(req, save=False).latents[0]
    comps = studio.models.load("tiny-sdxl").components
    scheduler = make_scheduler(comps.scheduler_config, req.sampler, req.schedule, seed=req.seed)
    pipe = StableDiffusionXLControlNetPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
        tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
        controlnet=studio.models.load_control("tiny-sdxl-cn").model, scheduler=scheduler,
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(req.prompt, negative_prompt=req.negative_prompt, image=Image.open(unit.image).convert("RGB"),
                   num_inference_steps=req.steps, guidance_scale=req.cfg_scale, height=SIZE, width=SIZE,
                   generator=[torch.Generator("cpu").manual_seed(req.seed)], output_type="latent",
                   controlnet_conditioning_scale=0.8).images
    plain = studio.generate(req.replace(controlnet=()), save=False).latents[0]
    assert (ours - plain).abs().max() > 1e-2
    assert_close_scaled(ours, ref)


def test_control_maps_fit_the_output_and_inpaint_marks_the_mask(tmp_path):
    """Resize modes and pixel perfect fit any picture to width x height; the inpaint module
    puts -1 where the mask repaints (ControlNet 1.1 inpaint's condition)."""
    from danqing.conditioning.control import control_map, image_tensor

    pic = tmp_path / "wide.png"
    a = np.zeros((60, 160, 3), np.uint8)
    a[:, 70:90] = 255
    Image.fromarray(a).save(pic)
    for mode in ("Just Resize", "Crop and Resize", "Resize and Fill"):
        for pp in (False, True):
            m = control_map(ControlUnit(model="x", image=str(pic), module="canny", resize_mode=mode,
                                        pixel_perfect=pp), 96, 64)
            assert m.size == (96, 64) and m.mode == "RGB"
    mask = Image.new("L", (160, 60), 0)
    mask.paste(255, (0, 0, 80, 60))
    cond = image_tensor(control_map(ControlUnit(model="x", image=str(pic), module="inpaint",
                                                resize_mode="Just Resize"), 64, 64, mask=mask))
    assert cond.shape == (1, 3, 64, 64)
    assert (cond[..., :, :30] == -1).all() and (cond[..., :, 34:] >= 0).all()


def test_hires_fix_keeps_the_control_in_its_second_pass(studio, control_setup, monkeypatch):
    from danqing.editing import hires

    hint = str(control_setup / "hint.png")
    unit = ControlUnit(model="tiny-cn-a", image=hint, resize_mode="Just Resize")
    hr = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6)
    both = studio.generate(_req([unit], **hr), save=False)
    assert both.images[0].size == (96, 96)
    seen = {}
    real = hires.run_hires

    def first_pass_only(*args, control=None, **kw):  # the same request, the second pass uncontrolled
        seen["size"] = tuple(control.units[0].image.shape[-2:])
        return real(*args, control=None, **kw)

    monkeypatch.setattr(hires, "run_hires", first_pass_only)
    first_only = studio.generate(_req([unit], **hr), save=False)
    assert seen["size"] == (96, 96)  # the map was made again at the second pass's size
    diff = (both.latents[0] - first_only.latents[0]).abs().max().item()
    assert diff > 1e-2, diff  # the second pass's control changes its result


def test_only_masked_inpaint_with_control_is_a_controlled_inpaint_of_the_crop(studio, control_setup, tmp_path):
    """"Only masked" with a ControlNet (sd-webui-controlnet's way): the control picture is cut
    with the same box as the init picture. Checked against doing it by hand: crop picture, mask
    and control picture with ``only_masked_box``, run a whole-picture inpaint with the control on
    the crop, paste it back. The mask (20x20 at (60, 70)) with padding 22 gives a 64x64 box, the
    output size, so no resizing blurs the comparison and the two must agree exactly (mask blur 0:
    outside the mask both keep the init picture, inside both are the same generation).
    Cropping matters: the whole control picture squeezed to 64x64 gives another picture; and
    pixels outside the mask are the init picture's."""
    from danqing.conditioning.control import control_map, image_tensor
    from danqing.editing.images import composite, resize_image
    from danqing.editing.img2img import only_masked_box

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:128, 0:128]
    init = np.stack([xx * 2, yy * 2, 255 - xx - yy // 2], axis=2).astype(np.uint8)
    init[40:100, 30:60] = (200, 40, 40)
    Image.fromarray(init).save(tmp_path / "init.png")
    m = np.zeros((128, 128), np.uint8)
    m[70:90, 60:80] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    hint = np.zeros((128, 128, 3), np.uint8)
    hint[50:110, 45:95] = 255
    hint[rng.random((128, 128)) < 0.05] = 128
    Image.fromarray(hint).save(tmp_path / "hint.png")
    unit = ControlUnit(model="tiny-cn-a", image=str(tmp_path / "hint.png"), resize_mode="Just Resize")
    common = dict(denoising_strength=0.8, mask_blur=0)
    req = _req([unit], init_image=str(tmp_path / "init.png"), mask=str(tmp_path / "mask.png"),
               inpaint_full_res=True, inpaint_full_res_padding=22, **common)
    box = only_masked_box(Image.fromarray(init), Image.fromarray(m), req)
    assert box == (38, 48, 102, 112)
    got = np.asarray(studio.generate(req, save=False).images[0], np.int16)
    assert got.shape == (128, 128, 3)

    x1, y1, x2, y2 = box

    def by_hand(control_crop):
        """Inpaint of the crop (whole picture, with the control), pasted back into the init picture."""
        for name, a in (("c-init", init[y1:y2, x1:x2]), ("c-mask", m[y1:y2, x1:x2]), ("c-hint", control_crop)):
            Image.fromarray(np.ascontiguousarray(a)).save(tmp_path / f"{name}.png")
        out = studio.generate(_req([ControlUnit(model="tiny-cn-a", image=str(tmp_path / "c-hint.png"))],
                                   init_image=str(tmp_path / "c-init.png"), mask=str(tmp_path / "c-mask.png"),
                                   **common), save=False).images[0]
        canvas = Image.fromarray(init)
        canvas.paste(out, (x1, y1))
        return np.asarray(composite(Image.fromarray(init), canvas, m.astype(np.float32) / 255), np.int16)

    expect = by_hand(hint[y1:y2, x1:x2])
    assert np.array_equal(got, expect), np.abs(got - expect).max()
    inside = m > 0
    assert np.abs(got - init.astype(np.int16))[~inside].max() <= 1  # outside the mask: unchanged
    squeezed = by_hand(np.asarray(Image.fromarray(hint).resize((64, 64), Image.LANCZOS)))
    assert np.abs(got - squeezed)[inside].max() > 2  # the control picture is cropped, not squeezed
    plain = np.asarray(studio.generate(req.replace(controlnet=()), save=False).images[0], np.int16)
    assert np.abs(got - plain)[inside].max() > 2  # and it acts
    # a control picture of another size and shape: fitted to the full picture first (its resize
    # mode), then cut and resized as the init picture is
    wide = Image.fromarray(np.repeat(hint, 2, axis=1)[:100])
    wide.save(tmp_path / "wide.png")
    for mode in ("Just Resize", "Crop and Resize", "Resize and Fill"):
        u = ControlUnit(model="x", image=str(tmp_path / "wide.png"), resize_mode=mode)
        small = (40, 60, 72, 92)  # a 32x32 box, resized to 64x64
        out = control_map(u, 64, 64, crop=((128, 128), small))
        ref = resize_image(wide, 128, 128, mode.lower()).crop(small).resize((64, 64), Image.LANCZOS)
        assert np.array_equal(np.asarray(out), np.asarray(ref)), mode
    # the inpaint module marks the cropped mask (-1), cut from the full-size picture and mask
    cond = image_tensor(control_map(ControlUnit(model="x", image=str(tmp_path / "init.png"), module="inpaint",
                                                resize_mode="Just Resize"), 64, 64, mask=Image.fromarray(m),
                                    crop=((128, 128), box)))
    assert (cond[..., 22:42, 22:42] == -1).all() and int((cond == -1).sum()) == 3 * 20 * 20
    # a box smaller than the output (resized 2x) and the default mask blur: still only the mask changes
    blurred = studio.generate(req.replace(inpaint_full_res_padding=6, mask_blur=4), save=False).images[0]
    assert np.abs(np.asarray(blurred, np.int16) - init)[~inside].max() <= 1


def test_openpose_unit_detects_the_pose_of_a_picture(tmp_path, tiny_vitpose):
    """A unit with module "openpose" and a picture runs the ViTPose folder of models/preprocessors/
    at the processor resolution, then fits the drawn skeleton to the output like any map."""
    from skimage import data

    from danqing.conditioning.control import control_map
    from danqing.editing.images import resize_image
    from danqing.preprocess import run_preprocessor

    tiny_vitpose(tmp_path / "preprocessors" / "openpose")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    unit = ControlUnit(model="x", image=str(photo), module="openpose", processor_res=128, threshold_a=0.0)
    got = control_map(unit, 96, 64, models_dir=tmp_path)
    ref = resize_image(run_preprocessor("openpose", Image.open(photo).convert("RGB"), resolution=128, a=0.0,
                                        models_dir=tmp_path), 96, 64, "crop and resize")
    assert got.size == (96, 64) and np.array_equal(np.asarray(got), np.asarray(ref)) and np.asarray(got).max() > 0


def test_resumed_controlnet_training_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    """The ControlNet trainer resumes like the base trainer: a run stopped at a checkpoint and
    resumed ends with exactly the weights (trained and EMA) of a run that never stopped."""
    from safetensors.torch import load_file

    from danqing.training.config import ControlTrainConfig
    from danqing.training.controlnet import train_controlnet

    def cfg(out, steps):
        return ControlTrainConfig.model_validate({
            "data": {"n_images": 8, "captions_per_image": 1}, "controlnet": {"eval_maps": 0},
            "unet": {"steps": steps, "batch_size": 2, "warmup_steps": 1, "lr": 1e-3},
            "run": {"output_dir": str(out), "log_every": 1, "checkpoint_every": 2}})

    def weights(run):
        trained = load_file(run / "checkpoints" / "step-4" / "model.safetensors")
        return trained, load_file(run / "controlnet" / "diffusion_pytorch_model.safetensors")  # EMA, fp16

    train_controlnet(cfg(tmp_path / "straight", 4), log=lambda s: None)
    train_controlnet(cfg(tmp_path / "part", 2), log=lambda s: None)
    halfway = load_file(tmp_path / "part" / "checkpoints" / "step-2" / "model.safetensors")
    lines: list[str] = []
    summary = train_controlnet(cfg(tmp_path / "part", 4), resume=True, log=lines.append)
    assert summary["steps"] == 4 and any("resumed from" in s and "at step 2" in s for s in lines)
    for a, b in zip(weights(tmp_path / "straight"), weights(tmp_path / "part")):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = weights(tmp_path / "part")[0]
    assert not all(torch.equal(halfway[k], trained[k]) for k in trained)  # the resumed steps did train
    ema = [torch.load(tmp_path / run / "checkpoints" / "step-4" / "custom_checkpoint_0.pkl", weights_only=False)
           for run in ("straight", "part")]
    assert all(torch.equal(x, y) for x, y in zip(ema[0]["shadow_params"], ema[1]["shadow_params"]))
