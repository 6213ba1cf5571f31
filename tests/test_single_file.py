"""Single-file LDM checkpoints: export -> load round trip, family detection, bad files."""

from __future__ import annotations

import pytest
import torch

from danqing import GenerationRequest
from danqing.errors import CorruptModel, IncompatibleModel, ModelNotFound, UnknownFamily
from danqing.models.single_file import (
    detect_family,
    export_ldm_state_dict,
    load_single_file,
    load_vae_file,
    save_single_file,
    save_vae_file,
)

CASES = [("tiny-sd1", "sd1", "epsilon"), ("tiny-sd2", "sd2", "v_prediction"), ("tiny-sdxl", "sdxl", "epsilon")]


def _same_weights(a, b):
    for part, module in a.modules().items():
        other = b.modules()[part].state_dict()
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, other[key]), f"{part}.{key}"


@pytest.mark.parametrize("name, family, prediction", CASES)
def test_round_trip_bit_identical(tiny_components, tmp_path, name, family, prediction):
    comps = tiny_components[name]
    path = save_single_file(comps, tmp_path / f"{name}.safetensors")
    loaded = load_single_file(path)
    assert (loaded.family, loaded.prediction_type) == (family, prediction)
    _same_weights(comps, loaded)
    # The same file as a pickle checkpoint, read with weights_only=True.
    torch.save({"state_dict": export_ldm_state_dict(comps)}, tmp_path / f"{name}.ckpt")
    from danqing.models.families import load_family_config

    # A pickle has no metadata: without configs it meets the full-size family config and fails.
    with pytest.raises(CorruptModel, match="do not fit"):
        load_single_file(tmp_path / f"{name}.ckpt")
    from_ckpt = load_single_file(tmp_path / f"{name}.ckpt", prediction_type=prediction, configs=load_family_config(name))
    _same_weights(comps, from_ckpt)


def test_exported_model_gives_bit_identical_image(studio, tiny_components):
    """Single file -> load -> export -> load: the same image, bit for bit. (Against the diffusers
    folder of the same weights the match is to float rounding: torch's CPU kernels may take other
    paths for differently allocated tensors.)"""
    ckpts = studio.settings.models_dir / "checkpoints"
    req = GenerationRequest(prompt="a blue star", steps=4, width=64, height=64, seed=21, sampler="Euler a")
    for name in ("tiny-sd1", "tiny-sd2", "tiny-sdxl"):
        first = ckpts / f"{name}-a.safetensors"
        if not first.exists():
            save_single_file(tiny_components[name], first)
        a = studio.generate(req.replace(model=f"{name}-a"))
        second = ckpts / f"{name}-b.safetensors"
        if not second.exists():
            save_single_file(studio.models.load(f"{name}-a").components, second)
        b = studio.generate(req.replace(model=f"{name}-b"))
        assert torch.equal(a.latents[0], b.latents[0])
        assert a.images[0].tobytes() == b.images[0].tobytes()
        folder = studio.generate(req.replace(model=name))
        assert torch.allclose(a.latents[0], folder.latents[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("family, diffusers_type", [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base")])
def test_full_size_layout_agrees_with_diffusers(family, diffusers_type):
    """The bundled full-size configs, built on the meta device and exported: diffusers' own
    detector names the same family, and its converter maps our UNet/VAE keys back exactly."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, infer_diffusers_model_type

    from danqing.models.families import components_from_configs, load_family_config

    with init_empty_weights():
        comps = components_from_configs(family, load_family_config(family))
    sd = export_ldm_state_dict(comps, to_cpu=False)  # meta tensors: keys and shapes only
    assert detect_family(sd) == family
    assert infer_diffusers_model_type(sd) == diffusers_type
    unet = convert_ldm_unet_checkpoint(sd, dict(comps.unet.config))
    assert {k: tuple(v.shape) for k, v in unet.items()} == {k: tuple(v.shape) for k, v in comps.unet.state_dict().items()}
    vae = convert_ldm_vae_checkpoint(sd, dict(comps.vae.config))
    assert set(vae) == set(comps.vae.state_dict())


def test_bad_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ModelNotFound):
        load_single_file(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02junk" * 50)
    with pytest.raises(CorruptModel, match="junk.safetensors"):
        load_single_file(tmp_path / "junk.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(CorruptModel, match="weights_only"):
        load_single_file(tmp_path / "junk.ckpt")
    save_file({"foo.bar": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(UnknownFamily, match="SD1.x, SD2.x or SDXL"):
        load_single_file(tmp_path / "odd.safetensors")


def test_truncated_unet_is_corrupt(tiny_components, tmp_path):
    from safetensors.torch import save_file

    sd = export_ldm_state_dict(tiny_components["tiny-sd1"])
    sd.pop(next(k for k in sd if k.startswith("model.diffusion_model.out.")))
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CorruptModel):
        load_single_file(tmp_path / "cut.safetensors")


def test_overwrite_refused(tiny_components, tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        save_single_file(tiny_components["tiny-sd1"], target)
    assert target.read_bytes() == b"keep"


@pytest.mark.parametrize("prefixed", [False, True])
def test_vae_file_round_trip(tiny_components, tmp_path, prefixed):
    vae = tiny_components["tiny-sd1"].vae
    path = save_vae_file(vae, tmp_path / "v.safetensors", prefixed=prefixed)
    loaded = load_vae_file(path, "sd1")
    for k, v in vae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_vae_of_wrong_shape(tiny_components, tmp_path):
    from safetensors.torch import save_file

    big = tiny_components["tiny-sdxl"].unet  # not a VAE at all
    save_file({k: v.contiguous() for k, v in list(big.state_dict().items())[:4]}, str(tmp_path / "notvae.safetensors"))
    with pytest.raises(IncompatibleModel, match="not a VAE"):
        load_vae_file(tmp_path / "notvae.safetensors", "sd1")
    # A VAE saved without its config meets the full-size SD1 config: shapes do not fit.
    save_vae_file(tiny_components["tiny-sd1"].vae, tmp_path / "small.safetensors", config_in_metadata=False)
    with pytest.raises(IncompatibleModel, match="does not fit a sd1 model"):
        load_vae_file(tmp_path / "small.safetensors", "sd1")
