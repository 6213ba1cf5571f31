"""Line-art colourisation and QR art, and the restyle / creative-text comparisons, on the
bundled model and its ControlNets. Results go to docs/control.md.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/control_apps.py --colorize 50 --qr 20

- colorize: N held-out scenes on plain white paper; the "drawing" is the scene's line art (XDoG),
  black on white; the prompt its caption. Line F1 = edge F1 (1 px) between the drawing's lines and the line art of
  the result; colour = the shapes evaluator's per-object colour score (danqing.synthetic).
- qr: N payloads ("danqing-00" ... and URLs), each through ``qr_art``: decoded by OpenCV?
- restyle: the three skimage.data photos, canny ControlNet vs plain img2img at the same strength.
- text: a few words, shape IoU with and without the ControlNet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    from PIL import Image

    from danqing import Settings, Studio
    from danqing.apps.control_projects import colorize, creative_text, qr_art, restyle
    from danqing.preprocess.metrics import edge_f1
    from danqing.synthetic.captions import caption
    from danqing.synthetic.evaluate import score
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import eval_scenes
    from danqing.training.controlnet import structure_map

    ap = argparse.ArgumentParser()
    ap.add_argument("--colorize", type=int, default=50)
    ap.add_argument("--qr", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    studio = Studio(Settings(home=tempfile.mkdtemp(), device="cpu", dtype="fp32"))
    out: dict = {"steps": args.steps, "sampler": "DPM++ 2M (apps' defaults)"}

    if args.colorize:
        t = time.perf_counter()
        f1s, colours, all_right = [], [], []
        for i, scene in enumerate(eval_scenes(args.colorize, seed=3)):
            # a line drawing is the objects' outlines: the scene on plain white paper, its line art
            scene = dataclasses.replace(scene, style="plain", background="white")
            lines = structure_map("lineart", render(scene))
            drawing = Image.fromarray(255 - lines).convert("RGB")
            r = colorize(studio, drawing, caption(scene), seed=i, steps=args.steps)
            f1s.append(edge_f1(structure_map("lineart", r.image), lines)["f1"])
            s = score(r.image, scene.spec)
            colours.append(s.colour)
            all_right.append(float(s.colour == 1.0))
        out["colorize"] = {"n": args.colorize, "line_f1": round(float(np.mean(f1s)), 4),
                           "colour_per_object": round(float(np.mean(colours)), 4),
                           "all_colours_right": round(float(np.mean(all_right)), 4),
                           "seconds": round(time.perf_counter() - t)}
        print(json.dumps(out["colorize"]), flush=True)

    if args.qr:
        t = time.perf_counter()
        rows = []
        for i in range(args.qr):
            text = f"danqing-{i:02d}" if i % 2 == 0 else f"https://danqing.example/{i}"
            r = qr_art(studio, text, "a red circle and a blue square", seed=i, steps=args.steps)
            rows.append({"text": text, "ok": r.decoded == text, "tries": len(r.attempts),
                         "strength": r.attempts[-1]["strength"]})
        out["qr"] = {"n": args.qr, "decoded": round(float(np.mean([r["ok"] for r in rows])), 4),
                     "first_try": round(float(np.mean([r["ok"] and r["tries"] == 1 for r in rows])), 4),
                     "mean_tries": round(float(np.mean([r["tries"] for r in rows])), 2),
                     "strengths": [r["strength"] for r in rows], "seconds": round(time.perf_counter() - t)}
        print(json.dumps(out["qr"]), flush=True)

    from skimage import data

    rows = {}
    for name in ("astronaut", "coffee", "chelsea"):
        r = restyle(studio, Image.fromarray(getattr(data, name)()), "a blue star on a yellow background",
                    steps=args.steps)
        rows[name] = {"controlnet": round(r.f1_controlled, 4), "img2img": round(r.f1_plain, 4)}
    out["restyle_edge_f1"] = rows
    print(json.dumps(rows), flush=True)

    rows = {}
    for word in ("OK", "HI", "ART"):
        a = creative_text(studio, word, "a red square", steps=args.steps)
        b = creative_text(studio, word, "a red square", steps=args.steps, control=False)
        rows[word] = {"controlnet": round(a.iou, 4), "img2img": round(b.iou, 4)}
    out["text_iou"] = rows
    print(json.dumps(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
