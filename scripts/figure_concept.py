"""docs/images/lora-heart.png: held-out heart prompts drawn by danqing-tiny (top row), with the
heart LoRA (middle) and with the DreamBooth checkpoint (bottom), same seeds.

    python scripts/figure_concept.py --lora runs/lora-heart/heart.safetensors \
        --checkpoint runs/dreambooth-heart/danqing-tiny-heart
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/images/lora-heart.png"))
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    from danqing import GenerationRequest, Settings, Studio
    from danqing.synthetic.captions import caption
    from danqing.synthetic.concepts import concept_scenes

    root = Path(tempfile.mkdtemp(prefix="dq-fig-"))
    (root / "lora").mkdir()
    (root / "checkpoints").mkdir()
    shutil.copy(args.lora, root / "lora" / "heart.safetensors")
    rows = [("danqing-tiny", "")] + [("danqing-tiny", " <lora:heart:1>")]
    if args.checkpoint:
        shutil.copytree(args.checkpoint, root / "checkpoints" / "dreambooth-heart")
        rows.append(("dreambooth-heart", ""))
    studio = Studio(Settings(home=root / "home", models_dir=root, device="cpu", dtype="fp32"))
    scenes = concept_scenes(args.n, split="eval")
    scale = 2
    grid = Image.new("RGB", (64 * scale * args.n, 64 * scale * len(rows)), "white")
    for r, (model, tag) in enumerate(rows):
        for i, s in enumerate(scenes):
            req = GenerationRequest.create(prompt=caption(s) + tag, model=model, steps=20, seed=1000 + i, width=64,
                                           height=64)
            im = studio.generate(req).images[0].resize((64 * scale, 64 * scale), Image.NEAREST)
            grid.paste(im, (i * 64 * scale, r * 64 * scale))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(args.out, [caption(s) for s in scenes])


if __name__ == "__main__":
    main()
