"""Judge an instruct-pix2pix model on the held-out edits (docs/models.md, danqing-tiny-instruct).

    .venv/bin/python scripts/eval_instruct.py runs/danqing-tiny-instruct/model [--n 100] [--cfg 3 --image-cfg 3]

Prints the share of edits carried out with every untouched object in place ("ok"), and its
parts, overall and per kind (danqing.synthetic.edits.judge_edit).
"""

from __future__ import annotations

import argparse
import json

from danqing.models.loader import load_diffusers_folder
from danqing.synthetic.edits import heldout_edits
from danqing.training.instruct import judge_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--lang", default="en")
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--image-cfg", type=float, default=1.5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    comps = load_diffusers_folder(args.model)
    res = judge_model(comps, heldout_edits(args.n, args.lang), steps=args.steps, cfg_scale=args.cfg,
                      image_cfg_scale=args.image_cfg)
    print(json.dumps({"model": args.model, "cfg": args.cfg, "image_cfg": args.image_cfg, "lang": args.lang, **res}))


if __name__ == "__main__":
    main()
