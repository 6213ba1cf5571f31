"""Lip sync on the portrait world (docs/apps.md, "Talking portrait"): 20 sentences (10 English,
10 Mandarin) spoken by espeak-ng, each by a person drawn by the renderer and by a portrait model,
every frame read back by the portrait reader.

    .venv/bin/python scripts/eval_talk_world.py --model danqing-tiny-portraits [--control none] [--out talk.json]

Prints, for the renderer and for the model: Pearson r of the reader's mouth height against the
viseme track (and against the track shuffled), the share of frames whose identity matches the
still picture, the share whose identity attributes are the person's, and the largest change
outside the mouth box. The model's mouth is given by the mouth ControlNet
(danqing-tiny-portraits-mouth); ``--control none`` asks for it with the expression word alone.
``--vae NAME`` decodes every picture with another VAE than the model's own.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SENTENCES = [
    ("en", "Hello, I am Danqing."),
    ("en", "Nice to meet you."),
    ("en", "The weather is lovely today."),
    ("en", "Would you like a cup of tea?"),
    ("en", "I paint people and places."),
    ("en", "Open the window, please."),
    ("en", "My favourite colour is blue."),
    ("en", "We will meet again tomorrow."),
    ("en", "Thank you very much."),
    ("en", "Good morning, everybody."),
    ("zh", "你好，我是丹青。"),
    ("zh", "很高兴认识你。"),
    ("zh", "今天天气很好。"),
    ("zh", "你想喝茶吗？"),
    ("zh", "我喜欢画画。"),
    ("zh", "请打开窗户。"),
    ("zh", "我最喜欢蓝色。"),
    ("zh", "我们明天见。"),
    ("zh", "非常感谢你。"),
    ("zh", "大家早上好。"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="danqing-tiny-portraits", help="the portrait model [default: %(default)s]")
    ap.add_argument("--levels", type=int, default=6, help="openness levels the model draws [default: %(default)s]")
    ap.add_argument("--seed", type=int, default=0, help="[default: %(default)s]")
    ap.add_argument("--control", default="danqing-tiny-portraits-mouth",
                    help='the mouth ControlNet, or "none": the prompt asks for the open mouth [default: %(default)s]')
    ap.add_argument("--n", type=int, default=len(SENTENCES), help="sentences [default: all %(default)s]")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--gif", type=Path, default=None,
                    help="also write the first sentence said by the first 3 people as a GIF here (renderer above, model below)")
    ap.add_argument("--weight", type=float, default=1.0, help="the ControlNet's weight [default: %(default)s]")
    ap.add_argument("--vae", default="none",
                    help='a VAE that decodes every picture instead of the model\'s own ("none") [default: %(default)s]')
    args = ap.parse_args()

    from danqing import Settings, Studio
    from danqing.apps.talk_world import measure_lip_sync, measure_model_lip_sync

    sentences = SENTENCES[: args.n]
    studio = Studio(Settings(home=Path(tempfile.mkdtemp(prefix="talk-world-")), device="cpu", dtype="fp32"))
    results = {"renderer": measure_lip_sync(sentences, seed=args.seed, split="heldout"),
               "model": measure_model_lip_sync(studio, args.model, sentences, seed=args.seed, levels=args.levels,
                                                control=None if args.control == "none" else args.control,
                                                weight=args.weight, vae=None if args.vae == "none" else args.vae)}
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    if args.gif:
        write_gif(studio, args, sentences[0])


def write_gif(studio, args, sentence: tuple[str, str], people: int = 3) -> None:
    """The first ``people`` people of ``measure_model_lip_sync`` (same draws, same seeds) each
    saying ``sentence``: the renderer above, the model below, 2x."""
    import random

    from PIL import Image

    from danqing.apps.talk_world import world_clip
    from danqing.synthetic.portraits import Portrait, split_people, values

    rng = random.Random(args.seed)
    clips = []
    for i in range(people):
        p = Portrait(rng.choice(split_people("heldout")), "neutral", rng.choice(values("clothing")), "front",
                     rng.choice(values("background")), "flat", rng.randrange(2**31))
        clips.append(world_clip(studio, args.model, p, *sentence, seed=args.seed + i,
                                control=None if args.control == "none" else args.control, weight=args.weight,
                                vae=None if args.vae == "none" else args.vae))
    frames = []
    for t in range(len(clips[0][0])):
        f = Image.new("RGB", (68 * people - 4, 132), (255, 255, 255))
        for i, (drawn, modelled) in enumerate(clips):
            f.paste(drawn[t], (68 * i, 0))
            f.paste(modelled[t], (68 * i, 68))
        frames.append(f.resize((f.width * 2, f.height * 2), Image.NEAREST))
    frames[0].save(args.gif, save_all=True, append_images=frames[1:], duration=40, loop=0, optimize=True)


if __name__ == "__main__":
    main()
