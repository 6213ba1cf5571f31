"""Textual-inversion embeddings: files (A1111 / diffusers / SDXL), parity with diffusers'
``load_textual_inversion``, use by name in prompts, no trace on the shared model, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from parity import assert_close_scaled

from danqing import GenerationRequest, Settings, Studio
from danqing.conditioning.text import CHUNK, TextEncoder, tokenize_prompt
from danqing.customise.embeddings import (
    EmbeddingError, load_embedding, parse_ti_hashes, save_embedding_a1111,
)
from danqing.errors import IncompatibleModel

NAME = "zqxstyle"  # several BPE tokens, no vocabulary word
SMALL = dict(width=64, height=64, steps=4, seed=7, sampler="Euler", cfg_scale=5.0)


def _vectors(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g)


@pytest.fixture()
def studio_with(tmp_path, models_dir):
    """A Studio on the session's tiny checkpoints with its own (empty) embeddings/ folder."""
    root = tmp_path / "models"
    (root / "embeddings").mkdir(parents=True)
    (root / "checkpoints").symlink_to(models_dir / "checkpoints")
    return Studio(Settings(home=tmp_path, models_dir=root, device="cpu", dtype="fp32")), root / "embeddings"


# -- files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a1111_round_trip(tmp_path, suffix):
    single = {"emb_params": _vectors(3, 32)}
    path = save_embedding_a1111(tmp_path / f"{NAME}{suffix}", NAME, single, {"step": 500, "sd_checkpoint": "abc"})
    emb = load_embedding(path)
    assert emb.name == NAME and emb.n_vectors == 3
    assert torch.equal(emb.vectors["emb_params"], single["emb_params"])
    assert emb.meta["step"] == "500" and emb.meta["sd_checkpoint"] == "abc"
    assert len(emb.hash) == 64 and emb.short_hash == emb.hash[:12]
    xl = {"clip_l": _vectors(2, 32, 1), "clip_g": _vectors(2, 32, 2)}
    emb = load_embedding(save_embedding_a1111(tmp_path / f"xl{suffix}", "xl", xl))
    assert set(emb.vectors) == {"clip_l", "clip_g"}
    assert all(torch.equal(emb.vectors[k], xl[k]) for k in xl)
    with pytest.raises(FileExistsError):
        save_embedding_a1111(path, NAME, single)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{NAME}{suffix}", f"xl{suffix}"])  # no temp files


def test_a1111_pt_layout_and_diffusers_files(tmp_path):
    v = _vectors(2, 32)
    # exactly what A1111's Embedding.save writes
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "x", "step": 10,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "a.pt")
    assert torch.equal(load_embedding(tmp_path / "a.pt").vectors["emb_params"], v)
    # diffusers: {"<token>": (dim,)} in learned_embeds.bin / .safetensors; named after its folder
    (tmp_path / "cat-toy").mkdir()
    torch.save({"<cat-toy>": v[0]}, tmp_path / "cat-toy" / "learned_embeds.bin")
    emb = load_embedding(tmp_path / "cat-toy" / "learned_embeds.bin")
    assert emb.name == "cat-toy" and emb.vectors["emb_params"].shape == (1, 32)
    from safetensors.torch import save_file

    save_file({"<tok>": v}, str(tmp_path / "d.safetensors"))
    assert torch.equal(load_embedding(tmp_path / "d.safetensors").vectors["emb_params"], v)


def test_bad_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "pic.png").write_bytes(b"\x89PNG")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    for name in ("junk.pt", "pic.png", "junk.safetensors"):
        with pytest.raises(EmbeddingError, match="allowed: A1111 .pt"):
            load_embedding(tmp_path / name)

    class Evil:  # an arbitrary pickled object is never unpickled
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match="weights-only"):
        load_embedding(tmp_path / "evil.pt")
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.bin")
    with pytest.raises(EmbeddingError, match="not an embedding"):
        load_embedding(tmp_path / "two.bin")
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(1, 4)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(EmbeddingError, match="clip_g is missing"):
        load_embedding(tmp_path / "half.safetensors")


