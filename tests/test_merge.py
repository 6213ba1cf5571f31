"""Model merging and LoRA extraction: exact end points, recipe in the header, kohya LoRAs that
diffusers' loader reads, bad input, nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch
from parity import assert_close_scaled, scaled_diff

from danqing import GenerationRequest, Settings, Studio
from danqing.customise.merge import (
    extract_lora, kohya_lora_layers, merge_checkpoints, read_recipe,
)
from danqing.errors import IncompatibleModel, InvalidRequest
from danqing.models.loader import load_components
from danqing.models.registry import Registry

SMALL = dict(width=64, height=64, steps=3, seed=11, sampler="Euler", prompt="a red circle")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, models_dir):
    """models/ with A = tiny-sd1 (diffusers folder), B = another tiny-sd1 (single file),
    tiny-sdxl, and an empty lora/."""
    import shutil

    from danqing.models.families import build_components
    from danqing.models.single_file import save_single_file

    root = tmp_path_factory.mktemp("merge-models")
    (root / "checkpoints").mkdir()
    (root / "lora").mkdir()
    for name in ("tiny-sd1", "tiny-sdxl"):
        shutil.copytree(models_dir / "checkpoints" / name, root / "checkpoints" / name)
    save_single_file(build_components("tiny-sd1", seed=5), root / "checkpoints" / "B.safetensors")
    save_single_file(build_components("tiny-sdxl", seed=6), root / "checkpoints" / "BXL.safetensors")
    return root


def _tensors(comps) -> dict:
    return {f"{p}.{k}": v for p, m in comps.modules().items() for k, v in m.state_dict().items()}


def _same(x, y) -> bool:
    tx, ty = _tensors(x), _tensors(y)
    return tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)


def test_weighted_sum_end_points_are_the_inputs(folder, tmp_path):
    reg = Registry(folder)
    a, b = load_components(reg.find("checkpoint", "tiny-sd1")), load_components(reg.find("checkpoint", "B"))
    m0 = merge_checkpoints(reg, ["tiny-sd1", "B"], folder / "checkpoints" / "m0.safetensors", alpha=0.0)
    m1 = merge_checkpoints(reg, ["tiny-sd1", "B"], folder / "checkpoints" / "m1.safetensors", alpha=1.0)
    mid = merge_checkpoints(reg, ["tiny-sd1", "B"], tmp_path / "mid.safetensors", alpha=0.3)
    assert _same(load_components(reg.find("checkpoint", "m0")), a)
    assert _same(load_components(reg.find("checkpoint", "m1")), b)
    tm, ta, tb = _tensors(load_components(reg.find("checkpoint", str(mid)))), _tensors(a), _tensors(b)
    key = "unet.conv_in.weight"
    assert_close_scaled(tm[key], 0.7 * ta[key] + 0.3 * tb[key], rtol=1e-6)
    studio = Studio(Settings(home=tmp_path, models_dir=folder, device="cpu", dtype="fp32"))
    image = lambda model: studio.generate(GenerationRequest(model=model, **SMALL)).images[0].tobytes()  # noqa: E731
    assert image("m0") == image("tiny-sd1")
    assert image("m1") == image("B")
    assert m0.is_file() and m1.is_file()


def test_add_difference_of_equal_models_is_a_and_recipe_is_in_the_header(folder, tmp_path):
    reg = Registry(folder)
    out = merge_checkpoints(reg, ["tiny-sd1", "B", "B"], tmp_path / "ad.safetensors", method="add-difference", alpha=0.7)
    assert _same(load_components(reg.find("checkpoint", str(out))), load_components(reg.find("checkpoint", "tiny-sd1")))
    recipe = read_recipe(out)
    assert recipe["method"] == "add-difference" and recipe["alpha"] == 0.7
    assert [(i["role"], i["name"], i["sha256"]) for i in recipe["inputs"]] == [
        ("A", "tiny-sd1", reg.sha256(reg.find("checkpoint", "tiny-sd1"))),
        ("B", "B", reg.sha256(reg.find("checkpoint", "B"))), ("C", "B", reg.sha256(reg.find("checkpoint", "B")))]
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        a1111 = json.loads(f.metadata()["sd_merge_recipe"])
    assert a1111["interp_method"] == "Add difference" and a1111["multiplier"] == 0.7


def test_full_rank_lora_reproduces_b(folder, tmp_path):
    reg = Registry(folder)
    out, notes = extract_lora(reg, "tiny-sd1", "B", tmp_path / "full.safetensors", rank=10_000)
    from safetensors.torch import load_file

    lora = load_file(str(out))
    a, b = load_components(reg.find("checkpoint", "tiny-sd1")), load_components(reg.find("checkpoint", "B"))
    layers_a, layers_b = kohya_lora_layers(a), kohya_lora_layers(b)
    assert {k.rsplit(".", 2)[0] if "lora_" in k.split(".")[-2] else k.rsplit(".", 1)[0] for k in lora} == set(layers_a)
    worst = 0.0
    for name, (part, path, layer) in layers_a.items():
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        scale = lora[f"{name}.alpha"].item() / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape) * scale
        worst = max(worst, scaled_diff(layer.weight + delta, layers_b[name][2].weight))
    assert worst < 1e-4  # relative to each layer's weights (tests/parity.py)
    assert any(n.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k") for n in lora)
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in lora)
    assert any("unet:" in n for n in notes)  # biases/norms are named, not silently dropped
    assert read_recipe(out)["method"] == "extract-lora"


@pytest.mark.parametrize("base,tuned", [("tiny-sd1", "B"), ("tiny-sdxl", "BXL")])
def test_kohya_lora_loads_in_diffusers(folder, tmp_path, base, tuned):
    """diffusers' kohya converter finds every layer of a rank-4 extraction (names are kohya's:
    diffusers module names for SD1, Stability block names and lora_te1/lora_te2 for SDXL)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    reg = Registry(folder)
    out, _ = extract_lora(reg, base, tuned, tmp_path / "r4.safetensors", rank=4)
    lora = load_file(str(out))
    a = load_components(reg.find("checkpoint", base))
    expected = {}
    for name, (part, path, layer) in kohya_lora_layers(a).items():
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        expected[(part, path)] = layer.weight + (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    if a.family == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in lora) and any(k.startswith("lora_te2_") for k in lora)
        pipe = StableDiffusionXLPipeline(vae=a.vae, text_encoder=a.text_encoder, text_encoder_2=a.text_encoder_2,
                                         tokenizer=a.tokenizer, tokenizer_2=a.tokenizer_2, unet=a.unet, scheduler=None)
    else:
        pipe = StableDiffusionPipeline(vae=a.vae, text_encoder=a.text_encoder, tokenizer=a.tokenizer, unet=a.unet,
                                       scheduler=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = kohya_lora_layers(a)
    worst = max(scaled_diff(fused_layer.weight, expected[(part, path)]) for part, path, fused_layer in fused.values())
    assert worst < 1e-4  # relative to each layer's weights (tests/parity.py)


def test_bad_inputs(folder, tmp_path):
    reg = Registry(folder)
    with pytest.raises(IncompatibleModel, match="'tiny-sd1' is sd1 but model B 'tiny-sdxl' is sdxl"):
        merge_checkpoints(reg, ["tiny-sd1", "tiny-sdxl"], tmp_path / "x.safetensors")
    with pytest.raises(InvalidRequest, match="weighted-sum takes 2 models"):
        merge_checkpoints(reg, ["tiny-sd1", "B", "B"], tmp_path / "x.safetensors")
    with pytest.raises(InvalidRequest, match="unknown merge method 'average'"):
        merge_checkpoints(reg, ["tiny-sd1", "B"], tmp_path / "x.safetensors", method="average")
    with pytest.raises(InvalidRequest, match="one .safetensors file"):
        merge_checkpoints(reg, ["tiny-sd1", "B"], tmp_path / "x.ckpt")
    (tmp_path / "there.safetensors").write_bytes(b"keep")
    with pytest.raises(InvalidRequest, match="already exists"):
        merge_checkpoints(reg, ["tiny-sd1", "B"], tmp_path / "there.safetensors")
    with pytest.raises(InvalidRequest, match="no difference to extract"):
        extract_lora(reg, "tiny-sd1", "tiny-sd1", tmp_path / "same.safetensors")
    with pytest.raises(FileNotFoundError, match="'nope' not found"):
        merge_checkpoints(reg, ["tiny-sd1", "nope"], tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there.safetensors"]


def test_failed_write_leaves_nothing(folder, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        path = args[1]
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoints(Registry(folder), ["tiny-sd1", "B"], tmp_path / "x.safetensors")
    with pytest.raises(OSError, match="disk full"):
        extract_lora(Registry(folder), "tiny-sd1", "B", tmp_path / "l.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_cli_merge(folder, tmp_path):
    from danqing.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--models-dir", str(folder), "merge", "tiny-sd1", "B", "--alpha", "0.25", "--out", "cli-merge.safetensors"])
    assert exit_.value.code in (0, None)
    assert read_recipe(folder / "checkpoints" / "cli-merge.safetensors")["alpha"] == 0.25
    with pytest.raises(SystemExit) as exit_:
        main(["--models-dir", str(folder), "merge", "tiny-sd1", "tiny-sdxl", "--out", "bad.safetensors"])
    assert exit_.value.code == 2


def test_fp16_and_fp32_inputs_mix(folder, tmp_path):
    """The bundled danqing-tiny's text encoder loads in fp16, its single-file export as fp32: they merge,
    and a = 0 is A's values exactly (fp16 -> fp32 is exact)."""
    from danqing.models.single_file import save_single_file

    reg = Registry(folder)
    a = load_components(reg.find("checkpoint", "danqing-tiny"))
    assert a.text_encoder.dtype == torch.float16  # transformers keeps the stored dtype
    save_single_file(a, tmp_path / "copy.safetensors")
    out = merge_checkpoints(reg, ["danqing-tiny", str(tmp_path / "copy.safetensors")], tmp_path / "m.safetensors", alpha=0.0)
    merged, ta = _tensors(load_components(reg.find("checkpoint", str(out)))), _tensors(a)
    assert merged.keys() == ta.keys() and all(torch.equal(merged[k], ta[k].to(merged[k].dtype)) for k in ta)


def test_extracted_lora_through_a_lora_tag_gives_the_tuned_model(folder, tmp_path):
    """B = A with every LoRA-patchable layer changed; the full-rank LoRA of B - A, used as
    ``<lora:name:1>`` on A (danqing.customise.lora), draws B's picture."""
    import shutil

    from danqing.models.single_file import save_single_file

    reg = Registry(folder)
    tuned = load_components(reg.find("checkpoint", "tiny-sd1"))
    g = torch.Generator().manual_seed(9)
    for _, _, layer in kohya_lora_layers(tuned).values():
        layer.weight.data += 0.05 * torch.randn(layer.weight.shape, generator=g)
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    (root / "lora").mkdir()
    shutil.copytree(folder / "checkpoints" / "tiny-sd1", root / "checkpoints" / "tiny-sd1")
    save_single_file(tuned, root / "checkpoints" / "tuned.safetensors")
    local = Registry(root)
    extract_lora(local, "tiny-sd1", "tuned", root / "lora" / "tuned-diff.safetensors", rank=10_000)
    studio = Studio(Settings(home=tmp_path, models_dir=root, device="cpu", dtype="fp32"))
    ref = studio.generate(GenerationRequest(model="tuned", **SMALL)).latents[0]
    via_lora = studio.generate(GenerationRequest(model="tiny-sd1", **{**SMALL, "prompt": SMALL["prompt"] + " <lora:tuned-diff:1>"}))
    assert "Lora hashes: " in via_lora.infotexts[0]
    plain = studio.generate(GenerationRequest(model="tiny-sd1", **SMALL)).latents[0]
    # an fp32 SVD of each weight difference, then a whole sampling loop: 1e-3 of the latents' scale
    assert scaled_diff(via_lora.latents[0], ref) < 1e-3 < scaled_diff(plain, ref)
