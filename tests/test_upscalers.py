"""Model upscalers and face restoration through spandrel, on tiny random models saved as the
files a user would drop into the models folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need_module
from PIL import Image

from danqing import GenerationRequest, Settings, Studio
from danqing.editing.upscalers import to_image, to_tensor, upscale_tensor
from danqing.models.upscalers import import_spandrel
from danqing.errors import InvalidRequest, ModelError


def _esrgan(scale: int = 4, seed: int = 0):
    """A tiny old-arch ESRGAN (RRDBNet): 1 RRDB block, 8 filters."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale).eval()


def _swinir(seed: int = 0):
    """A tiny SwinIR x2: one stage of one block, 12 channels, window 4."""
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(seed)
    return SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2.0, upscale=2,
                  upsampler="pixelshuffle", resi_connection="1conv").eval()


def _save(model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


def _picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colours plus a little texture (a model sees edges and flat areas)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


import_spandrel()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _save(_esrgan(), root / "upscalers" / "tiny-esrgan.pth")
    _save(_esrgan(seed=1), root / "ESRGAN" / "tiny-esrgan-st.safetensors")
    _save(_esrgan(scale=2, seed=2), root / "RealESRGAN" / "tiny-x2.pth")
    _save(_swinir(), root / "SwinIR" / "tiny-swinir.safetensors")
    return root


@pytest.fixture(scope="module")
def studio(models, tmp_path_factory):
    return Studio(Settings(home=tmp_path_factory.mktemp("home"), models_dir=models, device="cpu", dtype="fp32"))


def test_names_list_builtins_then_installed_models(studio):
    assert studio.upscalers.names() == ["Lanczos", "Nearest", "tiny-esrgan", "tiny-esrgan-st", "tiny-swinir",
                                        "tiny-x2"]
    from danqing.editing.hires import hires_upscalers

    assert hires_upscalers(studio.upscalers)[-4:] == ["tiny-esrgan", "tiny-esrgan-st", "tiny-swinir", "tiny-x2"]


@pytest.mark.parametrize("name, build", [("tiny-esrgan", lambda: _esrgan()), ("tiny-esrgan-st", lambda: _esrgan(seed=1)),
                                         ("tiny-swinir", _swinir)])
def test_loaded_model_matches_the_network_it_was_saved_from(studio, models, name, build):
    """(a) .pth and .safetensors read back through spandrel give the saved network's output."""
    reference = build()
    desc = studio.models.load_upscaler(studio.upscalers.file(name))
    assert desc.scale == reference.scale if hasattr(reference, "scale") else True
    x = to_tensor(_picture(24, 20))
    with torch.inference_mode():
        ours = upscale_tensor(desc, x, desc.scale, tile=0)
        ref = reference(x).clamp(0, 1)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-5  # pixels in [0, 1]: a fixed scale, so absolute is relative
    # the picture path: the same numbers, rounded to 8 bits, at scale x the size
    img = _picture(24, 20)
    out = studio.upscalers.upscale(img, 24 * desc.scale, 20 * desc.scale, name, tile=0)
    assert np.array_equal(np.asarray(out), np.asarray(to_image(ref)))


def test_tiled_upscale_matches_untiled_in_the_interior(studio):
    """(b) a convolutional net with enough overlap: the seams blend away."""
    desc = studio.models.load_upscaler(studio.upscalers.file("tiny-esrgan"))
    x = to_tensor(_picture(96, 80, seed=3))
    with torch.inference_mode():
        whole = upscale_tensor(desc, x, 4, tile=0)
        tiled = upscale_tensor(desc, x, 4, tile=48, overlap=20)
    assert tiled.shape == whole.shape == (1, 3, 320, 384)
    diff = (tiled - whole).abs()
    assert diff.mean().item() < 2e-3 and diff.max().item() < 0.05, (diff.mean().item(), diff.max().item())
    # without overlap the seams show
    with torch.inference_mode():
        seamed = upscale_tensor(desc, x, 4, tile=48, overlap=0)
    assert (seamed - whole).abs().mean().item() > 2 * diff.mean().item()


def test_model_scale_differing_from_the_request_is_resized_with_lanczos(studio):
    img = _picture(20, 16)
    # x2 model asked for x3: two passes (x4), then Lanczos down to exactly x3, as A1111 does
    out = studio.upscalers.upscale(img, 60, 48, "tiny-x2", tile=0)
    assert out.size == (60, 48)
    desc = studio.models.load_upscaler(studio.upscalers.file("tiny-x2"))
    two = to_image(desc(to_tensor(to_image(desc(to_tensor(img))))))
    assert np.array_equal(np.asarray(out), np.asarray(two.resize((60, 48), Image.LANCZOS)))


def test_unknown_upscaler_lists_installed_ones(studio):
    """(c)"""
    from danqing.editing.upscale import upscale_image

    with pytest.raises(InvalidRequest, match="upscaler: unknown upscaler '4x-UltraSharp'; installed: Lanczos, "
                                             "Nearest, tiny-esrgan, tiny-esrgan-st, tiny-swinir, tiny-x2"):
        upscale_image(_picture(8, 8), 16, 16, "4x-UltraSharp", studio.upscalers)
    req = GenerationRequest(prompt="x", seed=1, steps=2, width=64, height=64, enable_hr=True,
                            hr_upscaler="4x-UltraSharp", model="danqing-tiny-random")
    with pytest.raises(InvalidRequest, match="hr_upscaler.*installed: Latent.*Nearest, tiny-esrgan"):
        studio.generate(req)


def test_a_file_that_is_not_an_upscaler_is_one_clear_line(tmp_path):
    """(d)"""
    from safetensors.torch import save_file

    from danqing.models.upscalers import load_descriptor

    save_file({"foo.weight": torch.zeros(3, 3)}, tmp_path / "lora.safetensors")
    (tmp_path / "notes.pth").write_text("not a weight file")
    with pytest.raises(ModelError, match=r"^lora.safetensors: not an upscaler or face-restoration model that "
                                         r"spandrel knows") as e:
        load_descriptor(tmp_path / "lora.safetensors")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match=r"^notes.pth: cannot be read as an upscaler") as e:
        load_descriptor(tmp_path / "notes.pth")
    assert "\n" not in str(e.value)


