"""Outpaint in the img2img tab (danqing/server/ui_outpaint.py): the picture padded on the chosen
sides with the new area as the mask, then inpainted on the bundled tiny model; the original
region comes back unchanged and the new area is painted."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from server_helpers import shared_studio

from danqing import GenerationRequest
from danqing.server.ui_generate import editor_mask
from danqing.server.ui_outpaint import padded


def test_outpaint_keeps_the_original_region(tmp_path):
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    canvas, mask = padded(original, 16, ["right"])
    assert canvas.size == (64, 64)
    m = np.asarray(mask)
    assert (m[:, :48] == 0).all() and (m[:, 48:] == 255).all()
    # the editor's value the panel sends reads back as the same picture and mask
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), mask=mask)
    pic, edit_mask = editor_mask({"background": canvas, "layers": [layer], "composite": canvas})
    assert np.array_equal(np.asarray(edit_mask), m)

    canvas.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    studio = shared_studio()  # the bundled danqing-tiny (one Studio for the server tests)
    req = GenerationRequest(prompt="a red circle", seed=1, steps=3, width=64, height=64, denoising_strength=1.0,
                            init_image=str(tmp_path / "init.png"), mask=str(tmp_path / "mask.png"), mask_blur=0)
    out = np.asarray(studio.generate(req, save=False).images[0].convert("RGB")).astype(int)
    kept = np.abs(out[:, :48] - np.asarray(original).astype(int))
    assert kept.max() <= 1, f"original region changed by up to {kept.max()}"
    assert np.abs(out[:, 48:] - np.asarray(canvas)[:, 48:].astype(int)).mean() > 2  # the new area was painted


def test_outpaint_refuses_bad_sides():
    with pytest.raises(ValueError, match="left, right, top, bottom"):
        padded(Image.new("RGB", (8, 8)), 8, ["sideways"])
    with pytest.raises(ValueError):
        padded(Image.new("RGB", (8, 8)), 0, ["left"])
