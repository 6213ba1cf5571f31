"""IP-Adapter image prompts: parity with diffusers' pipeline (base and "plus" adapters), weight 0,
the UNet restored after every request, infotext round trip, missing files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from parity import assert_close_scaled

from danqing import GenerationRequest, Settings, Studio
from danqing.errors import InvalidRequest, ModelNotFound

SMALL = dict(width=64, height=64, steps=4, seed=3, sampler="Euler", cfg_scale=6.0, prompt="a red circle",
             negative_prompt="blurry")
ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8, projection_dim=24)


def _rand(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def _adapter_state(unet, *, plus: bool, seed: int = 0) -> dict:
    """A random IP-Adapter in the original release's layout (``image_proj`` + ``ip_adapter``,
    keys numbered 1, 3, 5, ... over the UNet's cross-attention processors, as diffusers reads them)."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    if plus:  # the IP-Adapter repo's Resampler: depth 4, 64-wide heads, ff mult 4
        dim, queries = 64, 4
        proj = {"latents": _rand(g, 1, queries, dim), "proj_in.weight": _rand(g, dim, ENCODER["hidden_size"]),
                "proj_in.bias": _rand(g, dim), "proj_out.weight": _rand(g, cross, dim), "proj_out.bias": _rand(g, cross),
                "norm_out.weight": 1 + _rand(g, cross), "norm_out.bias": _rand(g, cross)}
        for i in range(4):
            proj.update({f"layers.{i}.0.norm1.weight": 1 + _rand(g, dim), f"layers.{i}.0.norm1.bias": _rand(g, dim),
                         f"layers.{i}.0.norm2.weight": 1 + _rand(g, dim), f"layers.{i}.0.norm2.bias": _rand(g, dim),
                         f"layers.{i}.0.to_q.weight": _rand(g, dim, dim), f"layers.{i}.0.to_kv.weight": _rand(g, 2 * dim, dim),
                         f"layers.{i}.0.to_out.weight": _rand(g, dim, dim), f"layers.{i}.1.0.weight": 1 + _rand(g, dim),
                         f"layers.{i}.1.0.bias": _rand(g, dim), f"layers.{i}.1.1.weight": _rand(g, 4 * dim, dim),
                         f"layers.{i}.1.3.weight": _rand(g, dim, 4 * dim)})
    else:
        proj = {"proj.weight": _rand(g, 4 * cross, ENCODER["projection_dim"]), "proj.bias": _rand(g, 4 * cross),
                "norm.weight": 1 + _rand(g, cross), "norm.bias": _rand(g, cross)}
    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        to_k = unet.get_submodule(name.removesuffix(".processor")).to_k.weight
        ip[f"{key_id}.to_k_ip.weight"] = _rand(g, *to_k.shape, scale=1.0)
        ip[f"{key_id}.to_v_ip.weight"] = _rand(g, *to_k.shape, scale=1.0)
        key_id += 2
    return {"image_proj": proj, "ip_adapter": ip}


