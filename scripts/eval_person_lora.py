"""Measure a person LoRA in the portrait world (docs/apps.md, "A person LoRA in the portrait world").

For each held-out person named (``synthetic.portraits.person``: an identity no training picture
of the base model shows): 8 rendered pictures in varied clothes, expressions, poses, backgrounds
and styles are written as ``portrait add`` writes a person (``apps.portrait_world``);
``danqing app portrait train`` trains their LoRA (the ``tiny`` recipe unless ``--recipe`` says
otherwise); then 50 new pictures of them (other clothes, backgrounds and styles) are asked for
by caption, with the LoRA and without it, at the same seeds. A picture gives the person's
identity when the portrait reader reads every identity attribute its style shows as theirs.

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the base model (a name, diffusers folder or single file)")
    ap.add_argument("--person", default="Ada", help="held-out people, comma-separated (Ada,Bai,...)")
    ap.add_argument("--pictures", type=int, default=8)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--prior-images", type=int, default=None, help="[default: the recipe's]")
    ap.add_argument("--steps", type=int, default=None, help="training steps [default: the recipe's]")
    ap.add_argument("--lr", type=float, default=None, help="[default: the recipe's]")
    ap.add_argument("--rank", type=int, default=None, help="[default: the recipe's]")
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--weight", type=float, default=1.0, help="the LoRA's weight")
    ap.add_argument("--home", type=Path, default=None, help="keep the runs here, one folder per person "
                                                            "[default: temporary folders]")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    from danqing import Settings, Studio
    from danqing.apps.portrait_world import measure_person_lora, write_world_person
    from danqing.synthetic.portraits import IDENTITY, person

    results = []
    for who in (person(name) for name in args.person.split(",")):
        name = who.name.lower()
        home = (args.home / name) if args.home else Path(tempfile.mkdtemp(prefix=f"person-lora-{name}-"))
        write_world_person(home, name, who, args.pictures)
        cmd = [sys.executable, "-m", "danqing.cli", "--home", str(home), "app", "portrait", "train", name,
               "--recipe", args.recipe, "--base", args.model]
        for flag, value in (("--steps", args.steps), ("--lr", args.lr), ("--rank", args.rank),
                            ("--prior-images", args.prior_images)):
            if value is not None:
                cmd += [flag, str(value)]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        out = measure_person_lora(Studio(Settings(home=home)), who, name, model=args.model, n=args.n,
                                  weight=args.weight, cfg_scale=args.cfg, out_dir=home / "outputs")
        for label in ("without", "with"):
            s = out[label]
            print(f"{who.name} {label} the LoRA: identity given in {s['all']:.2f} of {args.n}; "
                  + ", ".join(f"{a} {s[a]}" for a in (*IDENTITY, "style")), flush=True)
        print(f"run and pictures: {home}", flush=True)
        results.append({"person": who.name, "identity": {a: getattr(who, a) for a in IDENTITY},
                        "recipe": args.recipe, "pictures": args.pictures, "n": args.n, **out})
    if args.out:
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
