"""docs/images/control.png. Top: one prompt, "a red circle", with four Canny maps (circles
drawn at different places and sizes): the control map, the bundled model alone (weight 0), and
with danqing-tiny-canny at weight 0.5 and 1. Bottom: line-art colourisation (drawing, result).
64x64 pictures shown 3x.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/control_figure.py
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    from PIL import Image

    from danqing import Settings, Studio
    from danqing.apps.control_projects import colorize
    from danqing.synthetic.captions import caption
    from danqing.synthetic.render import render
    from danqing.synthetic.scenes import Obj, Scene, eval_scenes
    from danqing.training.controlnet import generate_controlled, make_condition, structure_map

    torch.set_num_threads(1)
    studio = Studio(Settings(home=tempfile.mkdtemp(), device="cpu", dtype="fp32"))
    comps = studio.models.load("danqing-tiny").components
    net = studio.models.load_control("danqing-tiny-canny").model
    spots = [(0.25, 0.3, "large"), (0.72, 0.7, "large"), (0.5, 0.5, "large"), (0.75, 0.25, "small")]
    maps = [make_condition("canny", render(Scene((Obj("circle", "red", size, x, y),)))) for x, y, size in spots]
    rows = [maps]
    for w in (0.0, 0.5, 1.0):
        rows.append(generate_controlled(comps, net, ["a red circle"] * 4, maps, w, seed=7))
    draw, cols = [], []
    for i, scene in enumerate(eval_scenes(2, seed=5)):
        scene = dataclasses.replace(scene, style="plain", background="white")
        drawing = Image.fromarray(255 - structure_map("lineart", render(scene))).convert("RGB")
        draw.append(drawing)
        cols.append(colorize(studio, drawing, caption(scene), seed=i).image)
    rows.append([draw[0], cols[0], draw[1], cols[1]])
    s, gap = 64, 6
    sheet = Image.new("RGB", (4 * s, 5 * s + gap), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im.resize((s, s)), (c * s, r * s + (gap if r == 4 else 0)))
    sheet = sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST)
    os.makedirs("docs/images", exist_ok=True)
    sheet.save("docs/images/control.png")
    print("docs/images/control.png", [caption(dataclasses.replace(sc, style="plain", background="white"))
                                       for sc in eval_scenes(2, seed=5)])


if __name__ == "__main__":
    main()