def _save_safetensors(state: dict, path) -> None:
    from safetensors.torch import save_file

    save_file({f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()}, str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, models_dir):
    """A Studio whose models folder has tiny-sd1, two adapters (base .safetensors, plus .bin)
    and a tiny CLIP vision encoder; and a picture."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("ipa")
    models = root / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copytree(models_dir / "checkpoints" / "tiny-sd1", models / "checkpoints" / "tiny-sd1")
    studio = Studio(Settings(home=root, models_dir=models, device="cpu", dtype="fp32"))
    unet = studio.models.load("tiny-sd1").components.unet
    (models / "ipadapter").mkdir()
    _save_safetensors(_adapter_state(unet, plus=False, seed=1), models / "ipadapter" / "ip-adapter_tiny.safetensors")
    torch.save(_adapter_state(unet, plus=True, seed=2), models / "ipadapter" / "ip-adapter-plus_tiny.bin")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).save_pretrained(models / "clip_vision" / "tiny-encoder")
    picture = root / "style.png"
    rgb = np.zeros((48, 40, 3), np.uint8)
    rgb[:, :20] = (230, 40, 30)
    rgb[10:30, 20:] = (20, 90, 200)
    Image.fromarray(rgb).save(picture)
    return studio, models, picture


def _diffusers(studio, models, picture, request, weight_name):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    from danqing.sampling.samplers import make_scheduler

    c = studio.models.load("tiny-sd1").components
    encoder = CLIPVisionModelWithProjection.from_pretrained(models / "clip_vision" / "tiny-encoder")
    from danqing.models.ip_adapter import image_processor

    unet = type(c.unet).from_config(c.unet.config)
    unet.load_state_dict(c.unet.state_dict())  # a copy: load_ip_adapter changes the UNet it is given
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=unet.eval(),
                                   scheduler=make_scheduler(c.scheduler_config, request.sampler, request.schedule,
                                                            seed=request.seed),
                                   safety_checker=None, feature_extractor=image_processor(None, ENCODER["image_size"]),
                                   image_encoder=encoder, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(models / "ipadapter"), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(request.ip_adapter_weight)
    with torch.no_grad():
        return pipe(request.prompt, negative_prompt=request.negative_prompt, ip_adapter_image=Image.open(picture).convert("RGB"),
                    num_inference_steps=request.steps, guidance_scale=request.cfg_scale, height=64, width=64,
                    generator=[torch.Generator("cpu").manual_seed(request.seed)], output_type="latent").images


@pytest.mark.parametrize("adapter,weight_name", [("ip-adapter_tiny", "ip-adapter_tiny.safetensors"),
                                                 ("ip-adapter-plus_tiny", "ip-adapter-plus_tiny.bin")])
def test_matches_diffusers_and_restores_the_unet(setup, adapter, weight_name):
    studio, models, picture = setup
    unet = studio.models.load("tiny-sd1").components.unet
    procs = dict(unet.attn_processors)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = studio.generate(GenerationRequest(model="tiny-sd1", **SMALL))
    request = GenerationRequest(model="tiny-sd1", ip_adapter=adapter, ip_adapter_image=(str(picture),),
                                ip_adapter_weight=0.8, **SMALL)
    ours = studio.generate(request).latents[0]
    ref = _diffusers(studio, models, picture, request, weight_name)
    assert_close_scaled(ours, ref)  # relative to the latents' scale (tests/parity.py)
    assert (ours - plain.latents[0]).abs().max().item() > 1e-3  # the picture did something
    # the shared UNet is back: the same processor objects, no projection, same weights and config
    assert all(unet.attn_processors[k] is v for k, v in procs.items())
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert unet.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    again = studio.generate(GenerationRequest(model="tiny-sd1", **SMALL))
    assert again.images[0].tobytes() == plain.images[0].tobytes()


def test_sdxl_matches_diffusers(setup, models_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPVisionModelWithProjection

    from danqing.models.ip_adapter import image_processor
    from danqing.sampling.samplers import make_scheduler

    _, models, picture = setup
    xl_models = tmp_path / "models"
    (xl_models / "checkpoints").mkdir(parents=True)
    shutil.copytree(models_dir / "checkpoints" / "tiny-sdxl", xl_models / "checkpoints" / "tiny-sdxl")
    shutil.copytree(models / "clip_vision", xl_models / "clip_vision")
    studio = Studio(Settings(home=tmp_path, models_dir=xl_models, device="cpu", dtype="fp32"))
    c = studio.models.load("tiny-sdxl").components
    (xl_models / "ipadapter").mkdir()
    _save_safetensors(_adapter_state(c.unet, plus=False, seed=4), xl_models / "ipadapter" / "ip-adapter_xl.safetensors")
    request = GenerationRequest(model="tiny-sdxl", ip_adapter_image=(str(picture),), ip_adapter_weight=0.8, **SMALL)
    ours = studio.generate(request).latents[0]

    unet = type(c.unet).from_config(c.unet.config)
    unet.load_state_dict(c.unet.state_dict())
    pipe = StableDiffusionXLPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2, unet=unet.eval(),
        scheduler=make_scheduler(c.scheduler_config, request.sampler, request.schedule, seed=request.seed),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(xl_models / "clip_vision" / "tiny-encoder"),
        feature_extractor=image_processor(None, ENCODER["image_size"]))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(xl_models / "ipadapter"), subfolder="", weight_name="ip-adapter_xl.safetensors",
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.8)
    with torch.no_grad():
        ref = pipe(request.prompt, negative_prompt=request.negative_prompt, ip_adapter_image=Image.open(picture).convert("RGB"),
                   num_inference_steps=request.steps, guidance_scale=request.cfg_scale, height=64, width=64,
                   generator=[torch.Generator("cpu").manual_seed(request.seed)], output_type="latent").images
    assert_close_scaled(ours, ref)


def test_hires_and_img2img_take_the_image_prompt(setup):
    studio, models, picture = setup
    base = GenerationRequest(model="tiny-sd1", ip_adapter="ip-adapter_tiny", ip_adapter_image=(str(picture),), **SMALL)
    for req in (base.replace(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5),
                base.replace(init_image=str(picture), denoising_strength=0.6, batch_size=2)):
        with_ip = studio.generate(req).images
        without = studio.generate(req.replace(ip_adapter=None, ip_adapter_image=())).images
        assert len(with_ip) == len(without) and with_ip[0].tobytes() != without[0].tobytes()


def test_weight_zero_is_no_adapter_and_infotext_round_trips(setup, tmp_path):
    from danqing.outputs.metadata import request_from_infotext
    from danqing.outputs.store import read_infotext

    studio, models, picture = setup
    plain = studio.generate(GenerationRequest(model="tiny-sd1", **SMALL)).latents[0]
    zero = studio.generate(GenerationRequest(model="tiny-sd1", ip_adapter="ip-adapter_tiny", ip_adapter_image=(str(picture),),
                                             ip_adapter_weight=0.0, **SMALL)).latents[0]
    assert_close_scaled(zero, plain, rtol=1e-6)  # weight 0 adds zeros: summation order only
    request = GenerationRequest(model="tiny-sd1", ip_adapter_image=(str(picture), str(picture)), ip_adapter="ip-adapter_tiny",
                                ip_adapter_weight=0.5, **SMALL)
    result = studio.generate(request, save=True, out_dir=tmp_path)
    text = read_infotext(result.paths[0])
    assert "IP-Adapter: ip-adapter_tiny [" in text and "IP-Adapter weight: 0.5" in text
    back = request_from_infotext(text)
    assert back.ip_adapter_image == request.ip_adapter_image and back.ip_adapter_encoder == "tiny-encoder"
    assert studio.generate(back).images[0].tobytes() == result.images[0].tobytes()


def test_missing_files_and_bad_requests(setup, tmp_path):
    studio, models, picture = setup
    empty = tmp_path / "models"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copytree(models / "checkpoints" / "tiny-sd1", empty / "checkpoints" / "tiny-sd1")
    bare = Studio(Settings(home=tmp_path, models_dir=empty, device="cpu", dtype="fp32"))
    req = GenerationRequest(model="tiny-sd1", ip_adapter_image=(str(picture),), **SMALL)
    with pytest.raises(ModelNotFound, match="no IP-Adapter in .*ipadapter; put the weight file there"):
        bare.generate(req)
    (empty / "ipadapter").mkdir()
    shutil.copy(models / "ipadapter" / "ip-adapter_tiny.safetensors", empty / "ipadapter")
    with pytest.raises(ModelNotFound, match="needs an image encoder .*clip_vision has none; put the CLIP vision encoder"):
        bare.generate(req)
    with pytest.raises(InvalidRequest, match="several IP-Adapters are installed"):
        studio.generate(req)
    with pytest.raises(ModelNotFound, match="IP-Adapter 'nope' not found"):
        studio.generate(req.replace(ip_adapter="nope"))
    with pytest.raises(InvalidRequest, match="^ip_adapter_image: "):
        studio.generate(req.replace(ip_adapter="ip-adapter_tiny", ip_adapter_image=(str(tmp_path / "missing.png"),)))
    with pytest.raises(InvalidRequest, match="needs at least one picture"):
        GenerationRequest.create(ip_adapter="ip-adapter_tiny")
    with pytest.raises(InvalidRequest, match="between 0 \\(no effect\\) and 2"):
        GenerationRequest.create(ip_adapter_image=("a.png",), ip_adapter_weight=3)
    with pytest.raises(InvalidRequest, match="Prompt-to-Prompt"):
        GenerationRequest.create(ip_adapter_image=("a.png",), p2p_source="a cat", prompt="a dog")


def test_cli_option():
    from danqing.cli import parse_ip_adapter_option

    assert parse_ip_adapter_option(["a.png:0.6", "b.png:0.6"]) == {"ip_adapter_image": ("a.png", "b.png"), "ip_adapter_weight": 0.6}
    assert parse_ip_adapter_option(["C:/pics/a.png"]) == {"ip_adapter_image": ("C:/pics/a.png",)}
    with pytest.raises(InvalidRequest, match="share one weight"):
        parse_ip_adapter_option(["a.png:0.5", "b.png:1"])


def test_a1111_controlnet_ip_adapter_unit(setup, tmp_path):
    """A1111 clients send IP-Adapter as a ControlNet-extension unit in alwayson_scripts."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from server_helpers import make_app

    from danqing.server.a1111 import Txt2ImgBody, request_fields

    studio, models, picture = setup
    buf = io.BytesIO()
    Image.open(picture).save(buf, format="PNG")
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny [0123abcd]", "weight": 0.8,
            "image": base64.b64encode(buf.getvalue()).decode()}
    body = {"prompt": SMALL["prompt"], "negative_prompt": SMALL["negative_prompt"], "seed": SMALL["seed"],
            "steps": SMALL["steps"], "cfg_scale": SMALL["cfg_scale"], "width": 64, "height": 64,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
            "alwayson_scripts": {"controlnet": {"args": [unit, {"enabled": False, "module": "canny"}]}}}
    with TestClient(make_app(tmp_path / "home", studio=studio)) as client:
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        info = answer.json()["info"]
        assert "IP-Adapter: ip-adapter_tiny [" in info and "IP-Adapter weight: 0.8" in info
        bad = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
            {**unit, "module": "canny"}]}}})
        # a canny unit is a ControlNet unit: its model must be a ControlNet
        assert bad.status_code == 422 and "unknown controlnet 'ip-adapter_tiny'" in bad.text
    f = request_fields(Txt2ImgBody(alwayson_scripts={"controlnet": {"args": [unit]}}), img2img=False)
    assert (f["ip_adapter"], f["ip_adapter_weight"]) == ("ip-adapter_tiny", 0.8)


