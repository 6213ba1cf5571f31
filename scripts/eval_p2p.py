"""Prompt-to-Prompt word swap on the bundled model: layout kept and colour changed, against plain
regeneration of the edited prompt at the same seed (docs/editing.md).

    .venv/bin/python scripts/eval_p2p.py [--n 50] [--features 0.5]
"""

from __future__ import annotations

import argparse

import numpy as np

from danqing import GenerationRequest, Settings, Studio
from danqing.synthetic.evaluate import layout_kept

SOURCE = "a red circle left of a blue square"
TARGET = "a green circle left of a blue square"
EXPECTED = [("circle", "green"), ("square", "blue")]


def run(studio, n: int, seed: int = 1000, **p2p) -> tuple[list[bool], list[bool], list[float]]:
    """(p2p ok, plain ok, p2p shifts) for n seeds."""
    base = dict(prompt=TARGET, steps=20, sampler="DDIM", cfg_scale=7.0, width=64, height=64)
    p2p_ok, plain_ok, shifts = [], [], []
    for start in range(seed, seed + n, 10):
        k = min(10, seed + n - start)
        edit = studio.generate(GenerationRequest.create(**base, p2p_source=SOURCE, seed=start, batch_size=k, **p2p))
        plain = studio.generate(GenerationRequest.create(**base, seed=start, batch_size=k))
        for src, e, p in zip(edit.sources, edit.images, plain.images):
            ok, shift = layout_kept(src, e, EXPECTED)
            p2p_ok.append(ok)
            shifts.append(shift if shift is not None else float("nan"))
            plain_ok.append(layout_kept(src, p, EXPECTED)[0])
    return p2p_ok, plain_ok, shifts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    studio = Studio(Settings.from_env())
    rows = [("attention only (the paper)", {}),
            ("attention + features 0.5", {"p2p_features": 0.5}),
            ("features 0.5 only", {"p2p_features": 0.5, "p2p_cross": (0.0, 0.0), "p2p_self": (0.0, 0.0)}),
            ("attention + local blend", {"p2p_local_blend": True})]
    print("| variant | P2P keeps layout + colour | plain regeneration | median shift (px) |")
    print("|---|---|---|---|")
    for name, p2p in rows:
        ok, plain, shifts = run(studio, args.n, **p2p)
        print(f"| {name} | {np.mean(ok):.2f} | {np.mean(plain):.2f} | {np.nanmedian(shifts):.1f} |")


if __name__ == "__main__":
    main()
