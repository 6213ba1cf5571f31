"""Single-file LDM checkpoints: export -> load round trip, family detection, prediction type,
the full-size layouts against diffusers' own detector and converters, bad files, VAE files."""

from __future__ import annotations

import json

import pytest
import torch
from parity import assert_close_scaled
from safetensors.torch import save_file

from danqing import GenerationRequest
from danqing.errors import CorruptModel, IncompatibleModel, ModelNotFound, UnknownFamily
from danqing.models.families import components_from_configs, load_family_config
from danqing.models.single_file import (
    CONFIG_KEY,
    detect_family,
    export_ldm_state_dict,
    load_single_file,
    load_vae_file,
    openclip_to_ldm,
    read_state_dict,
    save_single_file,
    save_vae_file,
)

CASES = [("tiny-sd1", "sd1", "epsilon"), ("tiny-sd2", "sd2", "v_prediction"), ("tiny-sdxl", "sdxl", "epsilon")]
ARCH = {"tiny-sd1": "stable-diffusion-v1", "tiny-sd2": "stable-diffusion-v2-768-v", "tiny-sdxl": "stable-diffusion-xl-v1-base"}


def _same_weights(a, b, *, rounded_to=None):
    """Every state-dict tensor of every component equal (bit for bit, or to a dtype's rounding)."""
    assert set(a.modules()) == set(b.modules())
    for part, module in a.modules().items():
        other = b.modules()[part].state_dict()
        mine = module.state_dict()
        assert set(mine) == set(other), part
        for key, tensor in mine.items():
            assert other[key].dtype == tensor.dtype, f"{part}.{key}"
            want = tensor.to(rounded_to).to(tensor.dtype) if rounded_to and tensor.is_floating_point() else tensor
            assert torch.equal(want, other[key]), f"{part}.{key}"


