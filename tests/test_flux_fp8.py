"""FLUX with fp8-stored transformer weights (float8_e4m3fn, as the shared fp8 files): loaded, the
weights stay fp8 (a quarter of the fp32 parameter memory) and each layer is upcast to the compute
dtype when it runs; and model offload (``--offload``) on tiny models."""

from __future__ import annotations

import pytest
import torch
from test_flow_families import PROMPT, t5_tokenizer, tiny

from danqing import GenerationRequest

REQUEST = GenerationRequest(prompt=PROMPT, sampler="Euler", steps=4, seed=3, width=64, height=64, cfg_scale=1.0)


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.fixture(scope="module")
def fp8_studio(tmp_path_factory):
    from safetensors.torch import save_file

    from danqing import Settings, Studio
    from danqing.models.flow_files import DIT
    from danqing.models.loader import export_single_file
    from danqing.models.single_file import read_state_dict

    root = tmp_path_factory.mktemp("fp8")
    ckpt = root / "models" / "checkpoints"
    ckpt.mkdir(parents=True)
    whole = export_single_file(tiny("flux", 23), ckpt / "flux-fp32.safetensors")
    t5_tokenizer().save_pretrained(ckpt / "t5-tokenizer")
    sd, meta = read_state_dict(whole)
    linear = {k.rsplit(".", 1)[0] for k, v in sd.items() if k.startswith(DIT) and k.endswith(".weight") and v.ndim == 2}
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.rsplit(".", 1)[0] in linear else v for k, v in sd.items()}
    save_file(fp8, str(ckpt / "flux-fp8.safetensors"), metadata=meta)
    # the very same fp8 values held in fp32: what per-layer upcasting must compute exactly
    save_file({k: v.float() if v.dtype == torch.float8_e4m3fn else v for k, v in fp8.items()},
              str(ckpt / "flux-fp8-wide.safetensors"), metadata=meta)
    return Studio(Settings(home=root, models_dir=root / "models", device="cpu", dtype="fp32"))


def test_fp8_weights_stay_fp8_and_upcast_per_layer(fp8_studio):
    """Parameter memory 0.25-0.3 of fp32 (norm scales stay wide); the picture equals that of the
    same fp8 values held in fp32 (max |diff| < 1e-5: the upcast is exact), and its latents are
    within 5% of the fp32 model's (max |diff| / max |latents|; the quantisation error; measured 2.2%)."""
    full = fp8_studio.generate(REQUEST.replace(model="flux-fp32"))
    full_bytes = _bytes(fp8_studio.models.load("flux-fp32").components.unet)
    stored = fp8_studio.generate(REQUEST.replace(model="flux-fp8"))
    transformer = fp8_studio.models.load("flux-fp8").components.unet
    fp8_params = [p for p in transformer.parameters() if p.dtype == torch.float8_e4m3fn]
    assert len(fp8_params) > 20  # after the run: still stored in fp8
    ratio = _bytes(transformer) / full_bytes
    wide = fp8_studio.generate(REQUEST.replace(model="flux-fp8-wide"))
    exact = float((stored.latents[0] - wide.latents[0]).abs().max())
    rel = float((stored.latents[0] - full.latents[0]).abs().max() / full.latents[0].abs().max())
    print(f"fp8 parameter memory {ratio:.3f} of fp32; vs the same values in fp32 {exact:.2g}; vs fp32 {rel:.2%}")
    assert 0.25 <= ratio < 0.3
    assert exact < 1e-5
    assert 0 < rel < 0.05
    assert bool(torch.isfinite(stored.latents[0]).all())


def test_offload_option_is_checked_and_keeps_the_picture(fp8_studio, capsys):
    """``--offload model|sequential`` is accepted, refused in one line without CUDA (before any
    model loads) and by value; model offload's accelerate hooks, run with the CPU as the
    execution device, leave FLUX's picture exactly as it is."""
    from danqing.cli import main
    from danqing.errors import InvalidRequest
    from danqing.models.fastpath import FastPath, _offload, fast_path_from
    from danqing.passes.txt2img import run_txt2img

    assert fast_path_from([], offload="sequential") == fast_path_from([], lowvram=True)
    with pytest.raises(InvalidRequest, match="must be model .* or sequential"):
        fast_path_from([], offload="disk")
    with pytest.raises(InvalidRequest, match="different offloads"):
        fast_path_from([], medvram=True, offload="sequential")
    home = fp8_studio.settings.home
    for mode in ("model", "sequential"):
        with pytest.raises(SystemExit) as done:
            main(["--home", str(home), "--device", "cpu", "generate", PROMPT, "--model", "no-such-model",
                  "--offload", mode])
        err = capsys.readouterr().err
        assert done.value.code == 2 and f"--offload {mode}" in err and "needs a CUDA device" in err, err
        assert len(err.strip().splitlines()) == 1
    comps = fp8_studio.models.load("flux-fp32").components
    request = fp8_studio.generate(REQUEST.replace(model="flux-fp32")).request
    plain = run_txt2img(comps, request, device="cpu", dtype=torch.float32).latents[0]
    # model offload only: sequential offload with the CPU as execution device cannot run CLIP
    # (accelerate leaves its position-id buffer on the meta device), so it is checked above only
    with torch.no_grad(), _offload(comps, FastPath(offload="model"), torch.device("cpu")):
        hooked = run_txt2img(comps, request, device="cpu", dtype=torch.float32).latents[0]
    assert torch.equal(hooked, plain)