def test_job_api_takes_base64_pictures(setup, tmp_path):
    import base64
    import io

    from fastapi.testclient import TestClient
    from server_helpers import make_app

    studio, models, picture = setup
    buf = io.BytesIO()
    Image.open(picture).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    request = {**SMALL, "model": "tiny-sd1", "ip_adapter": "ip-adapter_tiny", "ip_adapter_weight": 0.6}
    with TestClient(make_app(tmp_path / "home", studio=studio)) as client:
        job = client.post("/api/v1/jobs", json={"request": request, "ip_adapter_images": [b64], "save": False})
        assert job.status_code == 202, job.text
        done = client.get(f"/api/v1/jobs/{job.json()['id']}/wait", params={"timeout": 120}).json()
        assert done["status"] == "done", done
        assert "IP-Adapter: ip-adapter_tiny [" in done["result"]["images"][0]["infotext"]
        both = client.post("/api/v1/jobs", json={"request": {**request, "ip_adapter_image": ["/etc/passwd"]},
                                                 "ip_adapter_images": [b64]})
        assert both.status_code == 422 and "not both" in both.text
        path = client.post("/api/v1/jobs", json={"request": {**request, "ip_adapter_image": ["/etc/hostname"]}})
        assert path.status_code == 422 and "paths are not accepted over HTTP" in path.text