def test_torchvision_stand_ins_are_gone_after_import():
    """(e) in a fresh interpreter: spandrel imports, transformers/diffusers never see torchvision."""
    code = ("import importlib.util, sys\n"
            "from danqing.models.upscalers import import_spandrel\n"
            "assert importlib.util.find_spec('torchvision') is None\n"
            "sp = import_spandrel()\n"
            "assert 'spandrel' in sys.modules and 'GFPGAN' in [a.architecture.id for a in sp.MAIN_REGISTRY]\n"
            "assert not [m for m in sys.modules if m.startswith('torchvision')], 'stand-ins left'\n"
            "assert importlib.util.find_spec('torchvision') is None\n"
            "import spandrel.architectures.RestoreFormer as rf\n"
            "try:\n"
            "    rf.tv_normalize(None, 0, 1)\n"
            "except Exception as e:\n"
            "    assert 'needs torchvision' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('the stand-in did not raise')\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_hires_fix_and_sd_upscale_take_a_model_upscaler(studio):
    req = GenerationRequest(prompt="a red circle", seed=1, steps=3, width=64, height=64, enable_hr=True,
                            hr_scale=2, hr_upscaler="tiny-esrgan", hr_second_pass_steps=4, denoising_strength=0.5,
                            model="danqing-tiny-random")
    res = studio.generate(req)
    assert res.images[0].size == (128, 128)
    assert "Hires upscaler: tiny-esrgan" in res.infotexts[0]
    from danqing.editing.upscale import sd_upscale

    base = GenerationRequest(prompt="a red circle", seed=0, steps=5, width=64, height=64, denoising_strength=0.4,
                             model="danqing-tiny-random")
    assert sd_upscale(studio, _picture(48, 48), base, scale=2, tile=64, overlap=16, upscaler="tiny-x2").size == (96, 96)


def test_cli_upscale_with_a_model(models, tmp_path, capsys):
    from danqing.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as exc:
            main(["--home", str(tmp_path), "--models-dir", str(models), "--device", "cpu", "upscale", *args])
        return exc.value.code, capsys.readouterr()

    _picture(32, 24).save(tmp_path / "in.png")
    code, out = run(str(tmp_path / "in.png"), "--scale", "4", "--upscaler", "tiny-esrgan", "--upscaler-tile", "16",
                    "--upscaler-overlap", "4", "--out", str(tmp_path / "o.png"))
    assert code in (0, None), out.err
    assert Image.open(tmp_path / "o.png").size == (128, 96)
    code, out = run(str(tmp_path / "in.png"), "--upscaler", "nope")
    assert code == 2 and out.err.strip() == ("error: upscaler: unknown upscaler 'nope'; installed: Lanczos, Nearest, "
                                             "tiny-esrgan, tiny-esrgan-st, tiny-swinir, tiny-x2")


# ---------------------------------------------------------------------------------------------
# face restoration
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gfpgan_dir(tmp_path_factory):
    """A random GFPGAN v1 clean (spandrel's fixed 512-px architecture, 86 M parameters)."""
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(0)
    net = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                 num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    root = tmp_path_factory.mktemp("face-models")
    _save(net, root / "face_restore" / "tiny-gfpgan.safetensors")
    return root


def test_face_restoration_changes_the_face_only(gfpgan_dir, tmp_path):
    """(f) a real photograph: the face is found, restored in place; far pixels untouched."""
    from skimage.data import astronaut

    from danqing.editing.faces import detect_faces, face_square, restore_faces

    st = Studio(Settings(home=tmp_path, models_dir=gfpgan_dir, device="cpu", dtype="fp32"))
    assert st.upscalers.face_names() == ["tiny-gfpgan"]
    img = Image.fromarray(astronaut())
    faces = detect_faces(img)
    assert len(faces) == 1
    x, y, w, h = faces[0]
    assert 150 < x + w / 2 < 260 and 90 < y + h / 2 < 170  # Eileen Collins' face in the 512x512 picture
    desc = st.upscalers.face_model("tiny-gfpgan")
    out, warnings = restore_faces(img, desc, visibility=1.0)
    assert warnings == [] and out.size == img.size
    a, b = np.asarray(img).astype(int), np.asarray(out).astype(int)
    x1, y1, x2, y2 = face_square(faces[0], *img.size)
    outside = np.ones(a.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(a[outside], b[outside])
    assert np.abs(a[y + h // 2, x + w // 2] - b[y + h // 2, x + w // 2]).max() > 0  # the face was replaced
    same, _ = restore_faces(img, desc, visibility=0.0)
    assert np.array_equal(np.asarray(same), np.asarray(img))
    flat, warnings = restore_faces(Image.new("RGB", (128, 128), (90, 120, 150)), desc)
    assert warnings == ["restore faces: no face found; the picture is unchanged"]
    with pytest.raises(InvalidRequest, match="face_restoration_model: .*'tiny-esrgan'.*installed: tiny-gfpgan"):
        st.upscalers.face_model("tiny-esrgan")


def test_restore_faces_request_field(gfpgan_dir, tmp_path):
    """A1111's restore_faces: the first installed face model is named in the request and the
    infotext ("Face restoration: NAME"), which reads back; a picture without faces says so."""
    from danqing.outputs.metadata import request_from_infotext

    st = Studio(Settings(home=tmp_path, models_dir=gfpgan_dir, device="cpu", dtype="fp32"))
    req = GenerationRequest(prompt="a red circle", seed=1, steps=2, width=64, height=64, restore_faces=True,
                            model="danqing-tiny-random")
    res = st.generate(req)
    plain = st.generate(req.replace(restore_faces=False))
    assert res.request.face_restoration_model == "tiny-gfpgan"
    assert "Face restoration: tiny-gfpgan" in res.infotexts[0]
    assert res.warnings == ["restore faces: no face found; the picture is unchanged"]
    assert np.array_equal(np.asarray(res.images[0]), np.asarray(plain.images[0]))
    back = request_from_infotext(res.infotexts[0])
    assert back.restore_faces and back.face_restoration_model == "tiny-gfpgan"
    with pytest.raises(InvalidRequest, match="face_restoration_model: unknown face-restoration model 'nope'; installed: "
                                             "tiny-gfpgan"):
        st.generate(req.replace(face_restoration_model="nope"))
    empty = Studio(Settings(home=tmp_path / "e", device="cpu", dtype="fp32"))
    with pytest.raises(InvalidRequest, match="restore_faces: no face-restoration model is installed"):
        empty.generate(req)


def test_inpaint_with_restore_faces_keeps_the_pixels_outside_the_mask(gfpgan_dir, tmp_path):
    """Faces are restored before the inpaint is pasted back (A1111's order), so every pixel
    outside the mask is still the init picture's, while the face inside the mask is restored."""
    from skimage.data import astronaut

    st = Studio(Settings(home=tmp_path, models_dir=gfpgan_dir, device="cpu", dtype="fp32"))
    init = Image.fromarray(astronaut()).resize((256, 256))
    mask = np.zeros((256, 256), np.uint8)
    mask[:, 64:192] = 255  # the face and around it
    req = GenerationRequest(prompt="a red circle", seed=1, steps=4, width=256, height=256, denoising_strength=0.1,
                            restore_faces=True, mask_blur=0, model="danqing-tiny")
    res = st.generate(req, init_image=init, mask_image=Image.fromarray(mask))
    plain = st.generate(req.replace(restore_faces=False), init_image=init, mask_image=Image.fromarray(mask))
    out, ref = np.asarray(res.images[0]), np.asarray(init)
    assert np.array_equal(out[:, :64], ref[:, :64]) and np.array_equal(out[:, 192:], ref[:, 192:])
    assert res.warnings == [] and not np.array_equal(out[:, 64:192], np.asarray(plain.images[0])[:, 64:192])


def test_api_lists_and_takes_installed_upscalers(studio, tmp_path):
    """/sdapi/v1/upscalers lists the installed models; hr_upscaler accepts them; an unknown one
    is a 422 naming them."""
    from fastapi.testclient import TestClient

    from server_helpers import make_app

    with TestClient(make_app(tmp_path, studio=studio)) as client:
        listed = client.get("/sdapi/v1/upscalers").json()
        assert [u["name"] for u in listed] == studio.upscalers.names()
        assert listed[2]["model_path"].endswith("upscalers/tiny-esrgan.pth")
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True, "hr_upscaler": "nope",
                                                   "width": 64, "height": 64})
        assert r.status_code == 422 and "tiny-esrgan" in r.text


def test_codeformer_when_spandrel_extra_arches_is_installed(tmp_path):
    """CodeFormer lives in spandrel_extra_arches (a separate package, not installed by default):
    a small random one restores the astronaut's face through the same path."""
    need_module("spandrel_extra_arches", "make installs it: pip install --no-deps spandrel-extra-arches==0.2.0")
    from skimage.data import astronaut
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    from danqing.editing.faces import restore_faces

    torch.manual_seed(0)
    net = CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=32, latent_size=256,
                     connect_list=["32", "64", "128", "256"], fix_modules=["quantize", "generator"])
    _save(net, tmp_path / "models" / "Codeformer" / "tiny-codeformer.pth")
    st = Studio(Settings(home=tmp_path, device="cpu", dtype="fp32"))
    desc = st.upscalers.face_model("tiny-codeformer")
    assert desc.architecture.id == "CodeFormer"
    img = Image.fromarray(astronaut())
    out, warnings = restore_faces(img, desc)
    assert warnings == [] and out.size == img.size
    assert not np.array_equal(np.asarray(out), np.asarray(img))
    assert np.array_equal(np.asarray(out)[400:], np.asarray(img)[400:])  # far below the face


def test_cli_restore_faces(gfpgan_dir, tmp_path, capsys):
    from skimage.data import astronaut

    from danqing.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as exc:
            main(["--home", str(tmp_path), "--models-dir", str(gfpgan_dir), "--device", "cpu", "upscale", *args])
        return exc.value.code, capsys.readouterr()

    Image.fromarray(astronaut()).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), (90, 120, 150)).save(tmp_path / "flat.png")
    code, out = run(str(tmp_path / "a.png"), "--scale", "1", "--restore-faces", "tiny-gfpgan", "--face-visibility",
                    "0.5", "--out", str(tmp_path / "o.png"))
    assert code in (0, None), out.err
    assert Image.open(tmp_path / "o.png").size == (512, 512)
    code, out = run(str(tmp_path / "flat.png"), "--restore-faces", "tiny-gfpgan", "--out", str(tmp_path / "f.png"))
    assert code in (0, None) and "warning: restore faces: no face found" in out.err
    code, out = run(str(tmp_path / "a.png"), "--restore-faces", "nope")
    assert code == 2 and "installed: tiny-gfpgan" in out.err
