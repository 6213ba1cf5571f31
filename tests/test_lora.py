"""LoRA / LyCORIS files: parity with the libraries that write and apply them, prompt tags,
no trace on the base model, infotext hashes, and the errors.

Parity references:
* ``lycoris-lora`` (KohakuBlueleaf/LyCORIS): its kohya wrapper writes LoCon / LoHa / LoKr files
  for a model and applies them itself; our weight patch must give the same UNet and text-encoder
  outputs (within 1e-4).
* diffusers' ``load_lora_weights`` for peft-format files (written by ``save_lora_weights``) and
  for kohya files.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from parity import assert_close_scaled

from danqing.customise.lora import Activation, merge_into, parse_lora_args, patched, read_network, resolve

SD_PRESET = """unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def _inputs(comps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = torch.randint(0, comps.tokenizer.vocab_size - 2, (2, 77), generator=g)
    return x, torch.tensor([500, 20]), ids


def _forward(unet, te, x, t, ids):
    with torch.no_grad():
        ctx = te(ids)[0]
        return ctx, unet(x, t, encoder_hidden_states=ctx).sample


def lycoris_file(comps, tmp_path: Path, algo: str, seed: int = 0, **kw):
    """Write a LyCORIS network for ``comps`` with random (non-zero) factors; return the file and
    (unet, text encoder) copies with lycoris' own application of it."""
    from lycoris.kohya import create_network

    unet, te = copy.deepcopy(comps.unet), copy.deepcopy(comps.text_encoder)
    preset = tmp_path / "sd-preset.toml"
    preset.write_text(SD_PRESET)
    net = create_network(1.0, 4, 2.0, None, te, unet, algo=algo, conv_dim=4, conv_alpha=2.0, preset=str(preset), **kw)
    net.apply_to(te, unet, True, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path / f"{algo}-{seed}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return path, unet, te


def _ours(comps, path: Path, mult: float = 1.0):
    modules, _ = read_network(path)
    return Activation(resolve(path.stem, "0" * 64, modules, comps, "tiny-sd1"), mult, mult)


VARIANTS = [
    ("lora", {}),  # LoCon: linear and conv LoRA
    ("lora", {"use_tucker": True}),  # LoCon with a Tucker core (lora_mid)
    ("loha", {}),
    ("loha", {"use_tucker": True}),
    ("lokr", {}),
    ("lokr", {"use_tucker": True}),
    ("lokr", {"factor": 4, "full_matrix": True}),  # both Kronecker halves full
]


@pytest.mark.parametrize("algo,kw", VARIANTS, ids=[f"{a}-{'-'.join(k) or 'plain'}" for a, k in VARIANTS])
def test_lycoris_files_match_lycoris(tiny_components, tmp_path, algo, kw):
    comps = tiny_components["tiny-sd1"]
    path, ref_unet, ref_te = lycoris_file(comps, tmp_path, algo, **kw)
    x, t, ids = _inputs(comps)
    base_ctx, base = _forward(comps.unet, comps.text_encoder, x, t, ids)
    ref_ctx, ref = _forward(ref_unet, ref_te, x, t, ids)
    act = _ours(comps, path)
    assert len(act.network.targets) == len(read_network(path)[0])  # every module of the file matched
    with patched(comps, [act]):
        ctx, out = _forward(comps.unet, comps.text_encoder, x, t, ids)
    assert (ref - base).abs().max() > 0.01  # the network changes the output (100x the tolerance) ...
    assert_close_scaled(out, ref)  # ... as lycoris applies it (relative bound: tests/parity.py)
    assert_close_scaled(ctx, ref_ctx)
    after_ctx, after = _forward(comps.unet, comps.text_encoder, x, t, ids)
    assert torch.equal(after, base) and torch.equal(after_ctx, base_ctx)  # restored bit for bit


def _pipeline(comps):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=comps.vae, text_encoder=copy.deepcopy(comps.text_encoder), tokenizer=comps.tokenizer,
                                   unet=copy.deepcopy(comps.unet), scheduler=DDIMScheduler.from_config(comps.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_diffusers_peft_file_matches_diffusers(tiny_components, tmp_path):
    """A peft-format file (UNet + text encoder, lora_alpha != r, from the header) as diffusers loads it."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    comps = tiny_components["tiny-sd1"]
    unet, te = copy.deepcopy(comps.unet), copy.deepcopy(comps.text_encoder)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    te.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    pipe = _pipeline(comps)
    pipe.load_lora_weights(str(path))
    x, t, ids = _inputs(comps, 1)
    ref_ctx, ref = _forward(pipe.unet, pipe.text_encoder, x, t, ids)
    _, base = _forward(comps.unet, comps.text_encoder, x, t, ids)
    with patched(comps, [_ours(comps, path)]):
        ctx, out = _forward(comps.unet, comps.text_encoder, x, t, ids)
    assert (ref - base).abs().max() > 0.05
    assert_close_scaled(out, ref) and assert_close_scaled(ctx, ref_ctx)


def test_kohya_file_matches_diffusers(tiny_components, tmp_path):
    """A kohya-format LoCon file (``lora_unet_*`` / ``lora_te_*``, alpha) as diffusers' kohya converter loads it."""
    comps = tiny_components["tiny-sd1"]
    path, _, _ = lycoris_file(comps, tmp_path, "lora", seed=3)
    pipe = _pipeline(comps)
    pipe.load_lora_weights(str(path))
    x, t, ids = _inputs(comps, 2)
    ref_ctx, ref = _forward(pipe.unet, pipe.text_encoder, x, t, ids)
    with patched(comps, [_ours(comps, path)]):
        ctx, out = _forward(comps.unet, comps.text_encoder, x, t, ids)
    assert_close_scaled(out, ref) and assert_close_scaled(ctx, ref_ctx)


def test_ldm_named_kohya_keys_reach_the_same_modules(tiny_components, tmp_path):
    """kohya's SDXL-style names (``lora_unet_input_blocks_1_1_...``) reach the same modules as diffusers-style ones."""
    from safetensors.torch import load_file, save_file

    from danqing.customise.lora import name_table

    comps = tiny_components["tiny-sd1"]
    path, _, _ = lycoris_file(comps, tmp_path, "lora", seed=4)
    table = name_table(comps)
    by_target: dict = {}
    for key, target in table.items():
        if key.startswith("lora_unet_"):
            by_target.setdefault(target, []).append(key)
    sd = load_file(path)
    renamed, n_ldm = {}, 0
    for k, v in sd.items():
        mod, suffix = k.split(".", 1)
        names = by_target.get(table.get(mod), [mod])
        ldm = next((n for n in names if n != mod), mod)
        n_ldm += ldm != mod
        renamed[f"{ldm}.{suffix}"] = v
    assert n_ldm > 50  # most UNet modules have a distinct LDM name
    ldm_path = tmp_path / "ldm-names.safetensors"
    save_file(renamed, ldm_path)
    x, t, ids = _inputs(comps, 3)
    with patched(comps, [_ours(comps, path)]):
        _, a = _forward(comps.unet, comps.text_encoder, x, t, ids)
    with patched(comps, [_ours(comps, ldm_path)]):
        _, b = _forward(comps.unet, comps.text_encoder, x, t, ids)
    assert torch.equal(a, b)


def test_merge_into_equals_applying(tiny_components, tmp_path):
    """Merging a LoRA into the weights at w gives the same model as patching it at w."""
    comps = tiny_components["tiny-sd1"]
    path, _, _ = lycoris_file(comps, tmp_path, "loha", seed=5)
    x, t, ids = _inputs(comps, 4)
    with patched(comps, [_ours(comps, path, 0.6)]):
        _, applied = _forward(comps.unet, comps.text_encoder, x, t, ids)
    merged = copy.copy(comps)
    merged.unet, merged.text_encoder = copy.deepcopy(comps.unet), copy.deepcopy(comps.text_encoder)
    merge_into(merged, [_ours(merged, path, 0.6)])
    _, out = _forward(merged.unet, merged.text_encoder, x, t, ids)
    assert torch.equal(out, applied)


def test_lora_tag_arguments_follow_a1111():
    assert parse_lora_args(["style"]) == parse_lora_args(["style", "1"])
    tag = parse_lora_args(["style", "0.5"])
    assert (tag.te, tag.unet) == (0.5, 0.5)
    tag = parse_lora_args(["style", "0.5", "0.8"])  # A1111: te first, then unet
    assert (tag.te, tag.unet) == (0.5, 0.8)
    tag = parse_lora_args(["style", "unet=0.3", "te=0"])
    assert (tag.te, tag.unet) == (0.0, 0.3)
    assert parse_lora_args(str(tag)[len("<lora:"):-1].split(":")) == tag  # writes what it reads
    for bad in (["style", "x"], ["style", "1", "2", "3"], [""], ["style", "foo=1"]):
        with pytest.raises(ValueError):
            parse_lora_args(bad)


# ---------------------------------------------------------------------------------------------
# Through the Studio: tags, no trace, infotext, reproduction, errors
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_studio(models_dir, tiny_components, tmp_path_factory):
    """A Studio whose lora/ folder holds a LoHa and a LoCon for tiny-sd1 and one for tiny-sdxl."""
    from danqing import Settings, Studio

    root = tmp_path_factory.mktemp("lora-models")
    (root / "checkpoints").symlink_to(models_dir / "checkpoints")
    (root / "lora").mkdir()
    work = tmp_path_factory.mktemp("lora-work")
    for algo, seed in (("loha", 7), ("lora", 8)):
        path, _, _ = lycoris_file(tiny_components["tiny-sd1"], work, algo, seed=seed)
        path.rename(root / "lora" / f"style-{algo}.safetensors")
    xl = tiny_components["tiny-sdxl"]
    from lycoris.kohya import create_network

    preset = work / "sd-preset.toml"
    tes, unet = [copy.deepcopy(xl.text_encoder), copy.deepcopy(xl.text_encoder_2)], copy.deepcopy(xl.unet)
    net = create_network(1.0, 4, 2.0, None, tes, unet, algo="lora", preset=str(preset))
    net.apply_to(tes, unet, True, True)
    net.save_weights(str(root / "lora" / "xl-style.safetensors"), torch.float32, {})
    return Studio(Settings(home=tmp_path_factory.mktemp("lora-home"), models_dir=root, device="cpu", dtype="fp32"))


def _req(prompt, **kw):
    from danqing import GenerationRequest

    return GenerationRequest.create(prompt=prompt, model="tiny-sd1", width=64, height=64, steps=4, seed=11,
                                    sampler="Euler", **kw)


def test_tags_change_the_image_and_leave_no_trace(lora_studio):
    import numpy as np

    def px(res):
        return np.asarray(res.images[0], dtype=np.int16)

    before = px(lora_studio.generate(_req("a red circle")))
    one = lora_studio.generate(_req("a red circle <lora:style-loha:0.8>"))
    both = px(lora_studio.generate(_req("a red circle <lora:style-loha:0.8> <lora:style-lora:1:0.5>")))
    after = px(lora_studio.generate(_req("a red circle")))
    assert np.array_equal(before, after)  # bit-identical: nothing left on the base model
    assert np.abs(px(one) - before).mean() > 1 and np.abs(both - px(one)).mean() > 1
    # the tag is not text: the same prompt with the LoRA at weight 0 is the plain image
    assert np.array_equal(px(lora_studio.generate(_req("a red circle <lora:style-loha:0>"))), before)


def test_infotext_has_lora_hashes_and_reproduces(lora_studio):
    import numpy as np

    from danqing.outputs.infotext import parse_infotext
    from danqing.outputs.metadata import request_from_infotext

    res = lora_studio.generate(_req("a red circle <lora:style-loha:0.8>"))
    prompt, _, params = parse_infotext(res.infotexts[0])
    entry = lora_studio.registry.find("lora", "style-loha")
    assert "<lora:style-loha:0.8>" in prompt
    assert params["Lora hashes"] == f"style-loha: {lora_studio.registry.sha256(entry)[:12]}"
    again = lora_studio.generate(request_from_infotext(res.infotexts[0]))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(res.images[0]))


def test_lora_errors_say_what_is_wrong(lora_studio):
    from danqing.errors import IncompatibleModel, InvalidRequest

    with pytest.raises(InvalidRequest, match="'nope' not found.*installed: style-loha, style-lora, xl-style"):
        lora_studio.generate(_req("a circle <lora:nope:1>"))
    with pytest.raises(IncompatibleModel, match="'xl-style' does not fit model 'tiny-sd1'.*sd1"):
        lora_studio.generate(_req("a circle <lora:xl-style:1>"))
    with pytest.raises(InvalidRequest, match="negative_prompt: <lora:...> tags belong in the prompt"):
        lora_studio.generate(_req("a circle", negative_prompt="<lora:style-loha:1>"))
    with pytest.raises(InvalidRequest, match="prompt: .*'x' is not a weight"):
        lora_studio.generate(_req("a circle <lora:style-loha:x>"))
    with pytest.raises(InvalidRequest, match="used twice"):
        lora_studio.generate(_req("a circle <lora:style-loha:1> <lora:style-loha:0.5>"))


def test_unreadable_lora_file_is_named(tmp_path):
    from danqing.errors import CorruptModel

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptModel, match="broken.safetensors: not a readable LoRA file"):
        read_network(bad)


def test_sdxl_file_with_two_text_encoders_matches_lycoris(tiny_components, tmp_path):
    """SDXL: ``lora_te1_`` / ``lora_te2_`` reach CLIP-L and OpenCLIP-bigG, ``lora_unet_`` the UNet."""
    from lycoris.kohya import create_network

    xl = tiny_components["tiny-sdxl"]
    preset = tmp_path / "sd-preset.toml"
    preset.write_text(SD_PRESET)
    tes, unet = [copy.deepcopy(xl.text_encoder), copy.deepcopy(xl.text_encoder_2)], copy.deepcopy(xl.unet)
    net = create_network(1.0, 4, 2.0, None, tes, unet, algo="loha", preset=str(preset))
    net.apply_to(tes, unet, True, True)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path / "xl.safetensors"
    net.save_weights(str(path), torch.float32, {})
    keys = {k.split("_")[1] for k in read_network(path)[0]}
    assert {"te1", "te2", "unet"} <= keys

    x = torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.randint(0, 1000, (1, 77), generator=g)

    def run(te1, te2, u):
        with torch.no_grad():
            h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
            o2 = te2(ids, output_hidden_states=True)
            ctx = torch.cat([h1, o2.hidden_states[-2]], dim=-1)
            added = {"text_embeds": o2.text_embeds, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)}
            return ctx, u(x, torch.tensor([300]), encoder_hidden_states=ctx, added_cond_kwargs=added).sample

    ref_ctx, ref = run(tes[0], tes[1], unet)
    _, base = run(xl.text_encoder, xl.text_encoder_2, xl.unet)
    modules, _ = read_network(path)
    act = Activation(resolve("xl", "0" * 64, modules, xl, "tiny-sdxl"), 1.0, 1.0)
    assert len(act.network.targets) == len(modules)
    with patched(xl, [act]):
        ctx, out = run(xl.text_encoder, xl.text_encoder_2, xl.unet)
    assert (ref - base).abs().max() > 0.01
    assert_close_scaled(out, ref) and assert_close_scaled(ctx, ref_ctx)


