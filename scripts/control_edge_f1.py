"""Does the bundled canny ControlNet pin down the edges?

For N held-out shapes scenes (danqing.synthetic eval_scenes: compositions the base model never
saw), the control map is the Canny map of the rendered scene; each scene's caption is generated
with the ControlNet at several weights (weight 0 = the base model alone, same seeds), and the
edge F1 (1-pixel tolerance) between the control map and the generated picture's Canny edges is
averaged. Results go to docs/control.md.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/control_edge_f1.py --n 100
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from danqing.models.loader import load_components
    from danqing.models.registry import Registry
    from danqing.models.control import load_control_model
    from danqing.settings import Settings
    from danqing.synthetic.scenes import eval_scenes
    from danqing.training.controlnet import control_scores

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="danqing-tiny")
    ap.add_argument("--controlnet", default="danqing-tiny-canny")
    ap.add_argument("--kind", default="canny", choices=["canny", "lineart"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--weights", default="0,0.1,0.25,0.5,0.75,1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    reg = Registry(Settings.from_env().models_dir)
    comps = load_components(reg.find("checkpoint", args.model))
    for m in comps.modules().values():
        m.float().eval()
    net, _ = load_control_model(reg.find("controlnet", args.controlnet))
    weights = [float(w) for w in args.weights.split(",")]
    t = time.perf_counter()
    res = control_scores(comps, net.float(), eval_scenes(args.n), kind=args.kind, weights=weights, steps=args.steps,
                         cfg_scale=args.cfg)
    out = {"model": args.model, "controlnet": args.controlnet, "kind": args.kind, "n": args.n, "steps": args.steps,
           "cfg": args.cfg, "sampler": "DPM++ 2M", "size": 64, "f1_by_weight": res,
           "gain_at_1": round(res.get("1", 0) - res.get("0", 0), 4), "seconds": round(time.perf_counter() - t)}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
