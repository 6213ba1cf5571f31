"""Measure a person LoRA in the portrait world (docs/apps.md, "A person LoRA in the portrait world").

A held-out person (``synthetic.portraits.person``: an identity no training picture of the base
model shows) gets 8 rendered pictures in varied clothes, expressions, poses, backgrounds and
styles. They are written as ``portrait add`` writes a person (``people/NAME/train``, one caption
per crop: the template with the trigger word, then what a captioner would say of the picture
minus the person's looks; here the rendered picture's own clothes, expression, pose, background
and style stand in for a captioner). ``danqing app portrait train`` trains the LoRA (the ``tiny``
recipe unless ``--recipe`` says otherwise). Then 50 new
pictures of the person (other clothes, backgrounds and styles: ``pictures_of`` with another
seed) are asked for by prompt, with the LoRA and without it (the same prompts and seeds). A
picture *gives the person's identity* when the portrait reader reads every identity attribute
its style shows (head, skin, hair colour and style, eyes, glasses; pencil shows no colour) as
the person's.

    .venv/bin/python scripts/eval_person_lora.py --model runs/danqing-tiny-portraits-cpu/model --person Ada,Bai,Chen,Dara
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def scene_words(p) -> str:
    """What a captioner says of a portrait besides the person: expression, clothes, pose,
    background, style (no colour words in a style that shows none)."""
    from danqing.synthetic.portraits import shows_colour, vocab

    v = vocab()
    first = lambda w: w[0] if isinstance(w, list) else w  # noqa: E731
    words = [first(v["mouth"][p.mouth]["en"])]
    if shows_colour(p.style):
        words.append(f"in {'an' if p.clothing[0] in 'aeiou' else 'a'} {p.clothing} shirt")
    words.append(first(v["pose"][p.pose]["en"]))
    if shows_colour(p.style):
        words.append(f"on a {v['background'][p.background]['en']} background")
    words.append(first(v["style"][p.style]["en"]))
    return ", ".join(words)


def write_person(home: Path, name: str, who, n: int, size: int) -> None:
    from danqing.apps.portrait_people import caption_for, default_trigger
    from danqing.synthetic.portraits import pictures_of, render_portrait

    folder = home / "people" / name / "train"
    folder.mkdir(parents=True)
    trigger = default_trigger(name)
    for i, p in enumerate(pictures_of(who, n, seed=0)):
        render_portrait(p, size).save(folder / f"{i + 1:03d}-head.png")
        (folder / f"{i + 1:03d}-head.txt").write_text(caption_for("head", trigger, scene_words(p)), encoding="utf-8")
    info = {"name": name, "trigger": trigger, "size": size, "identity": [0.0] * 128, "accepted": [], "rejected": []}
    (folder.parent / "person.json").write_text(json.dumps(info), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the base model (a diffusers folder or a name)")
    ap.add_argument("--person", default="Ada", help="held-out people, comma-separated (Ada,Bai,...)")
    ap.add_argument("--pictures", type=int, default=8)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--prior-images", type=int, default=None, help="[default: the recipe's]")
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--steps", type=int, default=None, help="training steps [default: the recipe's]")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--home", type=Path, default=None, help="keep the run here [default: a temporary folder]")
    ap.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    args = ap.parse_args()

    from danqing.synthetic.portraits import person

    results = [measure(person(name), args) for name in args.person.split(",")]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")


def measure(who, args) -> dict:
    from danqing import Settings, Studio
    from danqing.apps.portrait_people import caption_for, default_trigger
    from danqing.synthetic.evaluate import evaluate_studio
    from danqing.synthetic.portrait_reader import score_portrait, summarise_portraits
    from danqing.synthetic.portraits import IDENTITY, pictures_of

    name = who.name.lower()
    home = (args.home / name) if args.home else Path(tempfile.mkdtemp(prefix=f"person-lora-{name}-"))
    write_person(home, name, who, args.pictures, 64)
    cmd = [sys.executable, "-m", "danqing.cli", "--home", str(home), "app", "portrait", "train", name,
           "--recipe", args.recipe, "--base", args.model]
    for flag, value in (("--steps", args.steps), ("--lr", args.lr), ("--rank", args.rank),
                        ("--prior-images", args.prior_images)):
        if value is not None:
            cmd += [flag, str(value)]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    trigger = default_trigger(name)
    tests = pictures_of(who, args.n, seed=1000)
    asked = {a: getattr(who, a) for a in IDENTITY}
    studio = Studio(Settings(home=home))

    def judge(img, p):
        return score_portrait(img, {**asked, "style": p.style})

    out = {"person": who.name, "identity": asked, "pictures": args.pictures, "n": args.n, "recipe": args.recipe}
    for label, suffix in (("without", ""), ("with", f" <lora:{name}:{args.weight:g}>")):
        summary, _ = evaluate_studio(studio, tests, write=lambda p, lang: caption_for("head", trigger, scene_words(p)),
                                     judge=judge, summary=summarise_portraits, model=args.model, suffix=suffix,
                                     cfg_scale=args.cfg, out_dir=home / "outputs" / label)
        out[label] = summary
        print(f"{who.name} {label} the LoRA: identity given in {summary['all']:.2f} of {args.n}; "
              + ", ".join(f"{a} {summary[a]}" for a in (*IDENTITY, "style")), flush=True)
    print(f"run and pictures: {home}")
    return out


if __name__ == "__main__":
    main()