def _header_configs(name):
    return {CONFIG_KEY: json.dumps(load_family_config(name))}


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, family, prediction", CASES)
def test_round_trip_bit_identical(tiny_components, tmp_path, name, family, prediction):
    comps = tiny_components[name]
    path = save_single_file(comps, tmp_path / f"{name}.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_single_file(path)
    assert (loaded.family, loaded.prediction_type) == (family, prediction)
    assert loaded.scheduler_config["prediction_type"] == prediction
    assert loaded.metadata["safetensors_metadata"]["modelspec.architecture"] == ARCH[name]
    assert (loaded.tokenizer.pad_token, getattr(loaded.tokenizer_2, "pad_token", None)) == (
        ("!", None) if family == "sd2" else ("<|endoftext|>", "!" if family == "sdxl" else None)
    )
    _same_weights(comps, loaded)
    # Exporting the loaded model gives the same tensors again.
    first, second = export_ldm_state_dict(comps), export_ldm_state_dict(loaded)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # The same weights as a pickle checkpoint, read with torch.load(weights_only=True).
    torch.save({"state_dict": first, "global_step": 7}, tmp_path / f"{name}.ckpt")
    # A pickle has no header: without configs it meets the full-size family config and is refused.
    with pytest.raises(CorruptModel, match="do not fit|cannot convert"):
        load_single_file(tmp_path / f"{name}.ckpt")
    from_ckpt = load_single_file(tmp_path / f"{name}.ckpt", prediction_type=prediction, configs=load_family_config(name))
    assert (from_ckpt.family, from_ckpt.prediction_type) == (family, prediction)
    _same_weights(comps, from_ckpt)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_files_as_shared_online_load(tiny_components, tmp_path, name):
    """fp16 tensors, no header, and the extra keys real checkpoints carry (CLIP ``position_ids``,
    sometimes a broken float copy; OpenCLIP ``logit_scale``; schedule buffers; EMA bookkeeping)."""
    comps = tiny_components[name]
    sd = {k: v.half() for k, v in export_ldm_state_dict(comps).items()}
    extras = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3)}
    if name == "tiny-sd1":
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] + 1e-3
    elif name == "tiny-sd2":
        extras["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
        extras["cond_stage_model.model.text_projection"] = torch.randn(32, 16)  # unused by SD2
    else:
        extras["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        extras["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    save_file({**sd, **extras}, str(tmp_path / "m.safetensors"), metadata=_header_configs(name))
    loaded = load_single_file(tmp_path / "m.safetensors", prediction_type="epsilon")
    _same_weights(comps, loaded, rounded_to=torch.float16)  # upcast to fp32, values as stored
    # position_ids (non-persistent buffers) stay the model's own arange, not the file's copy.
    for te in filter(None, (loaded.text_encoder, loaded.text_encoder_2)):
        ids = [b for k, b in te.named_buffers() if k.endswith("position_ids")]
        assert ids and all(torch.equal(b, torch.arange(77)[None]) for b in ids)


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
        assert_close_scaled(a.latents[0], folder.latents[0])  # relative bound: tests/parity.py


# ---------------------------------------------------------------------------------------------
# Prediction type
# ---------------------------------------------------------------------------------------------
def _probe_file(tiny_components, path, *, name="tiny-sd2", out_bias, metadata=None):
    """A headerless-ish file whose UNet outputs the constant ``out_bias`` (conv_out zeroed), so
    A1111's probe, mean(out - 0.5) < -1, has a known answer."""
    sd = export_ldm_state_dict(tiny_components[name])
    sd["model.diffusion_model.out.2.weight"] = torch.zeros_like(sd["model.diffusion_model.out.2.weight"])
    sd["model.diffusion_model.out.2.bias"] = torch.full_like(sd["model.diffusion_model.out.2.bias"], out_bias)
    save_file(sd, str(path), metadata={**_header_configs(name), **(metadata or {})})
    return path


def test_prediction_type_probe(tiny_components, tmp_path):
    v = _probe_file(tiny_components, tmp_path / "v.safetensors", out_bias=-3.0)  # mean(out - x) = -3.5
    eps = _probe_file(tiny_components, tmp_path / "eps.safetensors", out_bias=0.0)  # -0.5
    assert load_single_file(v).prediction_type == "v_prediction"
    assert load_single_file(eps).prediction_type == "epsilon"
    # SD1 and SDXL are never probed: epsilon unless told otherwise.
    sd1 = _probe_file(tiny_components, tmp_path / "sd1.safetensors", name="tiny-sd1", out_bias=-3.0)
    assert load_single_file(sd1).prediction_type == "epsilon"
    assert load_single_file(sd1, prediction_type="v_prediction").prediction_type == "v_prediction"


def test_prediction_type_order(tiny_components, tmp_path):
    """explicit argument > ModelSpec header > A1111 sidecar .yaml > probe."""
    eps = _probe_file(tiny_components, tmp_path / "m.safetensors", out_bias=0.0)  # the probe says eps
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    assert load_single_file(eps).prediction_type == "v_prediction"
    assert load_single_file(eps, prediction_type="epsilon").prediction_type == "epsilon"
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    v = _probe_file(tiny_components, tmp_path / "n.safetensors", out_bias=-3.0)  # the probe says v
    (tmp_path / "n.yaml").write_text("model:\n  params:\n    parameterization: eps  # the default\n")
    assert load_single_file(v).prediction_type == "epsilon"
    headed = _probe_file(tiny_components, tmp_path / "h.safetensors", out_bias=0.0, metadata={"modelspec.prediction_type": "v"})
    (tmp_path / "h.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert load_single_file(headed).prediction_type == "v_prediction"


# ---------------------------------------------------------------------------------------------
# Full-size layouts against diffusers
# ---------------------------------------------------------------------------------------------
# Keys (and shapes) of the original checkpoints, from Stability's releases.
ORIGINAL_KEYS = {
    "sd1": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    },
    "sdxl-refiner": {  # sd_xl_refiner_1.0: model_channels 384, channel_mult (1, 2, 4, 4), depth 4, adm 2560
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight": (768, 1280),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.3.attn2.to_k.weight": (1536, 1280),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1536, 1536, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.3.ff.net.2.weight": (1536, 6144),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1536, 1536, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (384, 768, 1, 1),
        "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
    },
}


def _shapes(sd, strip=""):
    return {k.removeprefix(strip): tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("family, diffusers_type", [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base"),
                                                    ("sdxl-refiner", "xl_refiner")])
def test_full_size_layout_agrees_with_diffusers(family, diffusers_type):
    """The bundled full-size configs, built on the meta device and exported (keys and shapes only;
    every diffusers converter op used here -- renames, slicing, transposes -- works on meta
    tensors): diffusers' own detector names the family, and its converters map every exported part
    back to exactly the diffusers key set with the same shapes."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    comps = components_from_configs(family, load_family_config(family), empty=True)
    sd = export_ldm_state_dict(comps, to_cpu=False)
    assert all(t.is_meta for t in sd.values())
    assert detect_family(sd) == family
    assert infer_diffusers_model_type(sd) == diffusers_type
    for key, shape in ORIGINAL_KEYS[family].items():
        assert tuple(sd[key].shape) == shape, key

    assert _shapes(convert_ldm_unet_checkpoint(sd, dict(comps.unet.config))) == _shapes(comps.unet.state_dict())
    assert _shapes(convert_ldm_vae_checkpoint(sd, dict(comps.vae.config))) == _shapes(comps.vae.state_dict())
    if family in ("sd1", "sdxl"):  # CLIP ViT-L: transformers layout under a prefix
        clip = convert_ldm_clip_checkpoint(sd)
        assert _shapes(clip, "text_model.") == _shapes(comps.text_encoder.state_dict(), "text_model.")
    if family == "sd2":  # 24 OpenCLIP blocks written, diffusers' 23 read back
        assert {k.split(".")[4] for k in sd if ".resblocks." in k} == {str(i) for i in range(24)}
        te = convert_open_clip_checkpoint(comps.text_encoder, sd, prefix="cond_stage_model.model.")
        assert _shapes(te, "text_model.") == _shapes(comps.text_encoder.state_dict())
    if family in ("sdxl", "sdxl-refiner"):
        prefix = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
        te2 = convert_open_clip_checkpoint(comps.text_encoder_2, sd, prefix=prefix)
        assert _shapes(te2) == _shapes(comps.text_encoder_2.state_dict())
    # Nothing beyond the four parts is written.
    roots = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
    assert all(k.startswith(roots) for k in sd)


def test_padding_block_is_identity(tiny_components):
    """The zero block SD2 exports gain (24th of OpenCLIP-H) leaves the hidden states unchanged."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    te = tiny_components["tiny-sd2"].text_encoder
    padded = openclip_to_ldm(te.state_dict(), "cond_stage_model.model.", n_blocks=3)
    assert all(torch.count_nonzero(v) == 0 for k, v in padded.items() if ".resblocks.2." in k)
    deeper = CLIPTextModel(CLIPTextConfig(**{**te.config.to_diff_dict(), "num_hidden_layers": 3})).eval()
    converted = convert_open_clip_checkpoint(deeper, padded, prefix="cond_stage_model.model.")
    deeper.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()})
    ids = tiny_components["tiny-sd2"].tokenizer(["a red fox"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        a = te(ids, output_hidden_states=True)
        b = deeper(ids, output_hidden_states=True)
    assert torch.equal(a.hidden_states[-1], b.hidden_states[-1]) and torch.equal(a.hidden_states[-1], b.hidden_states[-2])


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
def test_bad_files(tmp_path):
    with pytest.raises(ModelNotFound):
        load_single_file(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(CorruptModel, match="junk.safetensors"):
        load_single_file(tmp_path / "junk.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle" * 10)
    with pytest.raises(CorruptModel, match="weights_only"):
        load_single_file(tmp_path / "junk.ckpt")
    save_file({"foo.bar": torch.zeros(1), "lora_unet_down.alpha": torch.ones(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(UnknownFamily, match=r"SD1\.x, SD2\.x, SDXL base or SDXL refiner.*foo, lora_unet_down") as err:
        load_single_file(tmp_path / "odd.safetensors")
    assert "\n" not in str(err.value)


def test_truncated_files_are_corrupt(tiny_components, tmp_path):
    sd = export_ldm_state_dict(tiny_components["tiny-sd1"])
    whole = save_single_file(tiny_components["tiny-sd1"], tmp_path / "whole.safetensors")
    (tmp_path / "half.safetensors").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CorruptModel, match="half.safetensors"):
        load_single_file(tmp_path / "half.safetensors")
    # A tensor missing: named in the one-line message.
    sd.pop("model.diffusion_model.out.2.bias")
    save_file(sd, str(tmp_path / "cut.safetensors"), metadata=_header_configs("tiny-sd1"))
    with pytest.raises(CorruptModel, match=r"UNet .*missing \['conv_out.bias'\]"):
        load_single_file(tmp_path / "cut.safetensors")
    # A tensor of the wrong shape.
    sd = export_ldm_state_dict(tiny_components["tiny-sd1"])
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 1, 1, 1)
    save_file(sd, str(tmp_path / "shape.safetensors"), metadata=_header_configs("tiny-sd1"))
    with pytest.raises(CorruptModel, match="VAE weights do not fit.*quant_conv.weight"):
        load_single_file(tmp_path / "shape.safetensors")


def test_detect_family():
    sd1 = ["model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    sd2 = ["model.diffusion_model.out.2.weight", "cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]
    xl = ["model.diffusion_model.out.2.weight", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
          "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight"]
    refiner = ["model.diffusion_model.out.2.weight", "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"]
    assert [detect_family(k) for k in (sd1, sd2, xl)] == ["sd1", "sd2", "sdxl"]
    assert detect_family(refiner) == "sdxl-refiner"
    with pytest.raises(UnknownFamily, match="found keys starting with cond_stage_model.transformer$"):
        detect_family(["cond_stage_model.transformer.text_model.final_layer_norm.weight"])  # a text encoder alone
    with pytest.raises(UnknownFamily, match="starting with first_stage_model, model.diffusion_model$"):
        detect_family(["model.diffusion_model.out.2.weight", "first_stage_model.encoder.conv_in.weight"])  # no text encoder


def test_unknown_family_config():
    with pytest.raises(UnknownFamily, match="tiny-sd1"):
        load_family_config("sd9")


def test_overwrite_refused(tiny_components, tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="already exists"):
        save_single_file(tiny_components["tiny-sd1"], target)
    assert target.read_bytes() == b"keep"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    save_single_file(tiny_components["tiny-sd1"], target, overwrite=True, metadata={"modelspec.title": "mine"})
    assert load_single_file(target).metadata["safetensors_metadata"]["modelspec.title"] == "mine"
    with pytest.raises(FileExistsError):
        save_vae_file(tiny_components["tiny-sd1"].vae, target)


# ---------------------------------------------------------------------------------------------
# Standalone VAE files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["bare", "prefixed", "diffusers"])
def test_vae_file_round_trip(tiny_components, tmp_path, style):
    vae = tiny_components["tiny-sd1"].vae
    path = tmp_path / "v.safetensors"
    if style == "diffusers":
        save_file(vae.state_dict(), str(path), metadata=_header_configs("tiny-sd1"))
    else:
        save_vae_file(vae, path, prefixed=style == "prefixed")
        keys = set(read_state_dict(path)[0])
        assert ("first_stage_model.encoder.mid.attn_1.q.weight" in keys) == (style == "prefixed")
        assert ("encoder.mid.attn_1.q.weight" in keys) == (style == "bare")
    loaded = load_vae_file(path, "sd1")
    mine, theirs = vae.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k


def test_vae_of_wrong_shape(tiny_components, tmp_path):
    unet = tiny_components["tiny-sdxl"].unet  # not a VAE at all
    save_file({k: v.contiguous() for k, v in list(unet.state_dict().items())[:4]}, str(tmp_path / "notvae.safetensors"))
    with pytest.raises(IncompatibleModel, match="notvae.safetensors is not a VAE.*sd1"):
        load_vae_file(tmp_path / "notvae.safetensors", "sd1")
    # A VAE saved without its config meets the full-size SD1 config: shapes do not fit.
    save_vae_file(tiny_components["tiny-sd1"].vae, tmp_path / "small.safetensors", config_in_metadata=False)
    with pytest.raises(IncompatibleModel, match="VAE small.safetensors does not fit a sdxl model"):
        load_vae_file(tmp_path / "small.safetensors", "sdxl")
    with pytest.raises(ModelNotFound):
        load_vae_file(tmp_path / "none.safetensors", "sd1")


def test_publish_never_clobbers_a_file_that_appeared(tmp_path):
    """The final step is a hard link: a file created after save_single_file's early check wins."""
    from danqing.models.single_file import _publish

    tmp, target = tmp_path / "t.safetensors.tmp", tmp_path / "t.safetensors"
    tmp.write_bytes(b"new")
    target.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        _publish(tmp, target, overwrite=False)
    assert target.read_bytes() == b"theirs"
    _publish(tmp, target, overwrite=True)
    assert target.read_bytes() == b"new"