def test_lora_merged_into_a_checkpoint_draws_what_the_tag_draws(lora_studio, tmp_path):
    """``danqing merge --method merge-lora`` at weight w == ``<lora:name:w>``."""
    import numpy as np

    from danqing import Settings, Studio
    from danqing.customise.merge import merge_loras, read_recipe

    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    out = merge_loras(lora_studio.registry, "tiny-sd1", [("style-loha", 0.7), ("style-lora", 0.4)],
                      root / "checkpoints" / "merged.safetensors")
    recipe = read_recipe(out)
    assert recipe["method"] == "merge-lora" and [i["name"] for i in recipe["inputs"]] == ["tiny-sd1", "style-loha", "style-lora"]
    merged = Studio(Settings(home=tmp_path / "home", models_dir=root, device="cpu", dtype="fp32"))
    tagged = lora_studio.generate(_req("a red circle <lora:style-loha:0.7> <lora:style-lora:0.4>"))
    baked = merged.generate(_req("a red circle").replace(model="merged"))
    plain = lora_studio.generate(_req("a red circle"))
    a, b = (np.asarray(r.images[0], dtype=np.int16) for r in (tagged, baked))
    assert np.abs(a - np.asarray(plain.images[0], dtype=np.int16)).mean() > 1
    assert np.abs(a - b).max() <= 1


