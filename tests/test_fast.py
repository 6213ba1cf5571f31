"""The fast path (models/fastpath.py) and the speed request options (customise/speedups.py).

Every fast-path option gives the plain path's picture (max |diff| < 1e-3 in fp32, decoded
pixels in [0, 1]) and leaves the shared model as it found it; compiled and eager agree.
DeepCache's shallow branch is exact on its own features; its and ToMe's quality cost on
danqing-tiny is measured by bench/speedups_quality.py (docs/benchmarks.md), not here.
"""

from __future__ import annotations

import collections
import time

import pytest
import torch

from danqing import GenerationRequest, Settings, Studio
from danqing.customise.speedups import deepcache, shallow_forward, token_merging
from danqing.decode import decode_latents
from danqing.errors import InvalidRequest
from danqing.models.fastpath import FastPath, applied, fast_path_from
from danqing.outputs.metadata import request_from_infotext

REQ = GenerationRequest(prompt="a red circle", negative_prompt="blurry", steps=2, width=64, height=64, seed=3,
                        batch_size=2, model="tiny-sd1")


@pytest.fixture(scope="module")
def fast_studio(models_dir, tmp_path_factory):
    return Studio(Settings(home=tmp_path_factory.mktemp("fast"), models_dir=models_dir, device="cpu", dtype="fp32"))


def pixels(studio, request, fast: FastPath):
    studio.models.fast = fast
    try:
        result = studio.generate(request)
    finally:
        studio.models.fast = FastPath()
    vae = studio.models.load(request.model).components.vae
    return torch.cat([decode_latents(vae, lat) for lat in result.latents])


def state(unet):
    """What the fast path may change on a UNet, to check it comes back."""
    return ({k: type(v).__name__ for k, v in unet.attn_processors.items()},
            unet.conv_in.weight.is_contiguous(), unet.__dict__.get("_compiled_call_impl"),
            sorted(n for n, _ in unet.named_modules()), [type(m).__name__ for m in unet.modules()])


OPTIONS = {"tiny-sd1": [FastPath(channels_last=True), FastPath(sdpa="math"), FastPath(sdpa="flash"),
                        FastPath(fuse_qkv=True), FastPath(vae_slicing=True, vae_tiling=True), FastPath(trace=True),
                        FastPath(trace=True, channels_last=True, sdpa="flash")],
           "tiny-sdxl": [FastPath(channels_last=True, sdpa="flash", fuse_qkv=True, vae_slicing=True),
                         FastPath(trace=True)]}


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_every_option_gives_the_plain_picture_and_leaves_the_model(fast_studio, model):
    request = REQ.replace(model=model)
    unet = fast_studio.models.load(model).components.unet
    before = state(unet)
    plain = pixels(fast_studio, request, FastPath())
    for fast in OPTIONS[model]:
        diff = (pixels(fast_studio, request, fast) - plain).abs().max().item()
        assert diff < 1e-3, (fast.changed(), diff)
        assert state(unet) == before, fast.changed()