# -- parity with diffusers --------------------------------------------------------------------
def test_sd1_prompt_embeddings_match_diffusers(tiny_components, tmp_path):
    from diffusers import StableDiffusionPipeline

    comps = tiny_components["tiny-sd1"]
    dim = comps.text_encoder.config.hidden_size
    emb = load_embedding(save_embedding_a1111(tmp_path / f"{NAME}.safetensors", NAME, {"emb_params": _vectors(3, dim)}))
    ours = TextEncoder(comps, embeddings=[emb]).encode(f"a photo of {NAME}, in the snow").hidden

    te, tok = copy.deepcopy(comps.text_encoder), copy.deepcopy(comps.tokenizer)
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=te, tokenizer=tok, unet=comps.unet,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_textual_inversion({NAME: emb.vectors["emb_params"]}, token=NAME)
    ref, _ = pipe.encode_prompt(f"a photo of {NAME}, in the snow", "cpu", 1, False)
    assert_close_scaled(ours, ref)  # relative to the hidden states' scale (tests/parity.py)
    plain = TextEncoder(comps).encode(f"a photo of {NAME}, in the snow").hidden
    assert (plain - ref).abs().max().item() > 1e-3  # the embedding did something


def test_sdxl_dual_embedding_matches_diffusers(tiny_components, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    comps = tiny_components["tiny-sdxl"]
    d1, d2 = comps.text_encoder.config.hidden_size, comps.text_encoder_2.config.hidden_size
    vec = {"clip_l": _vectors(2, d1, 1), "clip_g": _vectors(2, d2, 2)}
    emb = load_embedding(save_embedding_a1111(tmp_path / f"{NAME}.safetensors", NAME, vec))
    cond = TextEncoder(comps, embeddings=[emb]).encode(f"{NAME} on a hill")

    pipe = StableDiffusionXLPipeline(vae=comps.vae, text_encoder=copy.deepcopy(comps.text_encoder),
                                     text_encoder_2=copy.deepcopy(comps.text_encoder_2),
                                     tokenizer=copy.deepcopy(comps.tokenizer), tokenizer_2=copy.deepcopy(comps.tokenizer_2),
                                     unet=comps.unet, scheduler=None)
    pipe.load_textual_inversion(vec["clip_l"], token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vec["clip_g"], token=NAME, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    ref, _, pooled, _ = pipe.encode_prompt(f"{NAME} on a hill", device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    assert_close_scaled(cond.hidden, ref)
    assert_close_scaled(cond.pooled, pooled)


def test_image_matches_diffusers_and_leaves_no_trace(studio_with, tiny_components):
    from diffusers import StableDiffusionPipeline

    from danqing.sampling.samplers import make_scheduler

    studio, folder = studio_with
    request = GenerationRequest(prompt=f"a red circle, {NAME}", model="tiny-sd1", **SMALL)
    before = studio.generate(request).images[0]
    comps = studio.models.load("tiny-sd1").components
    state = {k: v.clone() for k, v in comps.text_encoder.state_dict().items()}
    n_tokens = len(comps.tokenizer)

    vec = {"emb_params": _vectors(2, comps.text_encoder.config.hidden_size, 5) * 3}
    save_embedding_a1111(folder / f"{NAME}.pt", NAME, vec)
    result = studio.generate(request)
    ours = result.latents[0]
    assert "TI hashes: " in result.infotexts[0]

    te, tok = copy.deepcopy(comps.text_encoder), copy.deepcopy(comps.tokenizer)
    scheduler = make_scheduler(comps.scheduler_config, request.sampler, request.schedule, seed=request.seed)
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=te, tokenizer=tok, unet=comps.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(vec["emb_params"], token=NAME)
    with torch.no_grad():
        ref = pipe(request.prompt, num_inference_steps=request.steps, guidance_scale=request.cfg_scale, height=64,
                   width=64, generator=[torch.Generator("cpu").manual_seed(request.seed)], output_type="latent").images
    assert_close_scaled(ours, ref)

    # the shared model is as it was: same weights, vocabulary, no hooks; the plain prompt is bit-identical
    assert len(comps.tokenizer) == n_tokens
    assert not comps.text_encoder.get_input_embeddings()._forward_hooks
    assert all(torch.equal(v, state[k]) for k, v in comps.text_encoder.state_dict().items())
    (folder / f"{NAME}.pt").unlink()
    after = studio.generate(request).images[0]
    assert after.tobytes() == before.tobytes()
    assert "TI hashes" not in studio.generate(request).infotexts[0]


def test_infotext_names_hashes_and_recreates_the_image(studio_with, tmp_path):
    from danqing.outputs.infotext import parse_infotext
    from danqing.outputs.metadata import request_from_infotext
    from danqing.outputs.store import read_infotext

    studio, folder = studio_with
    dim = 32
    a = load_embedding(save_embedding_a1111(folder / f"{NAME}.safetensors", NAME, {"emb_params": _vectors(1, dim, 3)}))
    b = load_embedding(save_embedding_a1111(folder / "qqbad-hands.pt", "qqbad-hands", {"emb_params": _vectors(2, dim, 4)}))
    save_embedding_a1111(folder / "zzunused.pt", "zzunused", {"emb_params": _vectors(1, 5)})  # never touched
    request = GenerationRequest(prompt=f"({NAME}:1.3) portrait", negative_prompt="qqbad-hands", model="tiny-sd1", **SMALL)
    result = studio.generate(request, save=True, out_dir=tmp_path / "out")
    text = read_infotext(result.paths[0])
    hashes = parse_ti_hashes(parse_infotext(text)[2]["TI hashes"])
    assert hashes == {NAME: a.hash[:12], "qqbad-hands": b.hash[:12]}
    again = studio.generate(request_from_infotext(text))
    assert again.images[0].tobytes() == result.images[0].tobytes()


# -- chunking ---------------------------------------------------------------------------------
def test_embedding_is_not_split_across_chunks(tiny_components, tmp_path):
    comps = tiny_components["tiny-sd1"]
    emb = load_embedding(save_embedding_a1111(tmp_path / f"{NAME}.pt", NAME, {"emb_params": _vectors(4, 32)}))
    chunks = tokenize_prompt(comps.tokenizer, " ".join(["cat"] * 73) + f" {NAME}", [emb])
    assert len(chunks) == 2  # 73 + 4 > 75: the embedding moves whole to chunk 2
    assert chunks[0].fixes == () and chunks[1].fixes == ((1, NAME),)
    assert chunks[1].ids[1:5] == (0, 0, 0, 0) and chunks[1].ids[5] == comps.tokenizer.eos_token_id
    (one,) = tokenize_prompt(comps.tokenizer, f"(a {NAME}:1.5)", [emb])
    assert one.weights[2:6] == (1.5,) * 4 and CHUNK == 75


# -- bad use ----------------------------------------------------------------------------------
def test_wrong_width_wrong_family_and_vocabulary_word(studio_with):
    studio, folder = studio_with
    save_embedding_a1111(folder / f"{NAME}.pt", NAME, {"emb_params": _vectors(1, 24)})
    with pytest.raises(IncompatibleModel, match="24 vs 32"):
        studio.generate(GenerationRequest(prompt=f"a {NAME}", model="tiny-sd1", **SMALL))
    with pytest.raises(IncompatibleModel, match="needs clip_l \\+ clip_g"):
        studio.generate(GenerationRequest(prompt=f"a {NAME}", model="tiny-sdxl", **SMALL))
    (folder / f"{NAME}.pt").unlink()
    save_embedding_a1111(folder / "cat.safetensors", "cat", {"emb_params": _vectors(1, 32)})
    with pytest.raises(EmbeddingError, match="the word 'cat' in the tokenizer's vocabulary"):
        studio.generate(GenerationRequest(prompt="a cat", model="tiny-sd1", **SMALL))
    (folder / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(EmbeddingError, match="broken.pt: cannot be read"):
        studio.generate(GenerationRequest(prompt="a dog, broken", model="tiny-sd1", **SMALL))
    studio.generate(GenerationRequest(prompt="a dog", model="tiny-sd1", **SMALL))  # unused files are not read


def test_api_lists_real_embeddings(studio_with, tmp_path):
    from fastapi.testclient import TestClient

    from server_helpers import make_app

    studio, folder = studio_with
    save_embedding_a1111(folder / f"{NAME}.safetensors", NAME, {"emb_params": _vectors(3, 32)}, {"step": 42})
    (folder / "broken.pt").write_bytes(b"garbage")
    save_embedding_a1111(folder / "cat.pt", "cat", {"emb_params": _vectors(1, 32)})
    with TestClient(make_app(tmp_path / "home", studio=studio)) as client:
        body = client.get("/sdapi/v1/embeddings").json()
    assert body["loaded"][NAME] == {"step": 42, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                    "shape": 32, "vectors": 3}
    assert "cannot be read" in body["skipped"]["broken"]["error"]
    assert "the word 'cat'" in body["skipped"]["cat"]["error"]


def test_prompt_to_prompt_aligns_embedding_positions(tiny_components):
    from danqing.customise.embeddings import Embedding
    from danqing.editing.p2p import align_tokens, prompt_ids

    tok = tiny_components["tiny-sd1"].tokenizer
    a, b = Embedding(NAME, {"emb_params": _vectors(3, 32)}), Embedding("qqother", {"emb_params": _vectors(2, 32)})
    src = prompt_ids(tok, f"a red {NAME} circle", "p2p_source", [a, b])
    tgt = prompt_ids(tok, f"a green {NAME} circle", "prompt", [a, b])
    swapped = prompt_ids(tok, "a red qqother circle", "prompt", [a, b])
    assert src[3:6] == tgt[3:6] == [-1001, -1002, -1003] and swapped[3:5] == [-1, -2]  # sorted names: qqother, zqx...
    mapper, alpha = align_tokens(src, tgt)
    assert all(mapper[i, i] == 1 and alpha[i] == 1 for i in (3, 4, 5))  # the embedding keeps its own maps
    assert min(prompt_ids(tok, f"a red {NAME} circle", "prompt")) >= 0  # without the embeddings: plain words


def test_cli_from_warns_when_an_embedding_changed(studio_with, tmp_path, capsys):
    from danqing.cli import main

    studio, folder = studio_with
    models = folder.parent
    save_embedding_a1111(folder / f"{NAME}.pt", NAME, {"emb_params": _vectors(1, 32, 1)})
    args = ["--home", str(tmp_path), "--models-dir", str(models), "--device", "cpu"]
    first = tmp_path / "first.png"

    def run(*more):
        with pytest.raises(SystemExit) as exc:
            main(args + list(more))
        assert exc.value.code in (0, None)
        return " ".join(capsys.readouterr().err.split())  # rich wraps long lines

    run("generate", f"a {NAME}", "--model", "tiny-sd1", "--steps", "2", "--width", "64", "--height", "64",
        "--seed", "1", "-q", "--out", str(first))
    assert "warning" not in run("generate", "--from", str(first), "-q", "--out", str(tmp_path / "same.png"))
    save_embedding_a1111(folder / f"{NAME}.pt", NAME, {"emb_params": _vectors(1, 32, 2)}, overwrite=True)
    err = run("generate", "--from", str(first), "-q", "--out", str(tmp_path / "changed.png"))
    assert f"embedding {NAME!r} has changed since the original image" in err
    (folder / f"{NAME}.pt").unlink()
    err = run("generate", "--from", str(first), "-q", "--out", str(tmp_path / "gone.png"))
    assert "is not in the embeddings folder now" in err


def test_ui_pickers_append_the_tag_or_the_name_once():
    """The web UI's LoRA and embedding pickers (A1111's extra-network cards) append to the prompt."""
    from danqing.server.ui import add_network

    assert add_network("a red circle", "lora", "heart") == "a red circle <lora:heart:1>"
    assert add_network("a red circle <lora:heart:0.5>", "lora", "heart") == "a red circle <lora:heart:0.5>"
    assert add_network("a red circle", "embedding", "dq-magenta") == "a red circle, dq-magenta"
    assert add_network("a dq-magenta circle", "embedding", "dq-magenta") == "a dq-magenta circle"
    assert add_network("a dq-magenta-2 circle", "embedding", "dq-magenta") == "a dq-magenta-2 circle, dq-magenta"
    assert add_network("", "embedding", "dq-magenta") == "dq-magenta"