def test_text_encoder_names_from_before_transformers_5_reach_the_same_modules(tiny_components):
    """kohya and older diffusers files name CLIP modules from CLIPTextModel's ``text_model``
    level (``lora_te_text_model_encoder_...``, ``text_encoder.text_model.encoder...``)."""
    from danqing.customise.lora import name_table

    comps = tiny_components["tiny-sd1"]
    table = name_table(comps)
    te = [(k, v) for k, v in table.items() if v[0] == "text_encoder" and k.startswith("lora_te_")
          and not k.startswith("lora_te_text_model_")]
    assert te
    for key, target in te:
        rest = key[len("lora_te_"):]
        assert table["lora_te_text_model_" + rest] == target
        assert table["text_encoder.text_model." + target[1]] == target


def test_bundled_embeddings_are_read_in_a1111s_layouts():
    """A1111 reads textual-inversion vectors bundled in LoRA files (pivotal tuning) under
    bundle_emb.<name>.string_to_param.* (one text encoder) or .clip_l / .clip_g (SDXL); the
    LoRA modules beside them are unaffected, and an unknown bundle key is a clear error."""
    from danqing.customise.lora import parse_bundled, parse_state_dict
    from danqing.errors import CorruptModel

    sd = {"bundle_emb.sks.string_to_param.*": torch.ones(2, 768), "bundle_emb.zq.clip_l": torch.ones(768),
          "bundle_emb.zq.clip_g": torch.ones(1, 1280),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 320),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(320, 4)}
    out = parse_bundled(sd)
    assert set(out) == {"sks", "zq"} and out["sks"]["emb_params"].shape == (2, 768)
    assert out["zq"]["clip_l"].shape == (1, 768) and out["zq"]["clip_g"].shape == (1, 1280)
    assert list(parse_state_dict(sd)) == ["lora_unet_down_blocks_0_attentions_0_proj_in"]
    with pytest.raises(CorruptModel, match="bundle_emb.sks.weird"):
        parse_bundled({"bundle_emb.sks.weird": torch.ones(1, 768)})
