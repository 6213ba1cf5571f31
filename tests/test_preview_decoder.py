"""Live previews through a tiny decoder (TAESD architecture): TAESD's own file layout loads,
the bundled decoder for danqing-tiny draws previews much closer to the VAE's picture than the
linear approximation, the server's worker uses it when the option asks, and the trainer writes a
decoder that beats the linear preview."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_helpers import shared_studio

from danqing import GenerationRequest
from danqing.decode import cheap_preview, tiny_preview
from danqing.errors import CorruptModel, InvalidRequest
from danqing.models.preview_decoder import (
    TINY_CONFIG, build_tiny_decoder, bundled_decoder_path, find_tiny_decoder, latent_space, load_tiny_decoder,
    taesd_to_diffusers,
)
from danqing.training.preview_decoder import diffusers_to_taesd, train_preview_decoder


def _psnr(a, b) -> float:
    a, b = (np.asarray(x.convert("RGB").resize((64, 64)), np.float64) for x in (a, b))
    return float(10 * np.log10(255.0**2 / max(((a - b) ** 2).mean(), 1e-9)))


@pytest.mark.parametrize("config", [{}, TINY_CONFIG], ids=["taesd", "danqing-tiny"])
def test_taesd_files_load_as_written(tmp_path, config):
    """A decoder in TAESD's own layout (``N.…``, .safetensors and .pth) loads into the same
    network: its config is read from the keys and its pictures are identical."""
    torch.manual_seed(0)
    model = build_tiny_decoder(**config).eval()
    state = diffusers_to_taesd(model.state_dict())
    assert "1.weight" in state and not any(k.startswith("0.") for k in state)  # index 0 is TAESD's clamp
    assert taesd_to_diffusers(state).keys() == {k for k in model.state_dict() if k.startswith("decoder.")}
    save_file(state, tmp_path / "taesd_decoder.safetensors")
    torch.save(state, tmp_path / "taesd_decoder.pth")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = model.decode(z).sample
        for name in ("taesd_decoder.safetensors", "taesd_decoder.pth"):
            assert torch.equal(load_tiny_decoder(tmp_path / name).decode(z).sample, want)


def test_a_file_that_is_no_decoder_is_one_line(tmp_path):
    save_file({"model.diffusion_model.x": torch.zeros(2)}, tmp_path / "taesd_decoder.safetensors")
    with pytest.raises(CorruptModel, match="not a TAESD decoder"):
        load_tiny_decoder(tmp_path / "taesd_decoder.safetensors")


def test_the_decoder_for_a_latent_space_is_found(tmp_path):
    folder = tmp_path / "vae-taesd"
    folder.mkdir()
    (folder / "taesdxl_decoder.safetensors").write_bytes(b"")
    assert find_tiny_decoder(tmp_path, "sdxl") == folder / "taesdxl_decoder.safetensors"
    assert find_tiny_decoder(tmp_path, "sd1") is None  # SD's TAESD is not installed
    assert find_tiny_decoder(tmp_path, "danqing-tiny") == bundled_decoder_path()
    comps = shared_studio().models.load("danqing-tiny").components
    assert (comps.family, latent_space(comps)) == ("sd1", "danqing-tiny")  # an SD1 UNet, its own VAE


@pytest.fixture(scope="module")
def final_step():
    """The last step of a danqing-tiny generation and its finished picture."""
    studio = shared_studio()
    seen = {}
    request = GenerationRequest(prompt="a red circle left of a blue square", seed=5, steps=8, width=64, height=64)
    result = studio.generate(request, on_step=lambda info: seen.update(info=info), save=False)
    return request, seen["info"], result.images[0]


def test_the_bundled_decoder_previews_close_to_the_vae(final_step):
    """At the last step the tiny decoder's preview is close to the finished picture (19 dB PSNR);
    the linear approximation is far off (it is fitted to SD's latent space, not danqing-tiny's)."""
    _, info, image = final_step
    decoder = load_tiny_decoder(bundled_decoder_path())
    tiny, linear = _psnr(tiny_preview(info.latents, decoder), image), _psnr(cheap_preview(info.latents, info.family), image)
    print(f"preview PSNR against the finished picture: tiny decoder {tiny:.1f} dB, linear {linear:.1f} dB")
    assert tiny >= 16 and tiny >= linear + 8  # measured: 19.0 and 9.4 dB


def test_the_worker_previews_with_taesd_when_the_option_says_so(final_step, tmp_path):
    from danqing.server.jobs import Worker
    from danqing.server.state import ServerState
    from danqing.server.store import JobStore

    request, info, image = final_step
    studio = shared_studio()
    store = JobStore(tmp_path / "jobs.sqlite3")
    worker = Worker(store, studio, tmp_path / "outputs")
    state = ServerState(studio.settings, None, store, worker)
    with pytest.raises(InvalidRequest, match="show_progress_type.*Approx cheap, TAESD"):
        state.set_options({"show_progress_type": "Full"})
    previews = {}
    for mode in ("Approx cheap", "TAESD"):
        state.set_options({"show_progress_type": mode})
        worker._preview_mode = store.options()["show_progress_type"]  # as a job start reads it
        worker._preview_request, worker._preview_space = request, None
        previews[mode] = worker._preview(info)
    assert _psnr(previews["TAESD"], image) >= _psnr(previews["Approx cheap"], image) + 8


def test_the_trainer_writes_a_decoder_that_beats_the_linear_preview(tmp_path):
    out = tmp_path / "taesd-tiny.safetensors"
    summary = train_preview_decoder("danqing-tiny", out, steps=60, batch_size=16, n_images=64, n_test=32,
                                    settings=shared_studio().settings, log=lambda line: None)
    assert set(load_file(out)) == set(diffusers_to_taesd(build_tiny_decoder(**TINY_CONFIG).state_dict()))
    assert summary["psnr_db"] > summary["linear_preview_psnr_db"] + 3
    with torch.no_grad():  # the file is the decoder that was measured
        z = torch.randn(1, 4, 16, 16)
        assert load_tiny_decoder(out).decode(z).sample.shape == (1, 3, 64, 64)
