"""docs/images/ip-adapter-green-star.png: the bundled danqing-tiny-ip (or an adapter file given)
with danqing-tiny, the judge's picture of a green star as image prompt (top left) and 31
generations from the empty text prompt at weight 1 (seeds 0-30, 20 steps DPM++ 2M, CFG 7), 64x64
each, 8 to a row.

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/ip_adapter_figure.py [ADAPTER_FILE] [OUT]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from PIL import Image

    from danqing import Settings, Studio
    from danqing.request import GenerationRequest
    from danqing.synthetic.render import render
    from danqing.training.ip_adapter import reference_scene

    out = sys.argv[2] if len(sys.argv) > 2 else "docs/images/ip-adapter-green-star.png"
    home = Path(tempfile.mkdtemp())
    if len(sys.argv) > 1 and sys.argv[1]:  # a file of the same name shadows the bundled adapter
        (home / "models/ipadapter").mkdir(parents=True)
        shutil.copy(sys.argv[1], home / "models/ipadapter/danqing-tiny-ip.safetensors")
    studio = Studio(Settings(home=home, device="cpu", dtype="fp32"))
    reference = render(reference_scene("green", "star"), 64)
    reference.save(home / "green-star.png")
    req = GenerationRequest(model="danqing-tiny", prompt="", width=64, height=64, steps=20, cfg_scale=7.0,
                            sampler="DPM++ 2M", seed=0, subseed=0, batch_size=31,
                            ip_adapter_image=(str(home / "green-star.png"),), ip_adapter_weight=1.0)
    pictures = [reference, *studio.generate(req).images]
    grid = Image.new("RGB", (8 * 64, 4 * 64), "white")
    for i, im in enumerate(pictures):
        grid.paste(im, (64 * (i % 8), 64 * (i // 8)))
    grid.save(out)
    print(out)


if __name__ == "__main__":
    main()
