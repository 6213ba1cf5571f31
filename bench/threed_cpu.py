"""Text-to-3D on the CPU with the bundled danqing-tiny: wall time, peak memory and the evaluator's
turntable score of full `danqing 3d` runs (docs/3d.md, "Measured").

    python bench/threed_cpu.py                       # the five prompts below, 400 steps each
    python bench/threed_cpu.py --prompt "a red ball" --steps 100

Each run is its own `danqing 3d` process (so that its peak memory is its own). Its 12 turntable
views are read back from the GIF it wrote and scored by the shapes world's evaluator: a view counts
when the evaluator finds exactly one object, of the asked colour and of the shape the prompt's
object shows in 2D (a ball is a "circle"). The mesh is loaded back with trimesh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageSequence

# (prompt, the shape a view must show, its colour). danqing-tiny's words are the shapes world's:
# a round object is "a circle"; "ball" is a word it never saw (the last row shows what it does).
PROMPTS = [("a red circle", "circle", "red"), ("a blue circle", "circle", "blue"), ("a green circle", "circle", "green"),
           ("a red square", "square", "red"), ("a yellow star", "star", "yellow"), ("a red ball", "circle", "red")]


def gif_frames(path: Path) -> list:
    with Image.open(path) as gif:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]


def run_one(prompt: str, shape: str, colour: str, *, steps: int, seed: int, threads: int, folder: Path,
            options: list[str] = ()) -> dict:
    import trimesh

    from danqing.synthetic.evaluate import detect
    from danqing.threed.evaluate import view_ok

    tag = "".join(o.strip("-").replace("=", "") for o in options)
    out = folder / f"{prompt.replace(' ', '-')}-{seed}{'-' + tag if tag else ''}.glb"
    cmd = [sys.executable, "-m", "danqing", "3d", prompt, "--steps", str(steps), "--seed", str(seed), "--frames", "12",
           "--threads", str(threads), "--quiet", "--out", str(out), *options]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    params = json.loads(out.with_suffix(".json").read_text())
    frames = gif_frames(out.with_suffix(".gif"))
    found = [[f"{d.colour} {d.shape}" for d in detect(f)] for f in frames]
    mesh = trimesh.load(out, force="mesh")
    return {"prompt": prompt, "seed": seed, "steps": params["steps_done"], "seconds": params["seconds"],
            "peak_memory_mb": params["peak_memory_mb"], "views_ok": sum(view_ok(f, shape, colour) for f in frames),
            "views": len(frames), "watertight_loaded": bool(mesh.is_watertight), "faces": len(mesh.faces),
            "found": found, "files": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", help="one prompt (default: the five of PROMPTS); "
                        "the shape and colour are read from the table or the words")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--option", action="append", default=[], help="passed on to danqing 3d, e.g. --option=--guidance=30")
    parser.add_argument("--keep", type=Path, help="write the runs' files here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    rows = PROMPTS if not args.prompt else [next((r for r in PROMPTS if r[0] == p),
                                                 (p, {"ball": "circle"}.get(p.split()[-1], p.split()[-1]), p.split()[1]))
                                            for p in args.prompt]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for prompt, shape, colour in rows:
            r = run_one(prompt, shape, colour, steps=args.steps, seed=args.seed, threads=args.threads, folder=folder,
                        options=args.option)
            results.append(r)
            print(f"| {r['prompt']} | {r['steps']} | {r['seconds']:.0f} s | {r['peak_memory_mb']:.0f} MiB | "
                  f"{r['views_ok']}/{r['views']} | {'yes' if r['watertight_loaded'] else 'no'} |", flush=True)
            print("  views:", "; ".join(", ".join(v) or "nothing" for v in r["found"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