def test_options_are_in_effect_inside_the_scope(fast_studio):
    comps = fast_studio.models.load("tiny-sd1").components
    fast = FastPath(channels_last=True, fuse_qkv=True, vae_slicing=True, vae_tiling=True)
    with applied(comps, fast, torch.device("cpu")):
        assert comps.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert {type(p).__name__ for p in comps.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
        assert comps.vae.use_slicing and comps.vae.use_tiling
    assert comps.unet.conv_in.weight.is_contiguous() and not comps.vae.use_slicing and not comps.vae.use_tiling


def test_compiled_and_eager_agree(fast_studio, monkeypatch):
    """The compiled UNet (dynamo's graph, run by the aot_eager backend: inductor's C++ build of
    even the tiny UNet takes minutes of CPU, too long for the suite; docs/benchmarks.md has the
    inductor run) gives the eager picture, and the eager UNet is back after the request."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: real(fn, backend="aot_eager"))
    request = REQ.replace(batch_size=1, steps=2)
    unet = fast_studio.models.load("tiny-sd1").components.unet
    eager = pixels(fast_studio, request, FastPath())
    t = time.perf_counter()
    compiled = pixels(fast_studio, request, FastPath(compile="default"))
    print(f"compile + 2 steps: {time.perf_counter() - t:.1f} s")
    assert (compiled - eager).abs().max().item() < 1e-3
    assert unet.__dict__.get("_compiled_call_impl") is None  # the eager UNet again after the request


def _traced_calls(unet):
    """How many calls the UNet's traces replay from now on, by what they replay ("forward": the
    whole UNet; "deepcache.full", "deepcache.shallow": DeepCache's branches), counted by
    wrapping the traces there are now."""
    counts = collections.Counter()
    tracer = unet.__dict__["_danqing_tracer"]
    for key, trace in list(tracer.traces.items()):
        def counted(*a, _t=trace, _name=key[0]):
            counts[_name] += 1
            return _t(*a)
        tracer.traces[key] = counted
    return counts


def test_traced_unet_is_bit_identical_with_loras_deepcache_and_regions(tmp_path):
    """``--fast trace`` on danqing-tiny: the very same pixels as eager code for a plain request, a
    LoRA merged after the UNet was traced (a trace reads the weights as they are), DeepCache
    (its full and shallow branches traced as wholes) and regional prompts (stateful
    attention processors: those blocks run eagerly); the traces are replayed where they may be:
    the whole UNet's for a plain call, one per branch under DeepCache."""
    studio = Studio(Settings(home=tmp_path, device="cpu", dtype="fp32"))
    base = GenerationRequest(prompt="a red heart left of a blue circle", steps=6, width=64, height=64, seed=5,
                             model="danqing-tiny")
    unet = studio.models.load("danqing-tiny").components.unet
    before = state(unet)
    plain = pixels(studio, base, FastPath())
    assert torch.equal(pixels(studio, base, FastPath(trace=True)), plain)
    counts = _traced_calls(unet)
    for request in (base.replace(prompt=base.prompt + " <lora:heart:1>"), base.replace(deepcache_interval=2),
                    GenerationRequest.create(**{**base.model_dump(), "prompt": "a red heart BREAK a blue circle",
                                                "regions": {"ratios": "1,1"}})):
        eager = pixels(studio, request, FastPath())
        assert torch.equal(pixels(studio, request, FastPath(trace=True)), eager), request.prompt
        assert not torch.equal(eager, plain)
    assert state(unet) == before
    assert counts == {"forward": 6}  # the LoRA's 6 steps replayed the whole UNet's trace
    counts = _traced_calls(unet)
    pixels(studio, base.replace(deepcache_interval=2), FastPath(trace=True))
    assert counts == {"deepcache.full": 3, "deepcache.shallow": 3}  # steps 1, 3, 5 full; 2, 4, 6 shallow


def test_trace_and_compile_or_fused_projections_are_one_or_the_other():
    assert fast_path_from(["trace"]) == FastPath(trace=True)
    with pytest.raises(InvalidRequest, match="not both"):
        fast_path_from(["trace", "compile=default"])
    with pytest.raises(InvalidRequest, match="not both"):
        fast_path_from(["trace", "fuse-qkv"])


def test_fast_options_from_the_command_line():
    assert fast_path_from(["channels-last", "sdpa=flash", "compile=max-autotune"], medvram=True) == FastPath(
        channels_last=True, sdpa="flash", compile="max-autotune", offload="model")
    assert fast_path_from([], lowvram=True).offload == "sequential"
    with pytest.raises(InvalidRequest, match="known: channels-last"):
        fast_path_from(["turbo"])
    with pytest.raises(InvalidRequest, match="must be one of auto, flash"):
        fast_path_from(["sdpa=fastest"])
    with pytest.raises(InvalidRequest, match="needs a CUDA device"):
        with applied(None, FastPath(offload="sequential"), torch.device("cpu")):
            pass


def test_a_chosen_attention_kernel_keeps_the_math_kernel_behind_it():
    """sdpa=flash prefers flash attention and falls back to the math kernel where flash cannot
    run (SD's VAE attends with one 512-wide head, beyond flash's 256: on a GPU the decode failed
    with "No available kernel" when flash was the only kernel allowed)."""
    from danqing.models.fastpath import _sdpa

    cuda = torch.backends.cuda
    with _sdpa(None, FastPath(sdpa="flash"), torch.device("cpu")):
        assert (cuda.flash_sdp_enabled(), cuda.math_sdp_enabled(), cuda.mem_efficient_sdp_enabled()) == (True, True, False)
    with _sdpa(None, FastPath(sdpa="math"), torch.device("cpu")):
        assert (cuda.flash_sdp_enabled(), cuda.math_sdp_enabled()) == (False, True)
    assert cuda.mem_efficient_sdp_enabled()  # restored on the way out


def test_cli_refuses_an_unknown_fast_option(tmp_path, capsys):
    from danqing.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--home", str(tmp_path), "--device", "cpu", "generate", "a cat", "--fast", "warp"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "unknown fast-path option 'warp'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_deepcache_shallow_branch_is_exact_on_its_own_features(tiny_components, model):
    """Given the very features the full UNet feeds its last up block, the shallow branch returns
    the full UNet's output: the cached steps compute what DeepCache says they compute."""
    unet = tiny_components[model].unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if model == "tiny-sdxl":
        added = {"text_embeds": torch.randn(2, unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim,
                                            generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    kept = {}
    hook = unet.up_blocks[-1].register_forward_pre_hook(lambda m, a, kw: kept.update(h=kw["hidden_states"]),
                                                        with_kwargs=True)
    with torch.no_grad():
        full = unet(x, torch.tensor(500), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        hook.remove()
        shallow = shallow_forward(unet, kept["h"], x, torch.tensor(500), ctx, added)
    assert (shallow - full).abs().max().item() < 1e-5


def test_deepcache_and_tome_are_request_options(fast_studio):
    request = REQ.replace(steps=6, batch_size=1)
    unet = fast_studio.models.load("tiny-sd1").components.unet
    before = state(unet)
    plain = pixels(fast_studio, request, FastPath())
    # interval 1 is off: the very same picture; 3 reuses features and changes it a little
    assert torch.equal(pixels(fast_studio, request.replace(deepcache_interval=1), FastPath()), plain)
    cached = fast_studio.generate(request.replace(deepcache_interval=3))
    merged = fast_studio.generate(request.replace(tome_ratio=0.5))
    assert state(unet) == before  # forward, hooks and block classes given back
    assert "DeepCache interval: 3" in cached.infotexts[0] and "Token merging ratio: 0.5" in merged.infotexts[0]
    again = request_from_infotext(cached.infotexts[0])
    assert again.deepcache_interval == 3 and request_from_infotext(merged.infotexts[0]).tome_ratio == 0.5
    # the same request gives the same picture (no state kept between requests)
    assert torch.equal(fast_studio.generate(request.replace(deepcache_interval=3)).latents[0], cached.latents[0])
    assert torch.equal(fast_studio.generate(request.replace(tome_ratio=0.5)).latents[0], merged.latents[0])
    with pytest.raises(InvalidRequest, match="tome_ratio"):
        GenerationRequest.create(tome_ratio=0.9)


def test_deepcache_skips_the_deep_blocks(tiny_components):
    """Of 6 evaluations at interval 3 only 2 reach the mid block; a new pass starts in full."""
    unet = tiny_components["tiny-sd1"].unet
    calls = []
    hook = unet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    try:
        with torch.no_grad(), deepcache(unet, 3):
            for t in (900, 800, 700, 600, 500, 400):
                unet(x, torch.tensor(t), encoder_hidden_states=ctx)
            assert len(calls) == 2
            unet(x, torch.tensor(950), encoder_hidden_states=ctx)  # timestep up again: a new pass
            assert len(calls) == 3
    finally:
        hook.remove()


def test_tome_merges_at_the_highest_resolution_attention(tiny_components):
    from danqing.customise.speedups import highest_attention_downsample

    unet = tiny_components["tiny-sdxl"].unet
    assert highest_attention_downsample(unet) == 2 ** next(i for i, b in enumerate(unet.down_blocks)
                                                            if getattr(b, "has_cross_attention", False))
    with token_merging(unet, 0.5):
        assert any(type(m).__name__ == "ToMeBlock" for m in unet.modules())
    assert not any(type(m).__name__ == "ToMeBlock" for m in unet.modules())
