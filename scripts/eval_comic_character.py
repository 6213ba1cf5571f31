"""Measure a LoRA as a comic character (docs/apps.md, docs/training.md): six two-object scene
lines ("{heart} left of a blue circle", ...) drafted as a storyboard at several storyboard seeds;
the shapes evaluator (with the heart among its shapes) counts the panels that hold the character
and those that hold the scene line's other object.

    .venv/bin/python scripts/eval_comic_character.py runs/lora-heart-character/heart-character.safetensors
    .venv/bin/python scripts/eval_comic_character.py danqing/data/models/lora/heart.safetensors --weights 1,1.5,2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

PANELS = [("{h} left of a blue circle", ("blue", "circle")), ("{h} right of a green square", ("green", "square")),
          ("{h} above a yellow triangle", ("yellow", "triangle")), ("{h} below a purple ring", ("purple", "ring")),
          ("{h} left of an orange cross", ("orange", "cross")), ("{h} right of a blue square", ("blue", "square"))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("lora", type=Path)
    ap.add_argument("--weights", default="1")
    ap.add_argument("--seeds", default="100,200,300,400,500,600,700,800")
    ap.add_argument("--trigger", default="a red heart")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from PIL import Image

    from danqing import Settings, Studio
    from danqing.apps.comic import ComicProject
    from danqing.synthetic.evaluate import detect
    from danqing.synthetic.scenes import shapes

    root = Path(tempfile.mkdtemp(prefix="dq-comic-"))
    (root / "models" / "lora").mkdir(parents=True)
    shutil.copy(args.lora, root / "models" / "lora" / "character.safetensors")
    studio = Studio(Settings(home=root / "home", models_dir=root / "models", device="cpu", dtype="fp32"))
    colour, shape = args.trigger.split()[-2:]
    names = (*shapes(), shape)
    for w in (float(x) for x in args.weights.split(",")):
        chars, others = [], []
        for seed in (int(x) for x in args.seeds.split(",")):
            story = (f'title = "measure"\nsampler = "DPM++ 2M"\nschedule = "Karras"\nsteps = 20\nseed = {seed}\n'
                     f'hires_scale = 1\nnegative_prompt = "blurry"\n[characters.h]\ntrigger = "{args.trigger}"\n'
                     f'tags = "<lora:character:{w:g}>"\n')
            story += "".join(f'[[panels]]\nscene = "{scene}"\n' for scene, _ in PANELS)
            folder = root / f"seed{seed}-w{w:g}"
            folder.mkdir()
            (folder / "story.toml").write_text(story, encoding="utf-8")
            comic = ComicProject(folder / "story.toml")
            comic.draft(studio)
            found = [{(d.colour, d.shape) for d in detect(Image.open(p), shape_names=names)}
                     for p in sorted((comic.folder / "draft").glob("panel-*.png"))]
            chars.append(sum((colour, shape) in f for f in found))
            others.append(sum(o in f for (_, o), f in zip(PANELS, found)))
        print(f"weight {w:g}: character {chars} mean {sum(chars) / len(chars):.2f} of 6; "
              f"other objects {others} mean {sum(others) / len(others):.2f} of 6")


if __name__ == "__main__":
    main()
