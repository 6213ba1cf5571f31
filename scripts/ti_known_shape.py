"""Textual inversion on a shape danqing-tiny CAN draw: the control experiment for the heart.

Renders 20 single-star scenes whose captions call the star "dq-thing", trains an embedding
with configs/train/ti-heart.toml's settings, and scores 30 held-out prompts three ways:
the learnt word, the plain word "thing", and the word "star".

    python scripts/ti_known_shape.py [--out /tmp/ti-star]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="dq-ti-star-")))
    ap.add_argument("--n-eval", type=int, default=30)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from danqing import GenerationRequest, Settings, Studio
    from danqing.synthetic.captions import caption
    from danqing.synthetic.evaluate import score
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import Obj, Scene, colours, vocab
    from danqing.training.config import TextualInversionTrainConfig, load_config
    from danqing.training.finetune import train_textual_inversion

    v = vocab()
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(20):
        pos = rng.choice(list(v["positions"]))
        x, y = v["positions"][pos]["xy"]
        s = Scene((Obj("star", colours()[i % 8], rng.choice(["small", "large"]), x, y),),
                  rng.choice(list(v["backgrounds"])), "grey", "plain", position=pos, seed=i)
        render(s).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(caption(s).replace("star", "dq-thing"))
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/train/ti-heart.toml",
                      {"data.source": str(data), "data.object_weight": 0.0, "embedding.name": "dq-thing",
                       "output.output_dir": str(args.out / "run"), "output.sample_prompts": ["a red dq-thing on the left"]},
                      model=TextualInversionTrainConfig)
    summary = train_textual_inversion(cfg, resume=False, log=print)

    models = args.out / "models"
    (models / "embeddings").mkdir(parents=True, exist_ok=True)
    shutil.copy(summary["files"][0], models / "embeddings")
    studio = Studio(Settings(home=args.out / "home", models_dir=models, device="cpu", dtype="fp32"))
    rng = random.Random(99)
    totals = {"dq-thing": 0.0, "thing": 0.0, "star": 0.0}
    for i in range(args.n_eval):
        pos = rng.choice(list(v["positions"]))
        x, y = v["positions"][pos]["xy"]
        s = Scene((Obj("star", rng.choice(colours()), "large", x, y),), position=pos, seed=i)
        for word in totals:
            req = GenerationRequest.create(prompt=caption(s).replace("star", word), model="danqing-tiny", steps=20,
                                           seed=1000 + i, width=64, height=64)
            totals[word] += score(studio.generate(req).images[0], s.spec).object / args.n_eval
    print(json.dumps({"train_seconds": round(summary["seconds"], 1), "object_score": totals}, indent=1))


if __name__ == "__main__":
    main()
