"""A figure for docs/training.md: held-out prompts of a taught concept drawn by danqing-tiny
(top row), then with the concept's LoRA, its textual-inversion embedding and/or its DreamBooth
checkpoint (one row each, same seeds).

    python scripts/figure_concept.py --lora runs/lora-heart/heart.safetensors \
        --checkpoint runs/dreambooth-heart/danqing-tiny-heart --out docs/images/lora-heart.png
    python scripts/figure_concept.py --concept magenta --lora runs/lora-magenta/magenta.safetensors \
        --embedding runs/ti-magenta/dq-magenta.safetensors --out docs/images/concept-magenta.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", default="heart", help="the novel shape or colour")
    ap.add_argument("--lora", type=Path)
    ap.add_argument("--embedding", type=Path)
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
    for sub in ("lora", "checkpoints", "embeddings"):
        (root / sub).mkdir()
    # (model, word for the concept, prompt suffix)
    rows = [("danqing-tiny", args.concept, "")]
    if args.lora:
        shutil.copy(args.lora, root / "lora" / "concept.safetensors")
        rows.append(("danqing-tiny", args.concept, " <lora:concept:1>"))
    if args.embedding:
        shutil.copy(args.embedding, root / "embeddings" / args.embedding.name)
        rows.append(("danqing-tiny", args.embedding.stem, ""))
    if args.checkpoint:
        shutil.copytree(args.checkpoint, root / "checkpoints" / "dreambooth")
        rows.append(("dreambooth", args.concept, ""))
    studio = Studio(Settings(home=root / "home", models_dir=root, device="cpu", dtype="fp32"))
    scenes = concept_scenes(args.n, concept=args.concept, split="eval")
    scale = 2
    grid = Image.new("RGB", (64 * scale * args.n, 64 * scale * len(rows)), "white")
    for r, (model, word, tag) in enumerate(rows):
        for i, s in enumerate(scenes):
            req = GenerationRequest.create(prompt=caption(s).replace(args.concept, word) + tag, model=model, steps=20,
                                           seed=1000 + i, width=64, height=64)
            im = studio.generate(req).images[0].resize((64 * scale, 64 * scale), Image.NEAREST)
            grid.paste(im, (i * 64 * scale, r * 64 * scale))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(args.out, [caption(s) for s in scenes])


if __name__ == "__main__":
    main()
