"""Copy a finished training run into the package as the bundled model, in fp16.

    .venv/bin/python scripts/bundle_model.py runs/danqing-tiny-cpu [--name danqing-tiny]
    .venv/bin/python scripts/bundle_model.py runs/v2/run3/out/latest.safetensors --summary runs/v2/run3/out/summary.json

RUN is a training run folder (its model/ and summary.json) or a single model file (for example
the latest.safetensors that scripts/train_gpu.sh copies out of a GPU run).

Writes danqing/data/models/<name>/ (diffusers layout) and danqing/data/models/<name>.safetensors
(single-file LDM layout with danqing's configs in the header), replacing the previous version
(which stays in git history), and prints their sizes. Refuses when they exceed 20 MB together.
``--folder-only`` writes the folder alone (the instruct-pix2pix model ships so).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

LIMIT = 20 * 1000 * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", default="danqing-tiny")
    ap.add_argument("--summary", type=Path, help="training summary JSON for the header (default: RUN/summary.json)")
    ap.add_argument("--folder-only", action="store_true", help="only the diffusers folder (no single file)")
    args = ap.parse_args()

    from danqing.models.loader import load_diffusers_folder
    from danqing.training.base import export_model

    if args.run.is_file():
        from danqing.models.loader import load_components
        from danqing.models.registry import Registry
        from danqing.settings import Settings

        comps = load_components(Registry(Settings.from_env().models_dir).find("checkpoint", str(args.run)))
        for m in comps.modules().values():
            m.float()
    else:
        comps = load_diffusers_folder(args.run / "model")
    # No tokenizer/ folder: danqing's loader uses its bundled CLIP tokenizer (the same files), and
    # the 3.6 MB tokenizer.json would be a fifth of the size budget.
    comps.tokenizer = None
    summary_file = args.summary or args.run / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    dest = Path(__file__).resolve().parent.parent / "danqing" / "data" / "models"
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / "models.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    meta = {"danqing.training": json.dumps(summary), "modelspec.title": args.name}
    folder, single = export_model(comps, staging, dtype=torch.float16, name=args.name, metadata=meta)
    if args.folder_only:
        single.unlink()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) + (0 if args.folder_only else single.stat().st_size)
    print(f"{folder.name}/{'' if args.folder_only else ' + ' + single.name}: {size / 1e6:.2f} MB")
    if size > LIMIT:
        shutil.rmtree(staging)
        print(f"refused: more than {LIMIT / 1e6:.0f} MB", file=sys.stderr)
        return 1
    for p in (dest / args.name, dest / f"{args.name}.safetensors"):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    folder.rename(dest / args.name)
    if not args.folder_only:
        single.rename(dest / f"{args.name}.safetensors")
    shutil.rmtree(staging)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
